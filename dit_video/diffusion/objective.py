"""What every objective shares: the interpolant x_t = alpha(t) x_0 + sigma(t) eps, the choice of
network target, timestep sampling, loss weighting, conditioning frames and the loss itself.

An objective subclass only says what alpha(t), sigma(t) are and which targets it allows
(flow.py, vp.py, edm.py). Time convention everywhere: t in [0, 1], t = 0 data, t = 1 noise.

Targets, and how a prediction p becomes (x_0, eps) at (x_t, t):
    eps       p = eps                        x_0 = (x_t - sigma p) / alpha
    x0        p = x_0                        eps = (x_t - alpha p) / sigma
    v         p = alpha eps - sigma x_0      (Salimans & Ho 2022; x_0 = (alpha x_t - sigma p) / (alpha^2 + sigma^2))
    velocity  p = dx_t/dt = eps - x_0        (flow path only; x_0 = x_t - t p)
    edm       p = F, x_0 = c_skip x_t + c_out F  (EDM preconditioning, edm.py)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from dit_video.diffusion.conditioning import draw_cond_mask, hold_cond_frames
from dit_video.diffusion.schedules import shift_time, token_shift
from dit_video.diffusion.timestep_sampling import MODE_SCALE_RANGE, TIMESTEP_SAMPLINGS, sample_timesteps
from dit_video.diffusion.weighting import LOSS_WEIGHTINGS, min_snr_weight, temporal_difference_mse


@dataclass
class ObjectiveConfig:
    """Fields every objective has; FlowConfig, VPConfig and EDMConfig add their own and set defaults."""

    kind: str = "rectified_flow"  # rectified_flow | vp | edm; build_objective picks the class from it
    target: str = "velocity"  # what the network predicts; allowed values depend on kind (see `targets`)
    timestep_sampling: str = "logit_normal"  # "logit_normal" (SD3: t = sigmoid(n), n ~ N(mean, std)), "uniform" or "mode" (SD3 eq. 20)
    logit_mean: float = 0.0  # mean of n for logit-normal sampling; > 0 puts more weight on noisy t
    logit_std: float = 1.0  # std of n for logit-normal sampling
    mode_scale: float = 1.29  # s of mode sampling, in [-1, 2/(pi-2)]; > 0 favours mid-range t, 0 is uniform
    shift: float = 1.0  # time shift s: t' = s t / (1 + (s - 1) t); s > 1 spends more steps at high noise
    shift_base_tokens: int = 0  # > 0: per-sample shift = shift * sqrt(tokens / shift_base_tokens) (SD3 eq. 23); 0: as given
    patch_size: tuple[int, int, int] = (1, 2, 2)  # tokens per sample = T*H*W / prod(patch_size); = model.patch_size
    loss_weighting: str = "none"  # "none" (plain MSE on the target), "min_snr" (Hang et al. 2023) or "objective" (the kind's own loss, see native_target)
    min_snr_gamma: float = 5.0  # gamma of min-SNR weighting (5 in the paper and Open-Sora-Plan)
    caption_dropout: float = 0.1  # probability of training with the empty caption, for classifier-free guidance
    cond_first_frame: float = 0.0  # probability a sample trains image-to-video (first latent frame given, clean, no loss)
    cond_prefix: float = 0.0  # probability a sample trains video extension (first k latent frames given, k ~ U{1..T-1})
    cond_random: float = 0.0  # probability a sample trains with randomly masked (given) latent frames
    cond_random_frame_prob: float = 0.5  # within random masking, probability each latent frame is given
    per_frame_t: bool = False  # diffusion forcing (Chen et al. 2024): an independent t per latent frame (per temporal patch), t [B, T]
    temporal_weight: float = 0.0  # weight of the x_0 temporal-difference loss (weighting.py); 0 = off

    def validate(self) -> None:
        if self.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(
                f"objective.timestep_sampling={self.timestep_sampling!r}: use one of {TIMESTEP_SAMPLINGS}"
            )
        if self.logit_std <= 0:
            raise ValueError(f"objective.logit_std={self.logit_std} must be > 0")
        lo, hi = MODE_SCALE_RANGE
        if not lo <= self.mode_scale <= hi:
            raise ValueError(
                f"objective.mode_scale={self.mode_scale} must be in [{lo}, {hi:.4f}] (monotone map)"
            )
        if self.shift <= 0:
            raise ValueError(f"objective.shift={self.shift} must be > 0")
        if self.shift_base_tokens < 0:
            raise ValueError(
                f"objective.shift_base_tokens={self.shift_base_tokens} must be >= 0 (0 = fixed shift)"
            )
        if len(self.patch_size) != 3 or any(int(p) < 1 for p in self.patch_size):
            raise ValueError(f"objective.patch_size={self.patch_size} must be three positive integers")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(
                f"objective.loss_weighting={self.loss_weighting!r}: use one of {LOSS_WEIGHTINGS}"
            )
        if self.temporal_weight < 0 or (self.temporal_weight > 0 and self.per_frame_t):
            raise ValueError(f"objective.temporal_weight={self.temporal_weight} must be >= 0, and 0 with per_frame_t")
        if self.min_snr_gamma <= 0:
            raise ValueError(f"objective.min_snr_gamma={self.min_snr_gamma} must be > 0")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"objective.caption_dropout={self.caption_dropout} must be in [0, 1)")
        for name in ("cond_first_frame", "cond_prefix", "cond_random", "cond_random_frame_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"objective.{name}={getattr(self, name)} must be a probability in [0, 1]")
        total = self.cond_first_frame + self.cond_prefix + self.cond_random
        if total > 1.0 + 1e-9:
            raise ValueError(
                f"objective.cond_first_frame + cond_prefix + cond_random = {total} must be <= 1 "
                f"(the rest of the samples train text-to-video)"
            )


class Objective:
    """Noising, targets, timestep sampling, weighting and the training loss of one interpolant."""

    kind = ""
    targets: tuple[str, ...] = ()  # targets this interpolant supports
    native_target = ""  # the target whose plain MSE is this objective's own loss ("objective" weighting)
    flow_path = False  # alpha = 1 - t, sigma = t: the flow ODE samplers (euler, heun) apply

    def __init__(self, cfg: ObjectiveConfig):
        cfg.validate()
        if cfg.kind != self.kind:
            raise ValueError(
                f"objective.kind={cfg.kind!r} but {type(self).__name__} is {self.kind!r}; "
                f"build objectives with dit_video.diffusion.build_objective"
            )
        if cfg.target not in self.targets:
            raise ValueError(
                f"objective.target={cfg.target!r}: objective.kind={self.kind!r} supports {self.targets}"
            )
        self.cfg = cfg

    # ------------------------------------------------------------------ the interpolant

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha(t), sigma(t)), each shaped like t."""
        raise NotImplementedError

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = alpha x_0 + sigma eps with t [B] (or per frame [B, T]) broadcast over [B, C, T, H, W]."""
        shape = (-1, 1, t.shape[1], 1, 1) if t.dim() == 2 else (-1, *([1] * (latents.dim() - 1)))
        alpha, sigma = (c.view(shape) for c in self.alpha_sigma(t))  # [B, 1, 1 or T, 1, 1]
        return alpha * latents + sigma * noise

    def model_input(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network sees for state x_t (EDM rescales it; others pass it through)."""
        return x_t

    def target(self, latents: torch.Tensor, noise: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """The regression target for the configured `target`, [B, C, T, H, W]."""
        alpha, sigma = (_bcast(c, latents) for c in self.alpha_sigma(t))
        name = self.cfg.target
        if name == "eps":
            return noise
        if name == "x0":
            return latents
        if name == "v":
            return alpha * noise - sigma * latents
        if name == "velocity":
            return noise - latents
        raise NotImplementedError(name)

    def predict_x0_eps(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Network output pred (in target space) at state x_t -> (x_0, eps) predictions."""
        alpha, sigma = (_bcast(c, x_t) for c in self.alpha_sigma(t))
        name = self.cfg.target
        if name == "eps":
            return (x_t - sigma * pred) / alpha, pred
        if name == "x0":
            return pred, (x_t - alpha * pred) / sigma
        if name == "v":
            norm = alpha**2 + sigma**2  # 1 for VP; the general form keeps v usable on any interpolant
            return (alpha * x_t - sigma * pred) / norm, (sigma * x_t + alpha * pred) / norm
        if name == "velocity":  # flow path: x_0 = x_t - t u, eps = x_t + (1 - t) u
            return x_t - sigma * pred, x_t + alpha * pred
        raise NotImplementedError(name)

    def x0_scale(self, t: torch.Tensor, target: str | None = None) -> torch.Tensor:
        """|d x_0 / d prediction| at t [B]: converts x_0-space loss weights into target space."""
        alpha, sigma = self.alpha_sigma(t)
        name = target or self.cfg.target
        if name == "eps":
            return sigma / alpha
        if name == "x0":
            return torch.ones_like(t)
        if name == "v":
            return sigma / (alpha**2 + sigma**2)
        if name == "velocity":
            return sigma
        raise NotImplementedError(name)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.alpha_sigma(t)
        return alpha**2 / sigma**2

    # ------------------------------------------------------------------ training

    def num_tokens(self, latents: torch.Tensor) -> torch.Tensor:
        """Tokens per sample [B] for latents [B, C, T, H, W] (all samples share the tensor's size)."""
        n = math.prod(latents.shape[2:]) // math.prod(self.cfg.patch_size)
        return torch.full((latents.shape[0],), n, device=latents.device)

    def shift_for(self, num_tokens):
        """The time shift for samples of num_tokens tokens (int or [B]); cfg.shift when not token-dependent."""
        if self.cfg.shift_base_tokens == 0:
            return self.cfg.shift
        return token_shift(num_tokens, self.cfg.shift, self.cfg.shift_base_tokens)

    def sample_t(self, batch_size: int, device, generator=None, num_tokens: torch.Tensor | None = None):
        """Training times t [B] in (0, 1): drawn from cfg.timestep_sampling, then shifted.

        num_tokens [B] is only read when cfg.shift_base_tokens > 0 (per-sample shift).
        """
        c = self.cfg
        t = sample_timesteps(
            c.timestep_sampling,
            batch_size,
            logit_mean=c.logit_mean,
            logit_std=c.logit_std,
            mode_scale=c.mode_scale,
            device=device,
            generator=generator,
        )  # [B]
        if c.shift_base_tokens > 0:
            if num_tokens is None:
                raise ValueError("objective.shift_base_tokens > 0 needs num_tokens per sample")
            return shift_time(t.double(), self.shift_for(num_tokens).to(device)).to(t.dtype)
        return shift_time(t, c.shift)

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample weight [B] on the target MSE, from cfg.loss_weighting (see weighting.py)."""
        kind = self.cfg.loss_weighting
        if kind == "none":
            return torch.ones_like(t)
        if kind == "min_snr":
            return min_snr_weight(self.snr(t), self.x0_scale(t), self.cfg.min_snr_gamma)
        # "objective": the MSE of the native target, expressed in the chosen target's space
        return (self.x0_scale(t) / self.x0_scale(t, self.native_target)) ** 2

    def sample_frame_t(self, latents: torch.Tensor, generator=None, num_tokens: torch.Tensor | None = None):
        """Per-frame training times t [B, T] (diffusion forcing): one draw of sample_t per temporal
        patch (patch_size[0] latent frames share a token, so they share t), repeated over its frames."""
        b, frames = latents.shape[0], latents.shape[2]
        pt = int(self.cfg.patch_size[0])
        tokens = None if num_tokens is None else num_tokens.repeat_interleave(frames // pt)  # [B * T / pt]
        t = self.sample_t(b * (frames // pt), latents.device, generator, tokens)  # [B * T / pt]
        return t.view(b, frames // pt).repeat_interleave(pt, dim=1)  # [B, T]

    def draw_cond_mask(self, latents: torch.Tensor, generator=None) -> torch.Tensor | None:
        """Training conditioning masks [B, T] from the cfg.cond_* probabilities, or None if all are 0."""
        c = self.cfg
        if c.cond_first_frame == 0 and c.cond_prefix == 0 and c.cond_random == 0:
            return None
        return draw_cond_mask(
            latents.shape[0],
            latents.shape[2],
            p_first_frame=c.cond_first_frame,
            p_prefix=c.cond_prefix,
            p_random=c.cond_random,
            random_frame_prob=c.cond_random_frame_prob,
            device=latents.device,
            generator=generator,
        )

    def loss(
        self,
        model,
        latents: torch.Tensor,
        text_emb: torch.Tensor,
        text_mask: torch.Tensor,
        generator: torch.Generator | None = None,
        cond_mask: torch.Tensor | None = None,
        num_tokens: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
    ):
        """Weighted MSE between the network output and the target.

        latents [B, C, T, H, W] (clean, normalised). cond_mask [B, T] (bool) marks conditioning
        frames: kept clean in x_t and left out of the loss; None draws them from the cfg.cond_*
        probabilities (none by default). num_tokens [B] overrides the token count used by a
        token-dependent shift (e.g. the unpadded sizes of a padded mixed-size batch). pooled [B, P]:
        the pooled text vector, passed to the model only when given (model.pooled_text_dim > 0).
        Returns (loss scalar, aux) with aux `t` [B], `loss_per_sample` [B] (weighted, what the
        gradient sees), `mse_per_sample` [B] (unweighted) and `cond_mask` [B, T] or None; all detached.
        With cfg.per_frame_t the network gets t [B, T], each frame's loss is weighted by its own t,
        and aux `t` is each sample's mean t.
        """
        noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype, generator=generator)
        if self.cfg.shift_base_tokens > 0 and num_tokens is None:
            num_tokens = self.num_tokens(latents)
        if self.cfg.per_frame_t:
            t = self.sample_frame_t(latents, generator, num_tokens)  # [B, T]
        else:
            t = self.sample_t(latents.shape[0], latents.device, generator, num_tokens)  # [B]
        if cond_mask is None:
            cond_mask = self.draw_cond_mask(latents, generator)
        x_t = self.add_noise(latents, noise, t)  # [B, C, T, H, W]
        if cond_mask is not None:
            x_t = hold_cond_frames(x_t, latents, cond_mask)  # given frames stay clean
        extra = {} if pooled is None else {"pooled": pooled}  # only pooled-text DiTs take it
        pred = model(self.model_input(x_t, t), t, text_emb, text_mask, **extra)  # [B, C, T, H, W]
        # The loss is computed in fp32: under bf16 autocast the prediction is bf16, and a bf16
        # mean over ~1e4 elements loses the small differences late training cares about.
        target = self.target(latents.float(), noise.float(), x_t.float(), t.float())
        err = F.mse_loss(pred.float(), target, reduction="none")  # [B, C, T, H, W]
        if t.dim() == 2:  # per-frame t: each frame weighted by its own t, then the mean over frames that count
            frame_mse = err.mean(dim=(1, 3, 4))  # [B, T]
            keep = torch.ones_like(frame_mse) if cond_mask is None else (~cond_mask).float()  # [B, T]
            kept = keep.sum(1).clamp(min=1)  # [B]
            loss_per_sample = (frame_mse * self.loss_weight(t.float()) * keep).sum(1) / kept  # [B]
            mse_per_sample = (frame_mse * keep).sum(1) / kept  # [B]
            aux = {"t": t.mean(1).detach(), "loss_per_sample": loss_per_sample.detach(),
                   "mse_per_sample": mse_per_sample.detach(), "cond_mask": cond_mask}
            return loss_per_sample.mean(), aux
        if cond_mask is None:
            mse_per_sample = err.flatten(1).mean(1)  # [B]
        else:
            keep = (~cond_mask)[:, None, :, None, None].float()  # [B, 1, T, 1, 1]
            kept = keep.expand_as(err).flatten(1).sum(1).clamp(min=1)  # [B] elements that count
            mse_per_sample = (err * keep).flatten(1).sum(1) / kept  # [B]
        loss_per_sample = mse_per_sample * self.loss_weight(t.float())  # [B]
        if self.cfg.temporal_weight > 0:  # frame-to-frame change of the predicted clean latents: the motion
            x0_pred, _ = self.predict_x0_eps(pred.float(), x_t.float(), t.float())  # [B, C, T, H, W]
            loss_per_sample = loss_per_sample + self.cfg.temporal_weight * temporal_difference_mse(x0_pred, latents.float())
        aux = {
            "t": t.detach(),
            "loss_per_sample": loss_per_sample.detach(),
            "mse_per_sample": mse_per_sample.detach(),
            "cond_mask": cond_mask,
        }
        return loss_per_sample.mean(), aux

    def loss_packed(
        self,
        model,
        latents: list[torch.Tensor],
        text_emb: torch.Tensor,
        text_mask: torch.Tensor,
        generator: torch.Generator | None = None,
        pooled: torch.Tensor | None = None,
    ):
        """`loss` for a packed batch (NaViT): clips of different sizes in one DiT.forward_packed call.

        latents: B clean latents [C, T_i, H_i, W_i]; text_emb [B, L, D], text_mask [B, L]; pooled
        [B, P] or None, as in `loss`.
        Randomness is drawn sample by sample in `loss`'s order (noise, t, conditioning frames),
        so the packed batch sees exactly what B bucket batches of one sample would; a token-dependent
        shift uses each sample's own token count. Reduction as in `loss`: the mean over each
        sample's elements, then the mean over samples, so a large clip does not outweigh a small
        one (the packed and bucket modes optimise the same objective).
        Returns (loss scalar, aux) as `loss`, with aux `cond_mask` bool [ΣT_i] (all samples' latent
        frames in order) or None.
        """
        if self.cfg.per_frame_t:  # forward_packed takes one t per clip
            raise ValueError("objective.per_frame_t=true does not work with data.packing yet; turn one of them off")
        if self.cfg.temporal_weight > 0:
            raise ValueError("objective.temporal_weight > 0 does not work with data.packing yet; turn one of them off")
        noisy, noises, times, masks = [], [], [], []
        for x in latents:
            x = x[None]  # [1, C, T, H, W]
            noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
            num_tokens = self.num_tokens(x) if self.cfg.shift_base_tokens > 0 else None
            t = self.sample_t(1, x.device, generator, num_tokens)  # [1]
            cond_mask = self.draw_cond_mask(x, generator)  # [1, T] or None
            x_t = self.add_noise(x, noise, t)  # [1, C, T, H, W]
            if cond_mask is not None:
                x_t = hold_cond_frames(x_t, x, cond_mask)  # given frames stay clean
            noisy.append(x_t)
            noises.append(noise)
            times.append(t)
            masks.append(cond_mask)
        t = torch.cat(times)  # [B]
        extra = {} if pooled is None else {"pooled": pooled}  # only pooled-text DiTs take it
        preds = model.forward_packed(
            [self.model_input(x_t, t_i)[0] for x_t, t_i in zip(noisy, times, strict=True)], t, text_emb, text_mask,
            **extra,
        )  # B x [C, T_i, H_i, W_i]
        mse = []
        for x, noise, x_t, t_i, pred, cond_mask in zip(latents, noises, noisy, times, preds, masks, strict=True):
            target = self.target(x[None].float(), noise.float(), x_t.float(), t_i.float())  # [1, C, T, H, W]
            err = F.mse_loss(pred[None].float(), target, reduction="none")  # [1, C, T, H, W]
            if cond_mask is None:
                mse.append(err.mean())
            else:
                keep = (~cond_mask)[:, None, :, None, None].float()  # [1, 1, T, 1, 1]
                mse.append((err * keep).sum() / keep.expand_as(err).sum().clamp(min=1))
        mse_per_sample = torch.stack(mse)  # [B]
        loss_per_sample = mse_per_sample * self.loss_weight(t.float())  # [B]
        aux = {
            "t": t.detach(),
            "loss_per_sample": loss_per_sample.detach(),
            "mse_per_sample": mse_per_sample.detach(),
            # [ΣT_i] given-frame flags of all samples (frames differ per sample, so no [B, T] mask)
            "cond_mask": None if all(m is None for m in masks) else torch.cat([
                torch.zeros(x.shape[1], dtype=torch.bool, device=x.device) if m is None else m[0]
                for x, m in zip(latents, masks, strict=True)
            ]),
        }
        return loss_per_sample.mean(), aux


def _bcast(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample [B] (per-frame [B, T], or scalar) coefficient -> broadcastable against [B, C, T, H, W]."""
    if c.dim() == 0:
        return c.to(like.dtype)
    if c.dim() == 2:
        return c.to(like.dtype)[:, None, :, None, None]  # [B, 1, T, 1, 1]
    return c.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def config_fields(cls) -> set[str]:
    return {f.name for f in fields(cls)}
