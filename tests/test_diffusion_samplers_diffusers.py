"""Samplers against diffusers (the reference), network evaluation by network evaluation, on the
exact denoiser of Gaussian data (tests/gaussian_oracle.py).

Convention mapping to diffusers (read from diffusers 0.42 sources):
  * flow schedulers: diffusers' sigma is our t; the network gets timestep = sigma * 1000 (int64
    in DPMSolverMultistep), so the test denoiser reads sigma from the scheduler, not the timestep.
  * VP schedulers: integer timestep i is our t = (i + 1) / N; abar = 1 (set_alpha_to_one /
    final_sigmas_type="zero") is our t = 0.
  * diffusers upcasts samples to float32 inside step() and keeps its tables in float32, so the
    two trajectories agree to float32 precision, far inside the 1e-5 tolerance.
"""

import pytest
import torch
from gaussian_oracle import SHAPE, _noise, gaussian_x0_eps, ours

from dit_video.diffusion import (
    FlowConfig,
    GuidedModel,
    RectifiedFlow,
    VPConfig,
    VPDiffusion,
    flow_timesteps,
    shift_time,
    vp_timesteps,
)

diffusers = pytest.importorskip("diffusers")


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
