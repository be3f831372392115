"""Objectives: schedules against diffusers' tables, timestep samplers, weightings, conditioning frames."""

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from dit_video.diffusion import (
    EDM,
    EDMConfig,
    FlowConfig,
    RectifiedFlow,
    VPConfig,
    VPDiffusion,
    build_objective,
    draw_cond_mask,
    edm_preconditioning,
    loss_by_t_bucket,
    prefix_cond_mask,
    sample,
    sample_timesteps,
    shift_time,
    t_bucket_names,
    token_shift,
    vp_alpha_sigma,
    vp_alphas_cumprod,
)
from dit_video.diffusion.weighting import temporal_difference_mse

CONF = Path(__file__).resolve().parents[1] / "conf" / "objective"

# ----------------------------------------------------------------------------- schedules


@pytest.mark.parametrize(
    "schedule,diffusers_name",
    [("linear", "linear"), ("scaled_linear", "scaled_linear"), ("cosine", "squaredcos_cap_v2")],
)
@pytest.mark.parametrize("zero_snr", [False, True])
def test_vp_tables_match_diffusers(schedule, diffusers_name, zero_snr):
    diffusers = pytest.importorskip("diffusers")
    kw = dict(beta_start=0.00085, beta_end=0.012) if schedule == "scaled_linear" else {}
    ref = diffusers.DDPMScheduler(beta_schedule=diffusers_name, rescale_betas_zero_snr=zero_snr, **kw)
    ours = vp_alphas_cumprod(schedule, 1000, zero_terminal_snr=zero_snr, **kw)
    # diffusers builds the table in float32; ours is float64: they agree to float32 rounding
    assert torch.allclose(ours, ref.alphas_cumprod.double(), atol=1e-6, rtol=0)
    alpha, sigma = vp_alpha_sigma((torch.arange(1000, dtype=torch.float64) + 1) / 1000, ours)
    # compared squared: sqrt would amplify float32 rounding where abar -> 1
    assert torch.allclose(alpha**2, ref.alphas_cumprod.double(), atol=1e-6, rtol=0)
    assert torch.allclose(sigma**2, 1 - ref.alphas_cumprod.double(), atol=1e-6, rtol=0)
    if zero_snr:
        assert ours[-1] == 0.0 and abs(ours[0] - vp_alphas_cumprod(schedule, 1000, **kw)[0]) < 1e-12


def test_vp_alpha_sigma_is_exact_on_the_grid_and_clean_at_zero():
    table = vp_alphas_cumprod("linear")
    a, s = vp_alpha_sigma(torch.tensor([0.0, 0.001, 0.5, 1.0], dtype=torch.float64), table)
    assert a[0] == 1 and s[0] == 0
    assert torch.allclose(a[1:] ** 2, table[[0, 499, 999]], atol=1e-14)
    assert torch.allclose(a**2 + s**2, torch.ones(4, dtype=torch.float64))


def test_edm_preconditioning_equals_karras_table_1():
    sd = 0.5
    t = torch.tensor([0.05, 0.3, 0.5, 0.9], dtype=torch.float64)
    sigma = t / (1 - t)  # x_sigma = x_t / (1 - t)
    c_in, c_skip, c_out = edm_preconditioning(t, sd)
    assert torch.allclose(c_in * (1 - t), 1 / torch.sqrt(sigma**2 + sd**2))  # c_in x_sigma = c_in' x_t
    assert torch.allclose(c_skip * (1 - t), sd**2 / (sigma**2 + sd**2))
    assert torch.allclose(c_out, sigma * sd / torch.sqrt(sigma**2 + sd**2))
    ends = edm_preconditioning(torch.tensor([0.0, 1.0], dtype=torch.float64), sd)
    assert all(torch.isfinite(c).all() for c in ends)  # finite at sigma = 0 and sigma = inf


# ----------------------------------------------------------------------------- timestep sampling


def test_mode_sampling_matches_sd3_and_is_uniform_at_zero_scale():
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps("mode", 50000, mode_scale=0.0, generator=g)
    assert abs(float(t.mean()) - 0.5) < 0.01 and abs(float(t.var()) - 1 / 12) < 0.003
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps("mode", 50000, mode_scale=1.29, generator=g)
    middle = ((t > 0.25) & (t < 0.75)).float().mean()
    assert t.min() >= 0 and t.max() <= 1 and middle > 0.6  # s > 0 concentrates mass mid-range


def test_logit_normal_mean_moves_mass_to_noise():
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps("logit_normal", 20000, logit_mean=1.0, generator=g)
    assert float(t.median()) == pytest.approx(1 / (1 + math.exp(-1.0)), abs=0.01)  # median = sigmoid(mean)


def test_token_shift_gives_each_sample_its_own_shift():
    flow = RectifiedFlow(FlowConfig(timestep_sampling="uniform", shift=2.0, shift_base_tokens=256))
    tokens = torch.tensor([256, 1024, 4096])
    shifts = flow.shift_for(tokens)
    assert torch.allclose(
        shifts, torch.tensor([2.0, 4.0, 8.0], dtype=torch.float64)
    )  # shift * sqrt(n / base)
    assert token_shift(1024, 2.0, 256) == 4.0
    u = torch.rand(3, generator=torch.Generator().manual_seed(1))
    t = flow.sample_t(3, torch.device("cpu"), torch.Generator().manual_seed(1), num_tokens=tokens)
    assert torch.allclose(t.double(), shift_time(u.double(), shifts), atol=1e-6)
    # default token count: T*H*W / prod(patch_size) of the latents
    assert flow.num_tokens(torch.zeros(2, 4, 4, 16, 16)).tolist() == [256, 256]


# ----------------------------------------------------------------------------- losses and weighting


def _objectives():
    return [
        RectifiedFlow(FlowConfig()),
        RectifiedFlow(FlowConfig(target="x0")),
        RectifiedFlow(FlowConfig(target="eps")),
        VPDiffusion(VPConfig()),
        VPDiffusion(VPConfig(target="v", beta_schedule="cosine", zero_terminal_snr=True)),
        VPDiffusion(VPConfig(target="x0")),
        EDM(EDMConfig()),
    ]


class Oracle(torch.nn.Module):
    """Knows x_0 and eps, so it returns the exact target of any objective; records its inputs."""

    def __init__(self, objective, latents, noise):
        super().__init__()
        self.objective, self.latents, self.noise, self.inputs = objective, latents, noise, []

    def forward(self, x_in, t, text_emb, text_mask):
        self.inputs.append(x_in)
        x_t = self.objective.add_noise(self.latents, self.noise, t)
        return self.objective.target(self.latents, self.noise, x_t, t)


@pytest.mark.parametrize("objective", _objectives(), ids=lambda o: f"{o.kind}-{o.cfg.target}")
@pytest.mark.parametrize("weighting", ["none", "min_snr", "objective"])
def test_loss_is_zero_for_the_exact_prediction(objective, weighting):
    objective.cfg.loss_weighting = weighting
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 4, 2, 4, 4, generator=g)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    text = (torch.zeros(3, 2, 8), torch.ones(3, 2, dtype=torch.bool))
    loss, aux = objective.loss(
        Oracle(objective, latents, noise), latents, *text, generator=torch.Generator().manual_seed(1)
    )
    assert loss < 1e-8 and aux["loss_per_sample"].shape == (3,) and aux["t"].shape == (3,)


def test_prediction_round_trips_to_x0_and_eps():
    g = torch.Generator().manual_seed(0)
    x0, eps = (
        torch.randn(4, 2, 2, 3, 3, generator=g, dtype=torch.float64),
        torch.randn(4, 2, 2, 3, 3, generator=g, dtype=torch.float64),
    )
    t = torch.tensor([0.1, 0.4, 0.7, 0.95], dtype=torch.float64)
    for obj in _objectives():
        x_t = obj.add_noise(x0, eps, t)
        pred = obj.target(x0, eps, x_t, t)
        got_x0, got_eps = obj.predict_x0_eps(pred, x_t, t)
        assert torch.allclose(got_x0, x0, atol=1e-9) and torch.allclose(got_eps, eps, atol=1e-9), (
            obj.cfg.target
        )


def test_weightings_have_their_closed_forms():
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    vp_eps = VPDiffusion(VPConfig(loss_weighting="min_snr", min_snr_gamma=5.0))
    snr = vp_eps.snr(t)
    assert torch.allclose(vp_eps.loss_weight(t), snr.clamp(max=5) / snr)  # Hang et al. eq. for eps
    vp_v = VPDiffusion(VPConfig(target="v", loss_weighting="min_snr"))
    assert torch.allclose(vp_v.loss_weight(t), snr.clamp(max=5) / (snr + 1))  # ... and for v
    vp_v.cfg.loss_weighting = "objective"  # eps-MSE expressed on v: |d eps / d v|^2 = alpha^2
    assert torch.allclose(vp_v.loss_weight(t), vp_v.alpha_sigma(t)[0] ** 2)
    flow = RectifiedFlow(FlowConfig(loss_weighting="min_snr"))
    assert torch.allclose(flow.loss_weight(t), (((1 - t) / t) ** 2).clamp(max=5) * t**2)
    edm = EDM(EDMConfig(loss_weighting="objective"))
    assert torch.allclose(edm.loss_weight(t), torch.ones_like(t))  # lambda(sigma) c_out^2 = 1


def test_loss_by_t_bucket_means_and_names():
    t = torch.tensor([0.05, 0.07, 0.55, 0.99, 1.0])
    loss = torch.tensor([1.0, 3.0, 5.0, 7.0, 9.0])
    mean, count = loss_by_t_bucket(t, loss, 10)
    assert count.tolist() == [2, 0, 0, 0, 0, 1, 0, 0, 0, 2]
    assert mean[0] == 2.0 and mean[5] == 5.0 and mean[9] == 8.0 and torch.isnan(mean[1])
    assert t_bucket_names(10)[0] == "train/loss_t0-0.1" and len(t_bucket_names(4)) == 4


# ----------------------------------------------------------------------------- conditioning frames


def test_draw_cond_mask_modes_and_probabilities():
    g = torch.Generator().manual_seed(0)
    m = draw_cond_mask(20000, 5, p_first_frame=0.2, p_prefix=0.3, p_random=0.1, generator=g)
    assert not m.all(1).any()  # something is always left to generate
    first_only = m[:, 0] & ~m[:, 1:].any(1)
    none = ~m.any(1)
    # prefix masks with k = 1 also look like first-frame masks: 0.2 + 0.3 / 4 (+ random masks of frame 0 only)
    assert abs(float(first_only.float().mean()) - (0.2 + 0.3 / 4 + 0.1 * 0.5**5)) < 0.015
    assert abs(float(none.float().mean()) - (0.4 + 0.1 * 0.5**5)) < 0.015
    is_prefix = torch.stack([(row == prefix_cond_mask(1, 5, int(row.sum()))[0]).all() for row in m[:200]])
    assert is_prefix.float().mean() > 0.5
    assert not draw_cond_mask(8, 1, p_first_frame=1.0).any()  # images are never conditioned


@pytest.mark.parametrize("objective", _objectives(), ids=lambda o: f"{o.kind}-{o.cfg.target}")
def test_conditioning_frames_stay_clean_and_leave_the_loss(objective):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 3, 4, 2, 2, generator=g)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    text = (torch.zeros(2, 2, 8), torch.ones(2, 2, dtype=torch.bool))
    cond_mask = torch.tensor([[True, False, False, False], [True, True, False, True]])

    class WrongOnCondFrames(Oracle):  # exact on generated frames, garbage on given ones
        def forward(self, x_in, t, text_emb, text_mask):
            out = super().forward(x_in, t, text_emb, text_mask)
            return torch.where(cond_mask[:, None, :, None, None], out + 100.0, out)

    model = WrongOnCondFrames(objective, latents, noise)
    loss, aux = objective.loss(
        model, latents, *text, generator=torch.Generator().manual_seed(1), cond_mask=cond_mask
    )
    assert loss < 1e-8  # the garbage on given frames is not in the loss
    x_t = objective.add_noise(latents, noise, aux["t"])
    x_in = model.inputs[0]
    m = cond_mask[:, None, :, None, None].expand_as(latents)
    assert torch.allclose(x_in[m], objective.model_input(latents, aux["t"])[m])  # given frames are clean
    assert torch.allclose(x_in[~m], objective.model_input(x_t, aux["t"])[~m])  # the others are noised


def test_cond_probabilities_draw_masks_inside_the_loss():
    flow = RectifiedFlow(FlowConfig(cond_first_frame=1.0))
    latents = torch.randn(3, 2, 3, 2, 2)
    text = (torch.zeros(3, 2, 8), torch.ones(3, 2, dtype=torch.bool))
    _, aux = flow.loss(lambda x, t, e, m: torch.zeros_like(x), latents, *text)
    assert aux["cond_mask"].tolist() == [[True, False, False]] * 3
    _, aux = RectifiedFlow(FlowConfig()).loss(lambda x, t, e, m: torch.zeros_like(x), latents, *text)
    assert aux["cond_mask"] is None  # default: text-to-video, and the RNG stream of the first API


class TinyNet(torch.nn.Module):
    """A tiny fixed-size network: per-voxel MLP over (x, t), plus a temporal conv to see given frames."""

    def __init__(self, c=2):
        super().__init__()
        self.temporal = torch.nn.Conv3d(c, 16, (3, 1, 1), padding=(1, 0, 0))
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(16 + c + 1, 32), torch.nn.SiLU(), torch.nn.Linear(32, c)
        )

    def forward(self, x, t, text_emb, text_mask):
        h = self.temporal(x)  # [B, 16, T, H, W]
        tt = t.view(-1, 1, 1, 1, 1).expand(x.shape[0], 1, *x.shape[2:]).to(x.dtype)
        z = torch.cat([h, x, tt], 1).movedim(1, -1)  # [B, T, H, W, 16 + C + 1]
        return self.mlp(z).movedim(-1, 1)  # [B, C, T, H, W]


@pytest.mark.parametrize("mode", ["image_to_video", "extension", "random"])
def test_each_conditioning_mode_trains_and_its_frames_come_back_exactly(mode):
    torch.manual_seed(0)
    probs = {
        "image_to_video": dict(cond_first_frame=1.0),
        "extension": dict(cond_prefix=1.0),
        "random": dict(cond_random=1.0),
    }[mode]
    flow = RectifiedFlow(FlowConfig(caption_dropout=0.0, **probs))
    net = TinyNet()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    # "video" data: a constant-in-time random pattern, so given frames predict the rest
    data = torch.randn(64, 2, 1, 2, 2).expand(-1, -1, 4, -1, -1).contiguous()
    text = (torch.zeros(16, 1, 4), torch.ones(16, 1, dtype=torch.bool))
    losses = []
    for _ in range(60):
        batch = data[torch.randint(0, 64, (16,))]
        loss, aux = flow.loss(net, batch, *text)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if mode != "random":  # random masking may give no frame (probability 0.5^T)
            assert aux["cond_mask"].any(1).all()  # every sample had given frames
    assert sum(losses[-10:]) < sum(losses[:10])
    cond_latents = data[:2]
    cond_mask = draw_cond_mask(
        2,
        4,
        **{
            "image_to_video": dict(p_first_frame=1.0),
            "extension": dict(p_prefix=1.0),
            "random": dict(p_random=1.0),
        }[mode],
    )
    out = sample(
        net,
        text[0][:2],
        text[1][:2],
        (2, 2, 4, 2, 2),
        cfg=1.0,
        steps=8,
        cond_latents=cond_latents,
        cond_mask=cond_mask,
        generator=torch.Generator().manual_seed(0),
    )
    m = cond_mask[:, None, :, None, None].expand_as(out)
    assert torch.equal(out[m], cond_latents[m])


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_objective_yaml_builds(path):
    values = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    values = {k: v for k, v in values.items() if not (isinstance(v, str) and v.startswith("${"))}
    objective = build_objective(values)
    assert objective.kind == values.get("kind", "rectified_flow")


def test_build_objective_names_bad_fields():
    with pytest.raises(ValueError, match="objective.kind='ddpm'"):
        build_objective({"kind": "ddpm"})
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['sigma_data'\]"):
        build_objective({"kind": "vp", "sigma_data": 0.5})
    with pytest.raises(ValueError, match="objective.target='velocity'"):
        build_objective({"kind": "vp", "target": "velocity"})
    with pytest.raises(ValueError, match="objective.zero_terminal_snr"):
        build_objective({"kind": "vp", "zero_terminal_snr": True})
    with pytest.raises(ValueError, match="objective.loss_weighting"):
        build_objective({"loss_weighting": "snr"})
    with pytest.raises(ValueError, match="objective.cond_first_frame"):
        build_objective({"cond_first_frame": 0.7, "cond_prefix": 0.5})
    with pytest.raises(ValueError, match="objective.kind='vp'"):
        RectifiedFlow(FlowConfig(kind="vp"))  # a VP config cannot silently build a flow


def test_temporal_difference_loss_scores_frame_changes_only():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 5, 4, 4, generator=g)  # [B, C, T, H, W]
    assert temporal_difference_mse(x0 + torch.randn(2, 4, 1, 4, 4, generator=g), x0).max() < 1e-10  # same error every frame
    still = x0[:, :, :1].expand_as(x0)  # the first frame held: every change lost
    expected = (x0[:, :, 1:] - x0[:, :, :-1]).pow(2).flatten(1).mean(1)  # [B]
    torch.testing.assert_close(temporal_difference_mse(still, x0), expected)


def test_temporal_weight_adds_the_x0_frame_change_error_to_the_loss():
    latents = torch.randn(3, 4, 5, 4, 4, generator=torch.Generator().manual_seed(0))
    text = (torch.zeros(3, 2, 8), torch.ones(3, 2, dtype=torch.bool))

    def still_model(x_in, t, text_emb, text_mask):  # predicts a velocity whose x_0 has no motion
        return x_in - x_in[:, :, :1]

    base, aux = RectifiedFlow(FlowConfig()).loss(still_model, latents, *text, generator=torch.Generator().manual_seed(1))
    flow = RectifiedFlow(FlowConfig(temporal_weight=2.0))
    with_term, aux_t = flow.loss(still_model, latents, *text, generator=torch.Generator().manual_seed(1))
    t = aux["t"].view(-1, 1, 1, 1, 1)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))  # loss's first draw
    x_t = (1 - t) * latents + t * noise
    x0_pred = x_t - t * still_model(x_t, None, None, None)  # [B, C, T, H, W]
    term = temporal_difference_mse(x0_pred, latents)  # [B], > 0: the model's clips do not move
    assert term.min() > 0.1
    torch.testing.assert_close(aux_t["loss_per_sample"], aux["loss_per_sample"] + 2.0 * term)
    torch.testing.assert_close(with_term, base + 2.0 * term.mean())
    with pytest.raises(ValueError, match="temporal_weight"):
        RectifiedFlow(FlowConfig(temporal_weight=-1.0))
    with pytest.raises(ValueError, match="per_frame_t"):
        RectifiedFlow(FlowConfig(temporal_weight=1.0, per_frame_t=True))
    with pytest.raises(ValueError, match="data.packing"):
        flow.loss_packed(still_model, [latents[0]], *text)
