"""Training our causal VAE beyond reconstruction: discriminator, adaptive weight, LPIPS, PSNR/SSIM,
and the vae_gan_demo experiment end to end (manual optimisation, validation, resume)."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from tiny_run import ROOT, compose_train
from tiny_vae import shape_clips

from dit_video.encoders import clip_to_video
from dit_video.encoders.causal_vae import VAE_PRESETS, CausalVAE, VAELoss, VAELossConfig, vae_loss
from dit_video.encoders.causal_vae.discriminator import (
    PatchDiscriminator3D,
    adaptive_weight,
    discriminator_hinge_loss,
    discriminator_non_saturating_loss,
    generator_adversarial_loss,
)
from dit_video.encoders.causal_vae.lpips import LPIPS, LPIPS_CHANNELS, load_lpips, lpips_state_from_official
from dit_video.metrics.image_metrics import gaussian_window, psnr, ssim

# ---------------------------------------------------------------------------------------------
# Discriminator and adversarial losses
# ---------------------------------------------------------------------------------------------


def test_patch_discriminator_gives_one_logit_per_spacetime_patch():
    disc = PatchDiscriminator3D(channels=8, layers=3)
    out = disc(torch.randn(2, 3, 17, 32, 32))
    # three stride-2 convs (kernel 3, padding 1): 17 -> 9 -> 5 -> 3, 32 -> 16 -> 8 -> 4
    assert out.shape == (2, 1, 3, 4, 4)
    assert disc(torch.randn(1, 3, 1, 32, 32)).shape == (1, 1, 1, 4, 4)  # an image still gets logits


def test_disc_losses_closed_form():
    ones = torch.ones(4)
    # hinge: real logits >= 1 and fake <= -1 cost nothing; zero logits cost 0.5 * (1 + 1)
    assert discriminator_hinge_loss(2 * ones, -2 * ones) == 0
    assert discriminator_hinge_loss(0 * ones, 0 * ones) == 1
    torch.testing.assert_close(discriminator_non_saturating_loss(0 * ones, 0 * ones), torch.tensor(math.log(2)))
    assert generator_adversarial_loss(3 * ones, "hinge") == -3
    torch.testing.assert_close(generator_adversarial_loss(0 * ones, "non_saturating"), torch.tensor(math.log(2)))


def test_adaptive_weight_is_the_gradient_norm_ratio_clamped():
    w = torch.randn(3, 4, requires_grad=True)
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    # d/dw sum(w * a) = a, so lambda = ||a|| / (||b|| + 1e-4)
    lam = adaptive_weight((w * a).sum(), (w * b).sum(), w)
    torch.testing.assert_close(lam, a.norm() / (b.norm() + 1e-4))
    assert not lam.requires_grad
    assert adaptive_weight((w * a).sum(), (w * b * 1e-9).sum(), w, max_weight=10.0) == 10.0


def _video(n=2, frames=5, size=32, seed=0):
    return clip_to_video(shape_clips(n, frames=frames, size=size, seed=seed))


def test_default_vae_loss_is_exactly_the_old_objective():
    torch.manual_seed(0)
    vae = CausalVAE(VAE_PRESETS["tiny"])
    video = _video()
    objective = VAELoss(VAELossConfig(kl_weight=1e-4, recon="l2"))
    assert objective.discriminator is None and objective.lpips is None
    assert sum(p.numel() for p in objective.parameters()) == 0  # nothing new in checkpoints
    loss, logs, _ = objective(vae, video, 0, torch.Generator().manual_seed(0))
    old, old_logs = vae_loss(vae, video, 1e-4, "l2", torch.Generator().manual_seed(0))
    assert torch.equal(loss, old) and set(logs) == set(old_logs)


def test_adversarial_term_starts_at_disc_start_and_trains_the_vae_only():
    torch.manual_seed(0)
    vae = CausalVAE(VAE_PRESETS["tiny"])
    video = _video()
    objective = VAELoss(VAELossConfig(disc_weight=1.0, disc_start=5, disc_channels=8))
    before, logs, _ = objective(vae, video, 4, torch.Generator().manual_seed(0))
    assert "g_adv" not in logs  # step 4 < disc_start: no adversarial term at all
    loss, logs, video_hat = objective(vae, video, 5, torch.Generator().manual_seed(0))
    assert {"g_adv", "adv_weight"} <= set(logs) and logs["adv_weight"] > 0
    torch.testing.assert_close(loss - before, logs["adv_weight"] * logs["g_adv"], atol=1e-5, rtol=1e-4)
    d_loss, d_logs = objective.discriminator_loss(video, video_hat)
    d_loss.backward()
    assert all(p.grad is None for p in vae.parameters())  # the reconstruction was detached
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in objective.discriminator.parameters())


def test_loss_config_errors_name_the_field():
    with pytest.raises(ValueError, match="vae.loss.lpips_path"):
        VAELossConfig(perceptual_weight=0.1).validate()
    with pytest.raises(ValueError, match="vae.loss.disc_loss"):
        VAELossConfig(disc_loss="wasserstein").validate()


# ---------------------------------------------------------------------------------------------
# LPIPS from one local file (random weights: no weights ship with the repository)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    state = LPIPS().state_dict()
    for i in range(len(LPIPS_CHANNELS)):
        state[f"heads.{i}.weight"] = torch.rand_like(state[f"heads.{i}.weight"])  # LPIPS heads are >= 0
    path = tmp_path_factory.mktemp("lpips") / "lpips_vgg.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path, state


def test_lpips_properties(lpips_file):
    path, state = lpips_file
    model = load_lpips(path)
    assert torch.equal(model.heads[2].weight, state["heads.2.weight"])  # every weight came from the file
    assert torch.equal(model.features[28].weight, state["features.28.weight"])
    assert all(not p.requires_grad for p in model.parameters()) and not model.train().training  # frozen
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    y = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    assert torch.equal(model(x, x), torch.zeros(2))
    torch.testing.assert_close(model(x, y), model(y, x))
    assert (model(x, y) > 0).all()
    y.requires_grad_(True)
    model(x, y).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0  # differentiable w.r.t. the image
    video_a, video_b = x.view(1, 3, 2, 32, 32), y.detach().view(1, 3, 2, 32, 32)
    per_frame = model(video_a.transpose(1, 2)[0], video_b.transpose(1, 2)[0])  # frames as a batch
    torch.testing.assert_close(model.video_distance(video_a, video_b), per_frame.mean().view(1))


def test_lpips_pth_and_official_key_names(lpips_file, tmp_path):
    _, state = lpips_file
    vgg = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    heads = {f"lin{i}.model.1.weight": state[f"heads.{i}.weight"] for i in range(len(LPIPS_CHANNELS))}
    torch.save(lpips_state_from_official(vgg, heads), tmp_path / "lpips.pth")
    model = load_lpips(tmp_path / "lpips.pth")
    assert torch.equal(model.heads[4].weight, state["heads.4.weight"])


def test_lpips_missing_or_wrong_file_names_the_field(tmp_path):
    with pytest.raises(FileNotFoundError, match="vae.loss.lpips_path"):
        load_lpips(tmp_path / "nope.safetensors")
    torch.save({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}, tmp_path / "vgg.pth")
    with pytest.raises(ValueError, match="vae.loss.lpips_path.*heads"):
        load_lpips(tmp_path / "vgg.pth")


def test_perceptual_term_enters_the_loss(lpips_file):
    torch.manual_seed(0)
    vae = CausalVAE(VAE_PRESETS["tiny"])
    video = _video(n=1)
    plain = VAELoss(VAELossConfig())
    with_lpips = VAELoss(VAELossConfig(perceptual_weight=0.5, lpips_path=str(lpips_file[0])))
    loss0, _, _ = plain(vae, video, 0, torch.Generator().manual_seed(0))
    loss1, logs, _ = with_lpips(vae, video, 0, torch.Generator().manual_seed(0))
    assert logs["perceptual"] > 0
    torch.testing.assert_close(loss1 - loss0, 0.5 * logs["perceptual"], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# PSNR / SSIM
# ---------------------------------------------------------------------------------------------


def test_psnr_closed_form():
    x = torch.zeros(2, 3, 5, 8, 8)
    # MSE 0.01 with a data range of 2: 10 log10(4 / 0.01) dB
    torch.testing.assert_close(psnr(x, x + 0.1), torch.full((2,), 10 * math.log10(400.0)))


def _ssim_reference(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    """SSIM of two 2-D images by direct sums over every 11x11 window (Wang et al. 2004)."""
    g = gaussian_window().numpy()
    w = np.outer(g, g)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            a, b = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
            ma, mb = (w * a).sum(), (w * b).sum()
            va, vb = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum()
            cov = (w * (a - ma) * (b - mb)).sum()
            vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_identity_constants_and_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 2, 16, 16, generator=g)  # [0, 1] images, data_range 1
    torch.testing.assert_close(ssim(x, x), torch.ones(2))
    # Constant images a and b: no variance, so SSIM = (2ab + C1) / (a^2 + b^2 + C1), C1 = (0.01 L)^2.
    for a, b, data_range in ((0.6, 0.3, 1.0), (150.0, 90.0, 255.0)):
        c1 = (0.01 * data_range) ** 2
        expected = (2 * a * b + c1) / (a * a + b * b + c1)
        got = ssim(torch.full((1, 3, 16, 16), a), torch.full((1, 3, 16, 16), b), data_range)
        torch.testing.assert_close(got, torch.tensor([expected]), rtol=1e-5, atol=1e-6)
    # Per channel and per frame, averaged: against direct window sums on each 2-D plane.
    y = (x + 0.15 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    ref = [np.mean([_ssim_reference(x[n, c, t].double().numpy(), y[n, c, t].double().numpy(), 1.0)
                    for c in range(3) for t in range(2)]) for n in range(2)]
    torch.testing.assert_close(ssim(x, y), torch.tensor(ref, dtype=torch.float32), rtol=1e-5, atol=1e-6)
    assert (ssim(x, y) < 1).all()
    with pytest.raises(ValueError, match="11x11"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


# ---------------------------------------------------------------------------------------------
# The vae_gan_demo experiment: manual optimisation, validation, checkpoints, resume
# ---------------------------------------------------------------------------------------------

TINY_VAE = ["vae.base_channels=8", "vae.channel_mult=[1,1,2]", "vae.norm_groups=4", "vae.loss.disc_channels=8"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae_gan_shards")
    subprocess.run([sys.executable, "-m", "data_prep.make_demo", "--out", str(out), "--num-clips", "16",
                    "--val-clips", "8", "--shard-size", "16"], cwd=ROOT, check=True, capture_output=True)
    return [f"data.shards={out}/train-*.tar", f"data.val_shards={out}/val-*.tar", "data.batch_size=4",
            "data.num_workers=0", "data.shuffle_buffer=8", "num_threads=1"]


def run_gan(shards, run_dir, steps, *extra):
    from dit_video.plots import read_metric
    from dit_video.run import train

    cfg = compose_train("+experiment=vae_gan_demo", *shards, *TINY_VAE, f"trainer.max_steps={steps}",
                        "vae.loss.disc_start=1", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
                        "optim.warmup_steps=3", "checkpoint_every=2", "vae_stats_batches=1", f"run_dir={run_dir}",
                        "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1",
                        "+trainer.enable_progress_bar=false", *extra)
    train(cfg)
    return read_metric(run_dir / "metrics.csv", "train/loss")


def test_vae_gan_demo_runs_validates_and_resumes_exactly(shards, tmp_path, monkeypatch):
    from dit_video.checkpoint.verify import load_checkpoint_file
    from dit_video.plots import read_metric

    monkeypatch.setenv("DIT_VIDEO_QUIET", "1")
    steps, losses = run_gan(shards, tmp_path / "full", 4)
    assert list(steps) == [0, 1, 2, 3]  # the discriminator's steps do not count as global steps
    d_steps, d_loss = read_metric(tmp_path / "full" / "metrics.csv", "train/d_loss")
    assert list(d_steps) == [1, 2, 3] and np.isfinite(d_loss).all()  # from disc_start = 1 on
    for name in ("val/psnr", "val/ssim", "val/rec_loss"):
        val_steps, values = read_metric(tmp_path / "full" / "metrics.csv", name)
        assert len(values) == 2 and np.isfinite(values).all(), name  # at steps 2 and 4
    ckpt = load_checkpoint_file(tmp_path / "full" / "checkpoints" / "step-00000002.ckpt")
    assert len(ckpt["optimizer_states"]) == 2 and len(ckpt["lr_schedulers"]) == 2
    assert any(k.startswith("objective.discriminator.") for k in ckpt["state_dict"])
    assert (tmp_path / "full" / "vae.safetensors").is_file()
    # Resume from step 2 in a fresh folder: steps 2 and 3 repeat the uninterrupted run's losses.
    ckpt_path = tmp_path / "full" / "checkpoints" / "step-00000002.ckpt"
    steps2, losses2 = run_gan(shards, tmp_path / "resumed", 4, f"ckpt_path={ckpt_path}")
    assert list(steps2) == [2, 3]
    torch.testing.assert_close(torch.tensor(losses2), torch.tensor(losses[2:]), rtol=1e-5, atol=1e-6)


def test_lpips_weights_stay_out_of_vae_checkpoints(lpips_file):
    from dit_video.lit_module import OptimConfig, VAEModule

    objective = VAELoss(VAELossConfig(perceptual_weight=0.1, lpips_path=str(lpips_file[0])))
    module = VAEModule(CausalVAE(VAE_PRESETS["tiny"]), objective, OptimConfig(), {})
    assert module.automatic_optimization  # no discriminator: Lightning's automatic path
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert not any(k.startswith("objective.lpips.") for k in checkpoint["state_dict"])
    assert any(k.startswith("vae.") for k in checkpoint["state_dict"])
    module.on_load_checkpoint(checkpoint)  # restored from the loaded file, so strict loading passes
    module.load_state_dict(checkpoint["state_dict"])


def test_missing_lpips_file_stops_the_run_naming_the_field(shards, tmp_path):
    from dit_video.errors import ConfigError
    from dit_video.run import train

    cfg = compose_train("+experiment=vae_gan_demo", *shards, "vae.loss.perceptual_weight=0.1",
                        f"vae.loss.lpips_path={tmp_path}/lpips.safetensors", f"run_dir={tmp_path}")
    with pytest.raises(ConfigError, match="vae.loss.lpips_path"):
        train(cfg)
