"""Rectified flow objective and the Euler CFG sampler."""

import math

import pytest
import torch

from dit_video.diffusion import FlowConfig, RectifiedFlow, flow_timesteps, sample, shift_time


class LinearDenoiser(torch.nn.Module):
    """v = a * x + b * mean(text): analytic, so samples are checkable in closed form."""

    def __init__(self, a: float = 0.5, b: float = 0.0):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x, t, text_emb, text_mask):
        cond = (text_emb * text_mask[..., None]).sum(1).mean(-1) / text_mask.sum(1)  # [B]
        return self.a * x + self.b * cond.view(-1, 1, 1, 1, 1)


def test_shift_time_endpoints_and_monotone():
    t = torch.linspace(0, 1, 101)
    for s in (0.5, 1.0, 3.0, 7.0):
        ts = shift_time(t, s)
        assert ts[0] == 0 and torch.isclose(ts[-1], torch.tensor(1.0))
        assert torch.all(ts[1:] >= ts[:-1])
    assert torch.all(shift_time(t[1:-1], 3.0) > t[1:-1])  # s > 1 moves steps towards noise


def test_flow_timesteps_run_from_noise_to_data():
    ts = flow_timesteps(10, shift=2.0)
    assert ts.shape == (11,) and ts[0] == 1.0 and ts[-1] == 0.0
    assert torch.all(ts[1:] < ts[:-1])


@pytest.mark.parametrize("sampling", ["logit_normal", "uniform"])
def test_sample_t_in_open_unit_interval(sampling):
    flow = RectifiedFlow(FlowConfig(timestep_sampling=sampling))
    t = flow.sample_t(4096, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert t.min() > 0 and t.max() < 1
    assert abs(float(t.mean()) - 0.5) < 0.02  # both are symmetric around 1/2 with m = 0


def test_logit_normal_concentrates_mass_in_the_middle():
    g = torch.Generator().manual_seed(0)
    t = RectifiedFlow(FlowConfig()).sample_t(20000, torch.device("cpu"), g)
    middle = ((t > 0.25) & (t < 0.75)).float().mean()
    assert middle > 0.6  # uniform would give 0.5; N(0,1) in logit space gives ~0.71


def test_loss_is_zero_for_the_exact_velocity():
    torch.manual_seed(0)
    latents = torch.randn(3, 4, 2, 4, 4)

    class Oracle(torch.nn.Module):  # knows x0, so v = (x_t - x0) / t  = eps - x0
        def forward(self, x, t, text_emb, text_mask):
            return (x - latents) / t.view(-1, 1, 1, 1, 1)

    flow = RectifiedFlow(FlowConfig())
    loss, aux = flow.loss(Oracle(), latents, torch.zeros(3, 2, 8), torch.ones(3, 2, dtype=torch.bool))
    assert loss < 1e-8 and aux["loss_per_sample"].shape == (3,) and aux["t"].shape == (3,)


def test_bad_objective_config_names_the_field():
    with pytest.raises(ValueError, match="objective.timestep_sampling"):
        RectifiedFlow(FlowConfig(timestep_sampling="cosine"))
    with pytest.raises(ValueError, match="objective.caption_dropout"):
        RectifiedFlow(FlowConfig(caption_dropout=1.5))


def _text(b, length=5, dim=8):
    emb = torch.randn(b, length, dim, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(b, length, dtype=torch.bool)
    return emb, mask


def test_sampler_shape_and_determinism():
    model = LinearDenoiser(0.3, 0.2)
    emb, mask = _text(2)
    null_emb, null_mask = torch.zeros(1, 2, 8), torch.ones(1, 2, dtype=torch.bool)
    kwargs = dict(null_text_emb=null_emb, null_text_mask=null_mask, steps=8, cfg=4.0)
    a = sample(model, emb, mask, (2, 4, 3, 6, 5), generator=torch.Generator().manual_seed(7), **kwargs)
    b = sample(model, emb, mask, (2, 4, 3, 6, 5), generator=torch.Generator().manual_seed(7), **kwargs)
    c = sample(model, emb, mask, (2, 4, 3, 6, 5), generator=torch.Generator().manual_seed(8), **kwargs)
    assert a.shape == (2, 4, 3, 6, 5)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_euler_matches_closed_form_for_linear_velocity():
    # dx/dt = a x integrated from t=1 to 0 gives x0 = x1 * exp(-a); Euler with n steps gives (1 - a/n)^n.
    a, n = 0.5, 50
    noise = torch.randn(1, 1, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    emb, mask = _text(1)
    out = sample(LinearDenoiser(a), emb, mask, noise.shape, noise=noise, steps=n, cfg=1.0)
    assert torch.allclose(out, noise * (1 - a / n) ** n, atol=1e-6)
    assert torch.allclose(out, noise * math.exp(-a), atol=5e-3)


def test_cfg_extrapolates_between_conditional_and_unconditional():
    # with b != 0 the velocity depends on the text; guidance scale w gives v_u + w (v_c - v_u)
    emb, mask = _text(1)
    null_emb, null_mask = torch.zeros(1, 3, 8), torch.ones(1, 3, dtype=torch.bool)
    noise = torch.zeros(1, 1, 1, 1, 1)
    model = LinearDenoiser(0.0, 1.0)  # v = mean(text): constant in x, so x0 = -v
    c = float((emb * mask[..., None]).sum(1).mean(-1) / mask.sum(1))
    for w in (1.0, 3.0):
        out = sample(model, emb, mask, noise.shape, noise=noise, null_text_emb=null_emb,
                     null_text_mask=null_mask, steps=4, cfg=w)
        assert torch.allclose(out, torch.full_like(out, -(0 + w * (c - 0))), atol=1e-6)


def test_sampler_errors_are_clear():
    emb, mask = _text(1)
    with pytest.raises(ValueError, match="sampler='heun2'"):
        sample(LinearDenoiser(), emb, mask, (1, 1, 1, 1, 1), sampler="heun2", cfg=1.0)
    with pytest.raises(ValueError, match="null_text_emb"):
        sample(LinearDenoiser(), emb, mask, (1, 1, 1, 1, 1), cfg=3.0)
