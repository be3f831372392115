"""Samplers against the exact probability-flow ODE solution for Gaussian data
(tests/gaussian_oracle.py): convergence at each sampler's order, CFG with a negative prompt and
a guidance interval, conditioning frames held exactly, and argument checks."""

import math

import pytest
import torch
from gaussian_oracle import SHAPE, GaussianOracle, _noise, _text, exact_pf_ode, ours

from dit_video.diffusion import (
    EDM,
    EDMConfig,
    FlowConfig,
    RectifiedFlow,
    VPConfig,
    VPDiffusion,
    flow_timesteps,
    prefix_cond_mask,
    sample,
)

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
