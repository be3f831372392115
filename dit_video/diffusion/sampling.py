"""Samplers: integrate from noise (t = ts[0], usually 1) to data (t = 0), for any objective.

Every sampler works on a denoiser (x, t) -> (x_0, eps) predictions and the objective's
alpha(t), sigma(t), so it is independent of the network's target (velocity, eps, v, x0, edm):

    euler     explicit Euler on the flow ODE dx/dt = eps - x_0     (flow-path objectives)
    heun      Heun's 2nd-order method on the same ODE, Euler on the last step to t = 0
              (Karras et al. 2022, alg. 1 without churn)            (flow-path objectives)
    ddim      x' = alpha' x_0 + sqrt(sigma'^2 - s^2) eps + s z, s = eta * DDIM's sigma (Song et al. 2021)
    dpmpp_2m  DPM-Solver++(2M), multistep 2nd order in lambda = log(alpha / sigma) (Lu et al. 2022)

For a flow path (alpha = 1 - t, sigma = t), ddim with eta = 0 is the same map as euler.
Numerically equal to diffusers' schedulers at matched grids: tests/test_diffusion_reference.py.
"""

from __future__ import annotations

import math

import torch

from dit_video.diffusion.conditioning import hold_cond_frames
from dit_video.diffusion.flow import FlowConfig, RectifiedFlow
from dit_video.diffusion.schedules import flow_timesteps

__all__ = [
    "SAMPLERS",
    "Denoiser",
    "GuidedModel",
    "ddim",
    "dpmpp_2m",
    "flow_euler",
    "flow_heun",
    "flow_timesteps",
    "pad_text",
    "sample",
]


def pad_text(text_emb: torch.Tensor, text_mask: torch.Tensor, length: int):
    """Right-pad [B, L, D] / [B, L] to `length` tokens with masked-out zeros."""
    extra = length - text_emb.shape[1]
    if extra <= 0:
        return text_emb, text_mask
    text_emb = torch.nn.functional.pad(text_emb, (0, 0, 0, extra))  # [B, length, D]
    text_mask = torch.nn.functional.pad(text_mask, (0, extra), value=False)  # [B, length]
    return text_emb, text_mask


# ----------------------------------------------------------------------------- guidance


class GuidedModel:
    """Network output with classifier-free guidance: o_u + cfg (o_c - o_u), one batched forward.

    The "unconditional" embedding is whatever null_text_emb holds: the encoded empty caption,
    or a negative prompt's embedding (guidance then pushes away from it).
    The conditional and unconditional halves share one forward pass (the batch is doubled), which
    is faster than two passes at small batch sizes on every backend we run.
    guidance_rescale phi (Lin et al. 2024, sec. 3.4) rescales the guided output to the std of the
    conditional one and mixes: phi * rescaled + (1 - phi) * guided, against over-exposure at high cfg.
    guidance_interval (lo, hi) applies guidance only for lo <= t <= hi (Kynkaanniemi et al. 2024:
    guidance at the highest noise levels mostly costs diversity); outside it only the
    conditional half runs.
    The output is in the network's target space, in x's dtype.
    """

    def __init__(
        self,
        model,
        text_emb,
        text_mask,
        null_text_emb=None,
        null_text_mask=None,
        cfg: float = 1.0,
        guidance_rescale: float = 0.0,
        guidance_interval: tuple[float, float] = (0.0, 1.0),
        pooled: torch.Tensor | None = None,
        null_pooled: torch.Tensor | None = None,
    ):
        self.model, self.cfg = model, cfg
        self.guidance_rescale, self.guidance_interval = guidance_rescale, tuple(guidance_interval)
        self.cond_text = (text_emb, text_mask)
        # A pooled text vector [B, P] (model.pooled_text_dim > 0) is passed only when given, so
        # models without it (and the diffusers reference tests) see the four-argument call.
        self.cond_extra = {} if pooled is None else {"pooled": pooled}
        self.extra = self.cond_extra
        if cfg != 1.0:
            if null_text_emb is None:
                raise ValueError("cfg != 1 needs null_text_emb/null_text_mask (the encoded empty caption)")
            b = text_emb.shape[0]
            if pooled is not None:
                if null_pooled is None:
                    raise ValueError("cfg != 1 with a pooled text vector needs null_pooled (the empty caption's)")
                self.extra = {"pooled": torch.cat([pooled, null_pooled.to(pooled).expand(b, -1)])}  # [2B, P]
            if null_text_emb.shape[0] == 1:  # one unconditional embedding shared by the batch
                null_text_emb = null_text_emb.expand(b, -1, -1)
                null_text_mask = null_text_mask.expand(b, -1)
            length = max(text_emb.shape[1], null_text_emb.shape[1])
            cond = pad_text(text_emb, text_mask, length)
            uncond = pad_text(null_text_emb.to(text_emb), null_text_mask, length)
            self.text_emb = torch.cat([cond[0], uncond[0]])  # [2B, L, D]
            self.text_mask = torch.cat([cond[1], uncond[1]])  # [2B, L]
        else:
            self.text_emb, self.text_mask = text_emb, text_mask

    def guides_at(self, t: float) -> bool:
        lo, hi = self.guidance_interval
        return self.cfg != 1.0 and lo <= t <= hi

    def __call__(self, x: torch.Tensor, t: float) -> torch.Tensor:
        b = x.shape[0]
        if not self.guides_at(t):
            return self.model(x, x.new_full((b,), t), *self.cond_text, **self.cond_extra).to(x.dtype)
        out = self.model(torch.cat([x, x]), x.new_full((2 * b,), t), self.text_emb, self.text_mask, **self.extra).to(
            x.dtype
        )
        out_cond, out_uncond = out.chunk(2)  # [B, C, T, H, W] each
        guided = out_uncond + self.cfg * (out_cond - out_uncond)
        if self.guidance_rescale > 0:
            dims = tuple(range(1, x.dim()))
            rescaled = guided * (out_cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
            guided = self.guidance_rescale * rescaled + (1.0 - self.guidance_rescale) * guided
        return guided




class Denoiser:
    """(x [B, C, T, H, W], t float) -> (x_0, eps) predictions of a (guided) network under an objective.

    With cond_latents/cond_mask the conditioning frames of x are replaced by the given latents
    before every network call, as in training (they are never noised).
    """

    def __init__(self, guided, objective, cond_latents=None, cond_mask=None):
        self.guided, self.objective = guided, objective
        self.cond_latents, self.cond_mask = cond_latents, cond_mask

    def __call__(self, x: torch.Tensor, t: float):
        if self.cond_mask is not None:
            x = hold_cond_frames(x, self.cond_latents, self.cond_mask)
        t64 = torch.tensor(t, dtype=torch.float64, device=x.device)
        pred = self.guided(self.objective.model_input(x, t64.to(x.dtype)), t)
        return self.objective.predict_x0_eps(pred, x, t64)


# ----------------------------------------------------------------------------- samplers


def _alpha_sigma(objective, t: float) -> tuple[float, float]:
    alpha, sigma = objective.alpha_sigma(torch.tensor(t, dtype=torch.float64))
    return float(alpha), float(sigma)


def _half_log_snr(alpha: float, sigma: float) -> float:
    """lambda = log(alpha / sigma), +-inf at the ends (alpha = 0 at zero-SNR t = 1, sigma = 0 at t = 0)."""
    if alpha == 0.0:
        return -math.inf
    if sigma == 0.0:
        return math.inf
    return math.log(alpha) - math.log(sigma)


@torch.no_grad()
def flow_euler(denoise, x, ts, objective=None, progress=None, **_):
    """Explicit Euler on dx/dt = eps - x_0 over the grid ts (t decreasing to 0)."""
    steps = len(ts) - 1
    for i in range(steps):
        x0, eps = denoise(x, ts[i])
        x = x + (ts[i + 1] - ts[i]) * (eps - x0)
        if progress is not None:
            progress(i + 1, steps)
    return x


@torch.no_grad()
def flow_heun(denoise, x, ts, objective=None, progress=None, **_):
    """Heun (trapezoidal predictor-corrector) on dx/dt = eps - x_0; the step to t = 0 is Euler."""
    steps = len(ts) - 1
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        x0, eps = denoise(x, t)
        d = eps - x0
        x_euler = x + (t_next - t) * d
        if t_next == 0:  # the velocity at t = 0 is never needed (and undefined for some targets)
            x = x_euler
        else:
            x0_next, eps_next = denoise(x_euler, t_next)
            x = x + (t_next - t) * 0.5 * (d + (eps_next - x0_next))
        if progress is not None:
            progress(i + 1, steps)
    return x


@torch.no_grad()
def ddim(denoise, x, ts, objective, eta: float = 0.0, generator=None, progress=None, **_):
    """DDIM (Song et al. 2021, eq. 12) written with alpha, sigma so it holds for any interpolant.

    s = eta * sigma' * sqrt(1 - SNR(t) / SNR(t')) is DDIM's sigma_t(eta) (for VP it equals
    eta * sqrt((1 - abar') / (1 - abar)) * sqrt(1 - abar / abar')); eta = 0 is deterministic,
    eta = 1 is DDPM's ancestral sampler. Noise z comes from `generator`, one draw per noisy step.
    """
    steps = len(ts) - 1
    for i in range(steps):
        x0, eps = denoise(x, ts[i])
        a, s = _alpha_sigma(objective, ts[i])
        a1, s1 = _alpha_sigma(objective, ts[i + 1])
        std = 0.0
        if eta > 0 and s1 > 0:
            snr_ratio = (a * s1) ** 2 / (a1 * s) ** 2  # SNR(t) / SNR(t') < 1
            std = eta * s1 * math.sqrt(max(0.0, 1.0 - snr_ratio))
        x = a1 * x0 + math.sqrt(max(0.0, s1**2 - std**2)) * eps
        if std > 0:
            x = x + std * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        if progress is not None:
            progress(i + 1, steps)
    return x


@torch.no_grad()
def dpmpp_2m(denoise, x, ts, objective, progress=None, **_):
    """DPM-Solver++(2M) (Lu et al. 2022, alg. 2), the "midpoint" form diffusers implements.

    First step and any step from or to an infinite lambda (t = 1 with zero SNR, t = 0) are first
    order, which is exactly DDIM; in between the data prediction is extrapolated linearly in lambda.
    """
    steps = len(ts) - 1
    prev_x0, prev_lam = None, None
    for i in range(steps):
        x0, _ = denoise(x, ts[i])
        a, s = _alpha_sigma(objective, ts[i])
        a1, s1 = _alpha_sigma(objective, ts[i + 1])
        lam, lam1 = _half_log_snr(a, s), _half_log_snr(a1, s1)
        if s1 == 0:
            x = a1 * x0  # e^{-h} = 0: the step lands on the data prediction
        else:
            phi = math.expm1(-(lam1 - lam))  # e^{-h} - 1, = -1 when lam = -inf
            x_next = (s1 / s) * x - (a1 * phi) * x0
            if prev_x0 is not None and math.isfinite(lam) and math.isfinite(prev_lam):
                r = (lam - prev_lam) / (lam1 - lam)  # h_{i-1} / h_i
                x_next = x_next - 0.5 * (a1 * phi) * (x0 - prev_x0) / r
            x = x_next
        prev_x0, prev_lam = x0, lam
        if progress is not None:
            progress(i + 1, steps)
    return x


SAMPLERS = {"euler": flow_euler, "heun": flow_heun, "ddim": ddim, "dpmpp_2m": dpmpp_2m}
FLOW_ONLY = ("euler", "heun")


@torch.no_grad()
def sample(
    model,
    text_emb: torch.Tensor,
    text_mask: torch.Tensor,
    shape: tuple[int, ...],
    *,
    null_text_emb: torch.Tensor | None = None,
    null_text_mask: torch.Tensor | None = None,
    sampler: str = "euler",
    steps: int = 30,
    cfg: float = 5.0,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    progress=None,
    objective=None,
    timesteps: torch.Tensor | None = None,
    eta: float = 0.0,
    guidance_rescale: float = 0.0,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
    cond_latents: torch.Tensor | None = None,
    cond_mask: torch.Tensor | None = None,
    pooled: torch.Tensor | None = None,
    null_pooled: torch.Tensor | None = None,
) -> torch.Tensor:
    """Noise + text -> latents, usable without Lightning.

    model: prediction(x [B,C,T,H,W], t [B], text_emb [B,L,D], text_mask [B,L]) -> [B,C,T,H,W],
    in the target space of `objective` (default: rectified flow with a velocity target).
    shape: latent shape (B, C, T, H, W). Returns latents [B, C, T, H, W] in float32 (float64 if
    `noise` is float64). The same generator state gives the same noise, hence the same samples.
    timesteps: the grid [steps + 1] from high noise to 0; default flow_timesteps(steps, shift)
    (for a VP objective that is diffusers' "trailing" spacing; see schedules.vp_timesteps).
    eta: DDIM stochasticity (sampler="ddim" only). cond_latents [B, C, T, H, W] with cond_mask
    [B, T] (bool): frames held fixed to the given latents (image-to-video, video extension).
    pooled [B, P] / null_pooled [1 or B, P]: pooled text vectors of the prompts / the empty caption,
    for a DiT with model.pooled_text_dim > 0 (passed to the model as `pooled=`).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is unknown; choose one of {sorted(SAMPLERS)}")
    objective = objective if objective is not None else RectifiedFlow(FlowConfig())
    if sampler in FLOW_ONLY and not objective.flow_path:
        raise ValueError(
            f"sampler={sampler!r} integrates the flow ODE; objective.kind={objective.kind!r} needs "
            f"sampler 'ddim' or 'dpmpp_2m'"
        )
    if eta != 0.0 and sampler != "ddim":
        raise ValueError(f"eta={eta} is only used by sampler='ddim' (got sampler={sampler!r})")
    if eta < 0:
        raise ValueError(f"eta={eta} must be >= 0")
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale={guidance_rescale} must be in [0, 1]")
    if guidance_interval[0] > guidance_interval[1]:
        raise ValueError(
            f"guidance_interval={tuple(guidance_interval)} must be (low t, high t) with low <= high"
        )
    if timesteps is None:
        if steps < 1:
            raise ValueError(f"steps={steps} must be >= 1")
        timesteps = flow_timesteps(steps, shift)
    ts = [float(t) for t in timesteps]
    if (
        len(ts) < 2
        or ts[-1] != 0.0
        or any(a <= b for a, b in zip(ts[:-1], ts[1:], strict=True))
        or ts[0] > 1.0
    ):
        raise ValueError("timesteps must decrease strictly from <= 1 to exactly 0")
    if (cond_latents is None) != (cond_mask is None):
        raise ValueError("cond_latents and cond_mask go together (given frames and which frames they are)")
    if cond_mask is not None and tuple(cond_mask.shape) != (shape[0], shape[2]):
        raise ValueError(
            f"cond_mask has shape {tuple(cond_mask.shape)}; expected (B, T) = {(shape[0], shape[2])}"
        )
    if noise is None:
        noise = torch.randn(shape, generator=generator, device=text_emb.device)
    x = noise.to(torch.promote_types(noise.dtype, torch.float32))
    guided = GuidedModel(
        model, text_emb, text_mask, null_text_emb, null_text_mask, cfg, guidance_rescale, guidance_interval,
        pooled=pooled, null_pooled=null_pooled,
    )
    denoise = Denoiser(guided, objective, cond_latents, cond_mask)
    x = SAMPLERS[sampler](denoise, x, ts, objective, eta=eta, generator=generator, progress=progress)
    if cond_mask is not None:
        x = hold_cond_frames(x, cond_latents, cond_mask)  # given frames come back bit-exact
    return x
