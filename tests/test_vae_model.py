"""Causal VAE: config validation, causality and shapes, the loss, a short training run."""

from __future__ import annotations

import pytest
import torch
from tiny_vae import shape_clips, tiny_vae

from dit_video.encoders import (
    VAE_PRESETS,
    CausalVAE,
    CausalVAEConfig,
    CausalVideoAutoencoder,
    VideoAutoencoder,
    clip_to_video,
    vae_loss,
)

# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def test_presets_validate():
    for name, cfg in VAE_PRESETS.items():
        assert cfg.validate() is cfg, name


@pytest.mark.parametrize(
    "change, field",
    [
        ({"temporal_factor": 3}, "temporal_factor"),
        ({"spatial_factor": 2}, "spatial_factor"),
        ({"channel_mult": (1, 2)}, "channel_mult"),
        ({"base_channels": 12}, "norm_groups"),
        ({"patch_size": 3}, "patch_size"),
    ],
)
def test_config_errors_name_the_field(change, field):
    cfg = CausalVAEConfig(**{**VAE_PRESETS["demo"].__dict__, **change})
    with pytest.raises(ValueError, match=field):
        cfg.validate()


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="latent_chanels"):
        CausalVAEConfig.from_dict({"latent_chanels": 4})


# ---------------------------------------------------------------------------------------------
# Causality and shapes
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def test_encoder_is_causal():
    vae = tiny_vae()
    tf = vae.config.temporal_factor
    video = torch.rand(2, 3, 1 + 3 * tf, 16, 16) * 2 - 1
    base = vae.encode(video).mean  # [B, C, 4, H', W']
    for k in range(1, video.shape[2]):
        changed = video.clone()
        changed[:, :, k] = torch.rand_like(changed[:, :, k]) * 2 - 1
        latents = vae.encode(changed).mean
        # Latent frame j covers input frames up to j*tf; those ending before k must not move.
        first_affected = -(-k // tf)  # ceil(k / tf)
        torch.testing.assert_close(
            latents[:, :, :first_affected], base[:, :, :first_affected], atol=1e-6, rtol=0
        )
        assert not torch.allclose(latents[:, :, first_affected], base[:, :, first_affected], atol=1e-4)


@torch.no_grad()
def test_decoder_is_causal():
    vae = tiny_vae()
    tf = vae.config.temporal_factor
    z = torch.randn(1, 4, 4, 4, 4)
    base = vae.decode(z)  # [1, 3, 1 + 3*tf, 16, 16]
    changed = z.clone()
    changed[:, :, 2] += 1.0
    out = vae.decode(changed)
    # Latent frame 2 decodes to frames 1 + tf .. 2*tf; everything before must stay put.
    torch.testing.assert_close(out[:, :, : 1 + tf], base[:, :, : 1 + tf], atol=1e-6, rtol=0)
    assert not torch.allclose(out[:, :, 1 + tf], base[:, :, 1 + tf], atol=1e-4)


@torch.no_grad()
def test_image_latent_equals_first_frame_latent():
    vae = tiny_vae()
    video = torch.rand(2, 3, 9, 16, 16) * 2 - 1
    from_video = vae.encode(video).mean[:, :, :1]  # [B, C, 1, H', W']
    from_image = vae.encode(video[:, :, :1]).mean  # [B, C, 1, H', W']
    torch.testing.assert_close(from_image, from_video, atol=1e-5, rtol=1e-5)
    # And the decoder maps one latent frame to one frame.
    assert vae.decode(from_image).shape == (2, 3, 1, 16, 16)


def test_wrong_frame_count_error_names_the_rule():
    ae = CausalVideoAutoencoder(tiny_vae(), torch.zeros(4), torch.ones(4))
    with pytest.raises(ValueError, match=r"num_frames=16 must be 1 \+ k\*4 for this VAE \(e\.g\. 17"):
        ae.encode(torch.zeros(1, 3, 16, 16, 16))
    with pytest.raises(ValueError, match=r"num_frames=16 must be 1 \+ k\*4"):
        ae.latent_shape(16, 32, 32)
    with pytest.raises(ValueError, match="height=30 must be a positive multiple of spatial_factor=4"):
        ae.latent_shape(17, 30, 32)


@pytest.mark.parametrize("frames, size", [(1, 16), (5, 16), (9, 24)])
def test_latent_shape_matches_encode(frames, size):
    ae = CausalVideoAutoencoder(tiny_vae(), torch.zeros(4), torch.ones(4))
    assert isinstance(ae, VideoAutoencoder)
    latents = ae.encode(torch.zeros(1, 3, frames, size, size))
    assert tuple(latents.shape[2:]) == ae.latent_shape(frames, size, size)
    assert latents.shape[1] == ae.latent_channels
    assert ae.decode(latents).shape == (1, 3, frames, size, size)


def test_config_variants_round_trip_shapes():
    for cfg in (
        CausalVAEConfig(base_channels=8, channel_mult=(1, 1, 1), patch_size=2, norm_groups=4),  # tf 4, sf 4
        CausalVAEConfig(base_channels=8, channel_mult=(1, 1, 1), temporal_factor=2, norm_groups=4),
        CausalVAEConfig(base_channels=8, channel_mult=(1, 1, 1), norm_groups=4, shortcuts=False),
    ):
        vae = CausalVAE(cfg).eval()
        frames = 1 + 2 * cfg.temporal_factor
        with torch.no_grad():
            z = vae.encode(torch.zeros(1, 3, frames, 16, 16)).mean
            assert z.shape == (1, 4, 3, 4, 4)
            assert vae.decode(z).shape == (1, 3, frames, 16, 16)



# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _psnr(vae: CausalVAE, video: torch.Tensor) -> float:
    with torch.no_grad():
        recon = vae.decode(vae.encode(video).mean).clamp(-1, 1)
    return float(10 * torch.log10(4 / (recon - video).pow(2).mean()))


def test_vae_loss_logs_and_kl_weight():
    vae = tiny_vae().train()
    video = clip_to_video(shape_clips(2, frames=5, size=16))
    gen = torch.Generator().manual_seed(0)
    loss0, logs = vae_loss(vae, video, kl_weight=0.0, recon="l2", generator=gen)
    gen.manual_seed(0)
    loss1, _ = vae_loss(vae, video, kl_weight=1.0, recon="l2", generator=gen)
    assert set(logs) == {"recon", "kl", "psnr"}
    torch.testing.assert_close(loss0, logs["recon"])
    torch.testing.assert_close(loss1 - loss0, logs["kl"], atol=1e-5, rtol=1e-4)
    gen.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the training precision on CPU
        loss_bf16, _ = vae_loss(vae, video, kl_weight=0.0, recon="l2", generator=gen)
    assert loss_bf16.dtype == torch.float32
    torch.testing.assert_close(loss_bf16, loss0, rtol=0.05, atol=0)
    with pytest.raises(ValueError, match="recon"):
        vae_loss(vae, video, 0.0, recon="l3")


def test_short_training_run_improves_psnr():
    # 25 fp32 steps of the tiny preset on 16x16, 5-frame shape clips: from noise (~8 dB) to the
    # dark background plus blurry shapes (~14 dB). A broken gradient path leaves it near 8 dB.
    torch.manual_seed(0)
    vae = CausalVAE(VAE_PRESETS["tiny"])
    val = clip_to_video(shape_clips(8, frames=5, size=16, seed=999))
    before = _psnr(vae.eval(), val)
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for step in range(25):
        video = clip_to_video(shape_clips(4, frames=5, size=16, seed=step))
        loss, logs = vae_loss(vae, video, kl_weight=1e-4, recon="l2", generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    after = _psnr(vae.eval(), val)
    assert after > before + 4.0, (before, after)

