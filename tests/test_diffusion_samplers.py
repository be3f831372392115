"""Samplers against diffusers (the reference) and against the exact probability-flow ODE solution.

The network is replaced by the exact denoiser of elementwise Gaussian data x_0 ~ N(mu, s^2):
    E[x_0 | x_t] = mu + alpha s^2 / (alpha^2 s^2 + sigma^2) (x_t - alpha mu)
    E[eps | x_t] = sigma / (alpha^2 s^2 + sigma^2) (x_t - alpha mu)
and the probability-flow ODE maps x(t0) affinely between the Gaussian marginals:
    x(t) = alpha(t) mu + r(t) / r(t0) (x(t0) - alpha(t0) mu),  r = sqrt(alpha^2 s^2 + sigma^2).

Convention mapping to diffusers (read from diffusers 0.42 sources):
  * flow schedulers: diffusers' sigma is our t; the network gets timestep = sigma * 1000 (int64
    in DPMSolverMultistep), so the test denoiser reads sigma from the scheduler, not the timestep.
  * VP schedulers: integer timestep i is our t = (i + 1) / N; abar = 1 (set_alpha_to_one /
    final_sigmas_type="zero") is our t = 0.
  * diffusers upcasts samples to float32 inside step() and keeps its tables in float32, so the
    two trajectories agree to float32 precision, far inside the 1e-5 tolerance.
"""

import math

import pytest
import torch

from dit_video.diffusion import (
    EDM,
    EDMConfig,
    FlowConfig,
    GuidedModel,
    RectifiedFlow,
    VPConfig,
    VPDiffusion,
    flow_timesteps,
    prefix_cond_mask,
    sample,
    shift_time,
    vp_timesteps,
)
from dit_video.diffusion.schedules import edm_preconditioning

diffusers = pytest.importorskip("diffusers")

MU, STD = 0.3, 0.6  # Gaussian data; STD != 1 so no sampler is exact by accident
SHAPE = (2, 3, 2, 4, 4)  # B, C, T, H, W


def gaussian_x0_eps(x, alpha, sigma):
    var = alpha**2 * STD**2 + sigma**2
    return MU + alpha * STD**2 / var * (x - alpha * MU), sigma / var * (x - alpha * MU)


def exact_pf_ode(x_start, objective, t_start, t_end=0.0):
    a0, s0 = (float(c) for c in objective.alpha_sigma(torch.tensor(t_start, dtype=torch.float64)))
    a1, s1 = (float(c) for c in objective.alpha_sigma(torch.tensor(t_end, dtype=torch.float64)))
    r0, r1 = math.sqrt(a0**2 * STD**2 + s0**2), math.sqrt(a1**2 * STD**2 + s1**2)
    return a1 * MU + r1 / r0 * (x_start - a0 * MU)


class GaussianOracle(torch.nn.Module):
    """The exact network for Gaussian data, in the objective's target space; records its inputs."""

    def __init__(self, objective):
        super().__init__()
        self.objective, self.inputs = objective, []

    def forward(self, x_in, t, text_emb, text_mask):
        obj, name = self.objective, self.objective.cfg.target
        t = t.double()
        x = x_in
        if name == "edm":  # undo the input scaling c_in
            c_in, c_skip, c_out = (c.view(-1, 1, 1, 1, 1) for c in edm_preconditioning(t, obj.cfg.sigma_data))
            x = x_in / c_in
        self.inputs.append(x.clone())
        alpha, sigma = (c.view(-1, 1, 1, 1, 1) for c in obj.alpha_sigma(t))
        x0, eps = gaussian_x0_eps(x, alpha, sigma)
        return {
            "eps": eps,
            "x0": x0,
            "v": alpha * eps - sigma * x0,
            "velocity": eps - x0,
            "edm": (x0 - c_skip * x) / c_out if name == "edm" else None,
        }[name]


def _text(b=SHAPE[0]):
    return torch.zeros(b, 2, 4, dtype=torch.float64), torch.ones(b, 2, dtype=torch.bool)


def _noise(seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def ours(objective, sampler, timesteps, noise, **kw):
    oracle = GaussianOracle(objective)
    out = sample(
        oracle,
        *_text(),
        SHAPE,
        noise=noise,
        sampler=sampler,
        timesteps=timesteps,
        cfg=1.0,
        objective=objective,
        **kw,
    )
    return out, oracle.inputs


def assert_trajectories_match(ours_inputs, ref_inputs, ours_out, ref_out):
    assert len(ours_inputs) == len(ref_inputs)  # same number of network evaluations
    for i, (a, b) in enumerate(zip(ours_inputs, ref_inputs, strict=True)):
        assert torch.allclose(a, b, atol=1e-5, rtol=0), (
            f"network input {i}: max diff {(a - b).abs().max():.2e}"
        )
    assert torch.allclose(ours_out, ref_out, atol=1e-5, rtol=0), (
        f"max diff {(ours_out - ref_out).abs().max():.2e}"
    )


# ----------------------------------------------------------------------------- diffusers: flow


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_euler_matches_flow_match_euler_discrete_scheduler(shift):
    steps, n = 12, 1000
    sch = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=n, shift=shift)
    sch.set_timesteps(steps)
    # diffusers shifts the smallest training sigma 1/N at init and shifts the grid again in set_timesteps
    grid = flow_timesteps(
        steps, shift, t_last=float(shift_time(torch.tensor(1.0 / n, dtype=torch.float64), shift))
    )
    assert torch.allclose(grid, sch.sigmas.double(), atol=1e-6)

    noise = _noise()
    x, ref_inputs = noise.clone(), []
    for i, timestep in enumerate(sch.timesteps):
        sigma = sch.sigmas[i].double()
        ref_inputs.append(x.clone())
        x0, eps = gaussian_x0_eps(x, 1 - sigma, sigma)
        x = sch.step(eps - x0, timestep, x).prev_sample
    out, inputs = ours(RectifiedFlow(FlowConfig()), "euler", grid, noise)
    assert_trajectories_match(inputs, ref_inputs, out, x)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_heun_matches_flow_match_heun_discrete_scheduler(shift):
    steps, n = 10, 1000
    sch = diffusers.FlowMatchHeunDiscreteScheduler(num_train_timesteps=n, shift=shift)
    sch.set_timesteps(steps)
    grid = flow_timesteps(
        steps, shift, t_last=float(shift_time(torch.tensor(1.0 / n, dtype=torch.float64), shift))
    )
    assert torch.allclose(grid, torch.cat([sch.sigmas[:1], sch.sigmas[1::2]]).double(), atol=1e-6)

    noise = _noise(1)
    x, ref_inputs = noise.clone(), []
    for i, timestep in enumerate(sch.timesteps):
        sigma = sch.sigmas[i].double()  # both Heun stages evaluate at sigmas[step_index]
        ref_inputs.append(x.clone())
        x0, eps = gaussian_x0_eps(x, 1 - sigma, sigma)
        x = sch.step(eps - x0, timestep, x).prev_sample
    out, inputs = ours(RectifiedFlow(FlowConfig()), "heun", grid, noise)
    assert len(inputs) == 2 * steps - 1  # the last step (to t = 0) is Euler in both
    assert_trajectories_match(inputs, ref_inputs, out, x)


@pytest.mark.parametrize("shift", [1.0, 5.0])
def test_flow_dpmpp_2m_matches_dpm_solver_multistep_with_flow_sigmas(shift):
    steps, n = 12, 1000
    sch = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=n, use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction"
    )
    sch.set_timesteps(steps)
    grid = flow_timesteps(steps, shift, t_max=1.0 - 1.0 / n)  # diffusers starts at sigma = shift(1 - 1/N)
    assert torch.allclose(grid, sch.sigmas.double(), atol=1e-6)

    noise = _noise(2)
    x, ref_inputs = noise.clone(), []
    for i, timestep in enumerate(sch.timesteps):
        sigma = sch.sigmas[i].double()  # the network's int64 timestep truncates sigma * N
        ref_inputs.append(x.clone())
        x0, eps = gaussian_x0_eps(x, 1 - sigma, sigma)
        x = sch.step(eps - x0, timestep, x).prev_sample
    out, inputs = ours(RectifiedFlow(FlowConfig()), "dpmpp_2m", grid, noise)
    assert_trajectories_match(inputs, ref_inputs, out, x)


# ----------------------------------------------------------------------------- diffusers: VP


@pytest.mark.parametrize(
    "beta_schedule,target,spacing,zero_snr,eta",
    [
        ("linear", "eps", "leading", False, 0.0),
        ("scaled_linear", "v", "trailing", False, 0.0),
        ("squaredcos_cap_v2", "eps", "leading", False, 0.0),
        ("linear", "v", "trailing", True, 0.0),
        ("linear", "eps", "leading", False, 0.7),
        # eta = 1 with zero terminal SNR makes diffusers take sqrt(1 - abar' - std^2) of a rounding-negative
        # number at the first step (NaN); our sampler clamps it at 0
        ("scaled_linear", "v", "trailing", True, 0.5),
        ("linear", "eps", "trailing", False, 1.0),
    ],
)
def test_ddim_matches_ddim_scheduler(beta_schedule, target, spacing, zero_snr, eta):
    steps, n = 10, 1000
    pred_type = {"eps": "epsilon", "v": "v_prediction"}[target]
    beta_kw = {"scaled_linear": dict(beta_start=0.00085, beta_end=0.012)}.get(beta_schedule, {})
    sch = diffusers.DDIMScheduler(
        num_train_timesteps=n,
        beta_schedule=beta_schedule,
        prediction_type=pred_type,
        clip_sample=False,
        timestep_spacing=spacing,
        rescale_betas_zero_snr=zero_snr,
        **beta_kw,
    )  # clip_sample defaults to True in diffusers; our sampler never clips x_0
    sch.set_timesteps(steps)
    grid = vp_timesteps(steps, n, spacing)
    assert torch.equal((grid[:-1] * n).round().long() - 1, sch.timesteps)

    ours_schedule = {"squaredcos_cap_v2": "cosine"}.get(beta_schedule, beta_schedule)
    objective = VPDiffusion(
        VPConfig(target=target, beta_schedule=ours_schedule, zero_terminal_snr=zero_snr, **beta_kw)
    )
    noise = _noise(3)
    gen = torch.Generator().manual_seed(11)  # our DDIM draws one z per noisy step from this generator
    ref_gen = torch.Generator().manual_seed(11)
    x, ref_inputs = noise.clone(), []
    for timestep in sch.timesteps:
        abar = sch.alphas_cumprod[timestep].double()
        alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        ref_inputs.append(x.clone())
        x0, eps = gaussian_x0_eps(x, alpha, sigma)
        out = eps if target == "eps" else alpha * eps - sigma * x0
        kw = {}
        if eta > 0 and timestep - n // steps >= 0:  # diffusers' last step has zero variance
            kw = dict(eta=eta, variance_noise=torch.randn(SHAPE, generator=ref_gen, dtype=torch.float64))
        x = sch.step(out, timestep, x, **kw).prev_sample
    out, inputs = ours(objective, "ddim", grid, noise, eta=eta, generator=gen)
    assert_trajectories_match(inputs, ref_inputs, out, x)


# cosine with eps is left out: its grid starts at abar[999] = 2.4e-9, where x_0 = (x - sigma eps) / alpha
# divides by alpha = 5e-5 and turns diffusers' float32 step arithmetic into ~1e-3 differences
@pytest.mark.parametrize(
    "beta_schedule,target", [("linear", "eps"), ("scaled_linear", "v"), ("squaredcos_cap_v2", "v")]
)
def test_vp_dpmpp_2m_matches_dpm_solver_multistep_scheduler(beta_schedule, target):
    steps, n = 15, 1000
    pred_type = {"eps": "epsilon", "v": "v_prediction"}[target]
    beta_kw = {"scaled_linear": dict(beta_start=0.00085, beta_end=0.012)}.get(beta_schedule, {})
    sch = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=n, beta_schedule=beta_schedule, prediction_type=pred_type, **beta_kw
    )  # defaults: dpmsolver++, order 2, midpoint, final sigma 0, "linspace" spacing
    sch.set_timesteps(steps)
    grid = vp_timesteps(steps, n, "linspace")
    assert torch.equal((grid[:-1] * n).round().long() - 1, sch.timesteps)

    ours_schedule = {"squaredcos_cap_v2": "cosine"}.get(beta_schedule, beta_schedule)
    objective = VPDiffusion(VPConfig(target=target, beta_schedule=ours_schedule, **beta_kw))
    noise = _noise(4)
    x, ref_inputs = noise.clone(), []
    for i, timestep in enumerate(sch.timesteps):
        sigma_ve = sch.sigmas[i].double()  # diffusers stores sqrt((1 - abar) / abar)
        alpha = 1 / (sigma_ve**2 + 1).sqrt()
        sigma = sigma_ve * alpha
        ref_inputs.append(x.clone())
        x0, eps = gaussian_x0_eps(x, alpha, sigma)
        out = eps if target == "eps" else alpha * eps - sigma * x0
        x = sch.step(out, timestep, x).prev_sample
    out, inputs = ours(objective, "dpmpp_2m", grid, noise)
    assert_trajectories_match(inputs, ref_inputs, out, x)


def test_guidance_rescale_matches_diffusers_rescale_noise_cfg():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    class TextScaled(torch.nn.Module):  # output depends on x and on the text, so cond != uncond
        def forward(self, x, t, text_emb, text_mask):
            return x * (1 + text_emb.mean((1, 2)).view(-1, 1, 1, 1, 1)) + text_emb.mean((1, 2)).view(
                -1, 1, 1, 1, 1
            )

    g = torch.Generator().manual_seed(0)
    emb, mask = torch.randn(2, 3, 4, generator=g, dtype=torch.float64), torch.ones(2, 3, dtype=torch.bool)
    null, null_mask = torch.zeros(1, 3, 4, dtype=torch.float64), torch.ones(1, 3, dtype=torch.bool)
    x = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    model = TextScaled()
    cond, uncond = model(x, None, emb, mask), model(x, None, null.expand(2, -1, -1), null_mask.expand(2, -1))
    for phi in (0.0, 0.7):
        ref = rescale_noise_cfg(uncond + 6.0 * (cond - uncond), cond, guidance_rescale=phi)
        got = GuidedModel(model, emb, mask, null, null_mask, cfg=6.0, guidance_rescale=phi)(x, 0.5)
        assert torch.allclose(got, ref, atol=1e-12)


# ----------------------------------------------------------------------------- closed form + orders


ORDER_CASES = [
    (RectifiedFlow(FlowConfig()), "euler", 1),
    (RectifiedFlow(FlowConfig()), "heun", 2),
    (RectifiedFlow(FlowConfig()), "dpmpp_2m", 2),
    (RectifiedFlow(FlowConfig(target="x0")), "ddim", 1),
    (VPDiffusion(VPConfig(target="eps")), "ddim", 1),
    (VPDiffusion(VPConfig(target="v", beta_schedule="cosine")), "dpmpp_2m", 2),
    (EDM(EDMConfig()), "heun", 2),
    (EDM(EDMConfig()), "dpmpp_2m", 2),
]
ORDER_IDS = [
    "flow-euler",
    "flow-heun",
    "flow-dpmpp2m",
    "flow-ddim",
    "vp-ddim",
    "vp-dpmpp2m",
    "edm-heun",
    "edm-dpmpp2m",
]


@pytest.mark.parametrize("objective,sampler,order", ORDER_CASES, ids=ORDER_IDS)
def test_samplers_converge_to_the_exact_ode_solution_at_their_order(objective, sampler, order):
    # Measured on t in [0.9, 0.1], where every step is small in t and in lambda = log(alpha/sigma);
    # towards t = 1 and t = 0 a uniform t grid takes lambda-steps that do not shrink with N, which
    # hides DPM-Solver's order behind pre-asymptotic noise (the full run is checked below).
    noise, t_hi, t_lo = _noise(5), 0.9, 0.1
    exact = exact_pf_ode(noise, objective, t_hi, t_lo)
    errors = []
    for n in (32, 64, 128):
        grid = torch.cat(
            [torch.linspace(t_hi, t_lo, n + 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)]
        )
        _, inputs = ours(objective, sampler, grid, noise)
        errors.append(float((inputs[-1] - exact).abs().max()))  # the last network input is the state at t_lo
    measured = [
        math.log2(a / b) for a, b in zip(errors[:-1], errors[1:], strict=True)
    ]  # log2(e_N / e_2N) -> order
    assert all(abs(m - order) < 0.15 for m in measured), f"errors {errors}, measured orders {measured}"


@pytest.mark.parametrize(
    "objective,sampler,order",
    ORDER_CASES + [(VPDiffusion(VPConfig()), "dpmpp_2m", 2)],
    ids=ORDER_IDS + ["vp-linear-eps-dpmpp2m"],
)
def test_samplers_reach_the_exact_sample_from_pure_noise(objective, sampler, order):
    noise = _noise(6)
    exact = exact_pf_ode(noise, objective, 1.0)
    errors = []
    for n in (16, 64, 256):
        out, _ = ours(objective, sampler, flow_timesteps(n), noise)
        errors.append(float((out - exact).abs().max()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.02, errors


def test_cfg_with_negative_prompt_and_guidance_interval():
    class TextMean(torch.nn.Module):  # velocity = mean(text): x_0 = -(guided velocity) integrated over t
        def __init__(self):
            super().__init__()
            self.ts = []

        def forward(self, x, t, text_emb, text_mask):
            self.ts.append((float(t[0]), x.shape[0]))
            mean = (text_emb * text_mask[..., None]).sum((1, 2)) / (
                text_mask.sum(1) * text_emb.shape[2]
            )  # [B]
            return mean.view(-1, 1, 1, 1, 1).expand_as(x)

    emb, mask = torch.full((1, 2, 4), 2.0), torch.ones(1, 2, dtype=torch.bool)
    neg, neg_mask = torch.full((1, 3, 4), 0.5), torch.ones(1, 3, dtype=torch.bool)
    noise, w, steps = torch.zeros(1, 1, 1, 1, 1), 4.0, 10
    model = TextMean()
    out = sample(
        model,
        emb,
        mask,
        noise.shape,
        noise=noise,
        null_text_emb=neg,
        null_text_mask=neg_mask,
        cfg=w,
        steps=steps,
        guidance_interval=(0.25, 0.75),
    )
    guided_steps = [t for t, b in model.ts if b == 2]
    assert guided_steps and all(0.25 <= t <= 0.75 for t in guided_steps)
    # each step moves by dt * v: guided steps use 0.5 + w (2 - 0.5), the others the conditional 2
    grid = flow_timesteps(steps).tolist()
    expected = -sum(
        (a - b) * ((0.5 + w * 1.5) if 0.25 <= a <= 0.75 else 2.0)
        for a, b in zip(grid[:-1], grid[1:], strict=True)
    )
    assert torch.allclose(out, torch.full_like(out, expected), atol=1e-5)


# ----------------------------------------------------------------------------- conditioning frames


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m", "ddim"])
@pytest.mark.parametrize("kind", ["rectified_flow", "vp", "edm"])
def test_sampler_holds_conditioning_frames_exactly(sampler, kind):
    objective = {
        "rectified_flow": RectifiedFlow(FlowConfig()),
        "vp": VPDiffusion(VPConfig(target="v")),
        "edm": EDM(EDMConfig()),
    }[kind]
    if sampler in ("euler", "heun") and not objective.flow_path:
        pytest.skip("flow ODE samplers need a flow-path objective")
    g = torch.Generator().manual_seed(7)
    cond_latents = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    cond_mask = prefix_cond_mask(SHAPE[0], SHAPE[2], 1)  # image-to-video: frame 0 given
    cond_mask[1, 1] = True  # and an arbitrary extra frame in sample 1
    oracle = GaussianOracle(objective)
    out = sample(
        oracle,
        *_text(),
        SHAPE,
        noise=_noise(8),
        sampler=sampler,
        steps=6,
        cfg=1.0,
        objective=objective,
        cond_latents=cond_latents,
        cond_mask=cond_mask,
    )
    m = cond_mask[:, None, :, None, None].expand(SHAPE)
    assert torch.equal(out[m], cond_latents[m])  # bit-exact
    for x in oracle.inputs:  # the network saw the clean frames at every call
        assert torch.allclose(x[m], cond_latents[m], atol=1e-12)
    free = sample(
        GaussianOracle(objective),
        *_text(),
        SHAPE,
        noise=_noise(8),
        sampler=sampler,
        steps=6,
        cfg=1.0,
        objective=objective,
    )
    assert torch.isfinite(out).all() and not torch.allclose(out[m], free[m])


def test_sample_rejects_mismatched_sampler_and_arguments():
    emb, mask = _text(1)
    vp = VPDiffusion(VPConfig())
    with pytest.raises(ValueError, match="sampler='euler'.*'ddim' or 'dpmpp_2m'"):
        sample(GaussianOracle(vp), emb, mask, (1, 1, 1, 2, 2), objective=vp, cfg=1.0)
    with pytest.raises(ValueError, match="eta"):
        sample(
            GaussianOracle(vp), emb, mask, (1, 1, 1, 2, 2), objective=vp, sampler="dpmpp_2m", eta=0.5, cfg=1.0
        )
    with pytest.raises(ValueError, match="cond_latents"):
        sample(
            GaussianOracle(vp),
            emb,
            mask,
            (1, 1, 1, 2, 2),
            objective=vp,
            sampler="ddim",
            cfg=1.0,
            cond_mask=torch.ones(1, 1, dtype=torch.bool),
        )
    with pytest.raises(ValueError, match="timesteps"):
        sample(
            GaussianOracle(vp),
            emb,
            mask,
            (1, 1, 1, 2, 2),
            objective=vp,
            sampler="ddim",
            cfg=1.0,
            timesteps=torch.tensor([1.0, 0.5]),
        )
