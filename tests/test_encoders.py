"""Encoders: causal VAE properties, latent normalisation, save/load, a short training run, MiniLM."""

from __future__ import annotations

import hashlib
import logging
import math
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # these tests must never reach for the network

from dit_video.encoders import (  # noqa: E402
    VAE_PRESETS,
    CausalVAE,
    CausalVAEConfig,
    CausalVideoAutoencoder,
    HFTextEncoder,
    TextEncoder,
    VideoAutoencoder,
    clip_to_video,
    compute_latent_stats,
    load_vae,
    minilm_path,
    save_vae,
    vae_loss,
)
from dit_video.encoders.causal_vae import CausalConv3d, TilingConfig  # noqa: E402

COLOURS = np.array([[230, 40, 40], [40, 200, 60], [50, 90, 235], [240, 220, 40], [220, 60, 220]], np.uint8)


def shape_clips(n: int, frames: int = 17, size: int = 32, seed: int = 0) -> torch.Tensor:
    """uint8 clips [n, frames, size, size, 3]: one solid square or disc of a saturated colour,
    moving in a straight line over a dark background (the demo's kind of data)."""
    rng = np.random.default_rng(seed)
    clips = np.zeros((n, frames, size, size, 3), np.uint8)
    yy, xx = np.mgrid[:size, :size] + 0.5
    for i in range(n):
        clips[i] = rng.integers(0, 30)
        r = rng.uniform(size / 8, size / 5)
        pos, vel = rng.uniform(r, size - r, 2), rng.uniform(-1.5, 1.5, 2) * size / 32
        colour, disc = COLOURS[rng.integers(len(COLOURS))], rng.random() < 0.5
        for t in range(frames):
            cy, cx = pos + t * vel
            if disc:
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            else:
                mask = (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
            clips[i, t][mask] = colour
    return torch.from_numpy(clips)


def tiny_vae(seed: int = 0) -> CausalVAE:
    torch.manual_seed(seed)
    return CausalVAE(VAE_PRESETS["tiny"]).eval()


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
# Tiled / chunked encode and decode
# ---------------------------------------------------------------------------------------------

CHUNK_CONFIGS = [
    VAE_PRESETS["tiny"],  # tf 4, sf 4
    CausalVAEConfig(base_channels=8, channel_mult=(1, 1, 2), temporal_factor=4, spatial_factor=8, patch_size=2,
                    norm_groups=4),
    CausalVAEConfig(base_channels=8, channel_mult=(1, 1, 1), temporal_factor=2, norm_groups=4),
    CausalVAEConfig(base_channels=8, channel_mult=(1, 1, 1), temporal_factor=1, norm_groups=4, shortcuts=False),
]


def _record_inputs(module: torch.nn.Module, kind) -> tuple[list[tuple[int, ...]], list]:
    """Shapes of the inputs every `kind` submodule receives (forward pre-hooks; remove the handles)."""
    shapes: list[tuple[int, ...]] = []
    handles = [m.register_forward_pre_hook(lambda _, args: shapes.append(tuple(args[0].shape)))
               for m in module.modules() if isinstance(m, kind)]
    return shapes, handles


@pytest.mark.parametrize("cfg", CHUNK_CONFIGS, ids=["tf4_sf4", "tf4_sf8_p2", "tf2_sf4", "tf1_noshort"])
@torch.no_grad()
def test_temporal_chunks_equal_the_whole_clip(cfg):
    # Exact up to float rounding: every causal conv carries its last frames across chunks, so each
    # output frame sees the same inputs; only the grouping of the conv calls differs (atol 1e-5).
    torch.manual_seed(0)
    vae = CausalVAE(cfg).eval()
    tf = cfg.temporal_factor
    video = torch.rand(1, 3, 1 + 4 * tf, 16, 16) * 2 - 1
    whole = vae.encode(video).mean
    decoded = vae.decode(whole)
    for chunk in (tf, 2 * tf, 3 * tf):  # 3*tf: the last chunk is shorter
        tiling = TilingConfig(chunk_frames=chunk)
        shapes, handles = _record_inputs(vae.enc_in, torch.nn.Conv3d)
        chunked = vae.encode(video, tiling).mean
        for h in handles:
            h.remove()
        assert len(shapes) == 1 + -(-4 * tf // chunk)  # frame 0, then the chunks: it really ran in pieces
        torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(vae.decode(whole, tiling), decoded, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_tiles_and_chunks_bound_what_each_call_sees():
    vae = tiny_vae()
    video = torch.rand(1, 3, 9, 64, 64) * 2 - 1
    tiling = TilingConfig(tile_size=32, tile_overlap=8, chunk_frames=4)
    sizes = {}
    for name, t in (("whole", None), ("tiled", tiling)):
        shapes, handles = _record_inputs(vae, CausalConv3d)
        z = vae.encode(video, t).mean
        out = vae.decode(z, t)
        for h in handles:
            h.remove()
        assert out.shape == video.shape and z.shape == (1, 4, 3, 16, 16)
        sizes[name] = shapes
    # Every conv call in the tiled run gets at most one 32x32 tile and 4 new frames (the hooks see
    # the input before the <= 2 carried frames are prepended), so the largest input shrinks by
    # (32/64)^2 * (4/9) against the whole 9-frame 64x64 clip.
    assert max(s[-1] for s in sizes["tiled"]) <= 32 and max(s[2] for s in sizes["tiled"]) <= 4
    largest = {k: max(math.prod(s) for s in v) for k, v in sizes.items()}
    assert largest["tiled"] * 4 * 9 <= largest["whole"] * 4


@torch.no_grad()
def test_one_tile_covering_the_frame_is_exact():
    vae = tiny_vae()
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    z = vae.encode(video).mean
    tiling = TilingConfig(tile_size=16, tile_overlap=8)
    torch.testing.assert_close(vae.encode(video, tiling).mean, z, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(vae.decode(z, tiling), vae.decode(z), atol=1e-6, rtol=1e-6)


def test_tiling_config_errors_name_the_field():
    cfg = VAE_PRESETS["tiny"]
    with pytest.raises(ValueError, match="vae.tiling.tile_size=10"):
        TilingConfig(tile_size=10).validate(cfg)
    with pytest.raises(ValueError, match="vae.tiling.tile_overlap=16"):
        TilingConfig(tile_size=16, tile_overlap=16).validate(cfg)
    with pytest.raises(ValueError, match="vae.tiling.chunk_frames=6"):
        TilingConfig(chunk_frames=6).validate(cfg)


def test_frozen_adapter_applies_its_tiling():
    vae = tiny_vae()
    shift, scale = torch.tensor([0.1, -0.2, 0.3, 0.0]), torch.tensor([2.0, 0.5, 1.5, 3.0])
    plain = CausalVideoAutoencoder(vae, shift, scale)
    chunked = CausalVideoAutoencoder(vae, shift, scale, tiling=TilingConfig(chunk_frames=4))
    video = clip_to_video(shape_clips(1, frames=9, size=16))
    latents = plain.encode(video)
    torch.testing.assert_close(chunked.encode(video), latents, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked.decode(latents), plain.decode(latents), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="vae.tiling.chunk_frames=2"):
        CausalVideoAutoencoder(vae, shift, scale, tiling=TilingConfig(chunk_frames=2))


@pytest.fixture(scope="module")
def trained_tiny_vae() -> CausalVAE:
    """The tiny VAE after 20 fp32 steps on 32x32 shape clips (~16 dB): random weights are no test
    of seams, their per-tile GroupNorm statistics differ wildly from the whole frame's."""
    torch.manual_seed(0)
    vae = CausalVAE(VAE_PRESETS["tiny"])
    opt = torch.optim.AdamW(vae.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for step in range(20):
        loss, _ = vae_loss(vae, clip_to_video(shape_clips(4, frames=5, size=32, seed=step)), 1e-4, "l2", gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return vae.eval()


@torch.no_grad()
def test_tiled_reconstruction_matches_untiled(trained_tiny_vae):
    # Spatial tiles are approximate: each tile's convs see zero padding at its border and its
    # GroupNorm statistics come from the tile, not the frame. The test asks that seams cost little
    # next to the VAE's own error: reconstruction PSNR within 0.5 dB of untiled, the tiled output
    # >= 6 dB closer to the untiled output than the untiled output is to the input, and the
    # overlap blending helping over butt-joined tiles. (Measured: untiled 15.6 dB, tiled 15.9 dB,
    # tiled vs untiled 23.4 dB; without overlap 22.1 dB.)
    from dit_video.eval.image_metrics import psnr

    vae = trained_tiny_vae
    video = clip_to_video(shape_clips(4, frames=9, size=64, seed=999))
    whole = vae.decode(vae.encode(video).mean).clamp(-1, 1)

    def reconstruct(overlap):
        t = TilingConfig(tile_size=32, tile_overlap=overlap, chunk_frames=4)
        return vae.decode(vae.encode(video, t).mean, t).clamp(-1, 1)

    tiled, butt = reconstruct(8), reconstruct(0)
    whole_psnr = psnr(whole, video).mean()
    assert psnr(tiled, video).mean() > whole_psnr - 0.5
    assert psnr(tiled, whole).mean() > whole_psnr + 6.0
    assert psnr(tiled, whole).mean() > psnr(butt, whole).mean()


# ---------------------------------------------------------------------------------------------
# Normalisation, save / load
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Text encoder (real MiniLM weights)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm() -> HFTextEncoder:
    return HFTextEncoder(minilm_path(), max_length=16)


def test_minilm_shapes_masks_and_empty_caption(minilm):
    assert isinstance(minilm, TextEncoder)
    assert minilm.dim == 384
    captions = ["a red square moves left", "a blue disc", ""]
    text_emb, text_mask = minilm.encode(captions)
    assert text_emb.dtype == torch.float32 and text_mask.dtype == torch.bool
    assert text_emb.shape == (3, text_mask.shape[1], 384)
    lengths = text_mask.sum(1)
    assert lengths[0] > lengths[1] > lengths[2] >= 1  # "" is [CLS][SEP]: never an empty row
    assert lengths[2] == 2
    assert text_mask[0].all()  # the longest caption sets L
    assert not text_mask[2, 2:].any()  # padding is False
    assert torch.isfinite(text_emb).all()


def test_minilm_deterministic_frozen_and_batch_independent(minilm):
    a, mask_a = minilm.encode(["a green square bounces", "x"])
    b, mask_b = minilm.encode(["a green square bounces", "x"])
    assert torch.equal(a, b) and torch.equal(mask_a, mask_b)
    alone, _ = minilm.encode(["a green square bounces"])
    torch.testing.assert_close(alone[0], a[0], atol=1e-5, rtol=1e-4)
    assert not minilm.model.training
    assert not any(p.requires_grad for p in minilm.parameters())
    ident = minilm.identity()
    assert ident["dim"] == 384 and ident["max_length"] == 16 and len(ident["sha256"]) == 64


def test_minilm_truncates_and_warns_once(minilm, caplog):
    minilm._warned_truncation = False
    long = " ".join(["colour"] * 40)
    with caplog.at_level(logging.WARNING, logger="dit_video.encoders.text"):
        _, mask = minilm.encode([long, "short"])
        minilm.encode([long])
    assert mask.shape[1] == 16 and mask[0].all()
    assert sum("truncated" in r.getMessage() for r in caplog.records) == 1


def test_text_encoder_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HFTextEncoder(tmp_path / "no_such_model")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        HFTextEncoder(tmp_path)
