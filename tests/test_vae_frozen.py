"""Causal VAE, frozen: latent normalisation, latent statistics, save/load."""

from __future__ import annotations

import hashlib

import pytest
import torch
from tiny_vae import shape_clips, tiny_vae

from dit_video.encoders import (
    CausalVAEConfig,
    CausalVideoAutoencoder,
    VideoAutoencoder,
    clip_to_video,
    compute_latent_stats,
    load_vae,
    save_vae,
)


def test_encode_decode_apply_the_normalisation_both_ways():
    vae = tiny_vae()
    shift, scale = torch.tensor([0.1, -0.2, 0.3, 0.0]), torch.tensor([2.0, 0.5, 1.5, 3.0])
    ae = CausalVideoAutoencoder(vae, shift, scale)
    video = clip_to_video(shape_clips(2, frames=5, size=16))
    with torch.no_grad():
        mean = vae.encode(video).mean
        expected_video = vae.decode(mean)
    latents = ae.encode(video)
    torch.testing.assert_close(latents, (mean - shift.view(1, -1, 1, 1, 1)) * scale.view(1, -1, 1, 1, 1))
    torch.testing.assert_close(ae.decode(latents), expected_video, atol=1e-5, rtol=1e-5)


def test_compute_latent_stats_normalises():
    vae = tiny_vae()
    clips = [shape_clips(4, frames=5, size=16, seed=s) for s in range(3)]
    shift, scale = compute_latent_stats(vae, clips)
    assert shift.shape == scale.shape == (4,)
    ae = CausalVideoAutoencoder(vae, shift, scale)
    latents = torch.cat([ae.encode(clip_to_video(c)) for c in clips])  # [12, C, T', H', W']
    per_channel = latents.transpose(0, 1).flatten(1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(per_channel.std(1, correction=0), torch.ones(4), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="uint8 clips"):
        compute_latent_stats(vae, [clip_to_video(clips[0])])


def test_save_load_round_trip(tmp_path):
    vae = tiny_vae(seed=3)
    shift, scale = torch.randn(4), torch.rand(4) + 0.5
    ae = CausalVideoAutoencoder(vae, shift, scale)
    weights = save_vae(tmp_path / "vae", vae, vae.config, shift, scale)
    assert sorted(p.name for p in (tmp_path / "vae").iterdir()) == [
        "vae.json",
        "vae.safetensors",
    ]  # no temp files
    loaded = load_vae(tmp_path / "vae")
    assert isinstance(loaded, VideoAutoencoder)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    loaded.train()  # a parent's .train() must not unfreeze it
    assert not loaded.vae.training
    video = clip_to_video(shape_clips(2, frames=5, size=16))
    latents = ae.encode(video)
    torch.testing.assert_close(loaded.encode(video), latents, atol=0, rtol=0)
    torch.testing.assert_close(loaded.decode(latents), ae.decode(latents), atol=0, rtol=0)
    ident = loaded.identity()
    assert ident["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert ident["config"]["temporal_factor"] == 4 and ident["weights"] == str(weights)
    # Loading the weights file directly works too.
    torch.testing.assert_close(load_vae(weights).encode(video), latents, atol=0, rtol=0)


def test_load_missing_vae_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*python train\.py \+experiment=vae_demo"):
        load_vae(tmp_path / "nowhere")


def test_save_rejects_mismatched_config(tmp_path):
    vae = tiny_vae()
    other = CausalVAEConfig(**{**vae.config.__dict__, "latent_channels": 8})
    with pytest.raises(ValueError, match="differs"):
        save_vae(tmp_path, vae, other, torch.zeros(4), torch.ones(4))

