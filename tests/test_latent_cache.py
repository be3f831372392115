"""Latent cache: build, round trip, the same loss as on-the-fly encoding, refusal of a cache made
by other encoders, and `data=latents` training through train.py's code path."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from data_prep.encode_latents import encode_latents, load_text_encoder
from data_prep.make_demo import make_demo
from dit_video.data.clips import VideoShardDataset
from dit_video.data.latents import LatentDataConfig, LatentDataModule, LatentShardDataset
from dit_video.encoders.base import clip_to_video
from dit_video.encoders.causal_vae import CausalVAE, CausalVAEConfig, load_vae, save_vae

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
T, SIZE, FPS, B = 9, 16, 8.0, 6
VAE_FIELDS = dict(base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, temporal_factor=4, spatial_factor=4)


def _tiny_vae(out: Path, seed: int):
    torch.manual_seed(seed)
    cfg = CausalVAEConfig(**VAE_FIELDS)
    vae = CausalVAE(cfg)
    save_vae(out, vae, cfg, torch.zeros(cfg.latent_channels), torch.ones(cfg.latent_channels))
    return load_vae(out)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent_cache")
    make_demo(root / "clips", num_clips=14, val_clips=0, size=SIZE, frames=T, shard_size=8, seed=0)
    vae = _tiny_vae(root / "vae", seed=0)
    text = load_text_encoder("minilm", None, None)
    shards = sorted(str(p) for p in (root / "clips").glob("train-*.tar"))
    cache = encode_latents(shards, root / "latents", vae, text, T, (SIZE, SIZE), FPS, batch_size=4, seed=3)
    return {"root": root, "vae": vae, "text": text, "shards": shards, "cache": cache}


def test_cache_layout_identity_and_round_trip(world):
    cache, vae, text = world["cache"], world["vae"], world["text"]
    meta = json.loads((cache / "cache.json").read_text())
    assert meta["samples"] == 14 and meta["latent_shape"] == [4, 3, 4, 4]
    assert meta["vae"]["sha256"] == vae.identity()["sha256"] and meta["text_encoder"]["name"] == "all-minilm-l6-v2"
    assert cache.name == f"{T}x{SIZE}x{SIZE}" and "causal_vae" in cache.parent.name
    assert sorted(p.name for p in cache.glob("latents-*.tar")) == ["latents-000000.tar", "latents-000001.tar"]
    with tarfile.open(cache / "latents-000000.tar") as tar:
        names = tar.getnames()
    assert all(n.endswith((".safetensors", ".txt", ".json")) for n in names)  # never a pickle
    # The cached latents are what the VAE gives for the clip loader's centre-crop window.
    clips = VideoShardDataset(world["shards"], T, FPS, (SIZE, SIZE), crop="center", seed=3, infinite=False,
                              batch_size=B, batched=True, rank=0, world_size=1)
    clip_batch = next(iter(clips))
    lat_batch = next(iter(LatentShardDataset(cache, B, infinite=False, shuffle=False, rank=0, world_size=1)))
    assert clip_batch["key"] == lat_batch["key"]
    expected = vae.encode(clip_to_video(clip_batch["clip"]))  # [B, C, T', H', W']
    torch.testing.assert_close(lat_batch["latents"], expected, rtol=1e-4, atol=1e-5)
    emb, mask = text.encode(clip_batch["caption"])
    torch.testing.assert_close(lat_batch["text_emb"][lat_batch["text_mask"]], emb[mask], rtol=1e-4, atol=1e-5)
    assert torch.equal(lat_batch["text_mask"].sum(1), mask.sum(1))


def test_rerun_reuses_the_cache(world):
    before = {p: p.stat().st_mtime_ns for p in world["cache"].glob("latents-*.tar")}
    again = encode_latents(world["shards"], world["root"] / "latents", world["vae"], world["text"], T, (SIZE, SIZE),
                           FPS, batch_size=4, seed=3)
    assert again == world["cache"]
    assert {p: p.stat().st_mtime_ns for p in again.glob("latents-*.tar")} == before  # nothing re-encoded


def _dit_module(world, caption_dropout: float):
    from dit_video.diffusion import build_objective
    from dit_video.lit_module import DiTModule, OptimConfig
    from dit_video.model import DiT, DiTConfig

    torch.manual_seed(0)
    dit = DiT(DiTConfig(in_channels=4, text_dim=world["text"].dim, hidden_size=32, depth=2, num_heads=2))
    objective = build_objective({"kind": "rectified_flow", "caption_dropout": caption_dropout})
    return DiTModule(dit, objective, world["vae"], world["text"], OptimConfig(), 0.99, {})


@pytest.mark.parametrize("caption_dropout", [0.0, 0.5])
def test_cached_latents_give_the_same_loss_as_on_the_fly_encoding(world, caption_dropout):
    module = _dit_module(world, caption_dropout)
    clips = VideoShardDataset(world["shards"], T, FPS, (SIZE, SIZE), crop="center", seed=3, infinite=False,
                              batch_size=B, batched=True, rank=0, world_size=1)
    latent_batches = LatentShardDataset(world["cache"], B, infinite=False, shuffle=False, rank=0, world_size=1)
    for clip_batch, lat_batch in zip(clips, latent_batches, strict=True):
        assert clip_batch["key"] == lat_batch["key"]
        losses = []
        for batch in (clip_batch, lat_batch):
            torch.manual_seed(1234)  # same dropout draw, same noise and t
            latents, text_emb, text_mask, _ = module.model_inputs(batch)  # no pooled vector (pooled_text_dim 0)
            loss, _ = module.objective.loss(module.dit, latents, text_emb, text_mask)
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-4, abs=1e-6)


def test_cache_for_other_encoders_is_refused(world, tmp_path):
    other_vae = _tiny_vae(tmp_path / "other_vae", seed=1)
    module = LatentDataModule(LatentDataConfig(cache=str(world["cache"]), batch_size=4, num_workers=0))
    module.check_encoders(world["vae"].identity(), world["text"].identity())  # the right pair passes
    with pytest.raises(ValueError, match="other encoders") as err:
        module.check_encoders(other_vae.identity(), world["text"].identity())
    msg = str(err.value)
    assert world["vae"].identity()["sha256"] in msg and other_vae.identity()["sha256"] in msg
    assert "text encoder" not in msg  # only what differs is named


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_train_with_data_latents_and_refusal_through_run(world, tmp_path):
    from dit_video.errors import ConfigError
    from dit_video.plots import read_metric
    from dit_video.run import train

    common = ["+experiment=demo", "data=latents", f"data.cache={world['cache']}", "data.batch_size=4",
              "data.num_workers=0", "model.depth=2", "model.hidden_size=32", "model.num_heads=2",
              "trainer.max_steps=3", "trainer.log_every_n_steps=1", "trainer.enable_model_summary=false"]
    train(_compose(*common, f"vae.path={world['root'] / 'vae'}", f"run_dir={tmp_path / 'ok'}"))
    losses = read_metric(tmp_path / "ok" / "metrics.csv", "train/loss")[1]
    assert len(losses) == 3 and np.all(np.isfinite(losses))
    _tiny_vae(tmp_path / "other_vae", seed=1)
    with pytest.raises(ConfigError, match="latent cache was built with other encoders"):
        train(_compose(*common, f"vae.path={tmp_path / 'other_vae'}", f"run_dir={tmp_path / 'refused'}"))
