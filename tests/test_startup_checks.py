"""Shapes and options that sequence parallelism cannot run are refused at startup, not hours in.

`webvid_256_buckets` has a 192x336 bucket: 9 x 12 x 21 = 2268 DiT tokens per 33-frame clip, not a
multiple of 8, so a P=8 run died at the first batch drawn from that bucket. `objective.per_frame_t`
conditions every token separately ([B, N, D]) and did not split with the tokens. Both, and every
other clip shape and option, are now checked by `build.check_training_shapes` before the text
encoder is built, with a one-line ConfigError.
"""

from __future__ import annotations

import pytest
import torch
from tiny_run import compose_train

from dit_video import run
from dit_video.build import build_dit_config, build_objective_from, check_training_shapes, dataclass_from
from dit_video.data.config import VideoDataConfig
from dit_video.encoders.causal_vae import CausalVAE, CausalVAEConfig
from dit_video.encoders.causal_vae.frozen import CausalVideoAutoencoder
from dit_video.errors import ConfigError

DIT_256_BUCKETS = ["+experiment=dit_256", "data=webvid_256_buckets", "strategy=ddp", "trainer.devices=8"]


def dit_256_vae(cfg) -> CausalVideoAutoencoder:
    """dit_256's VAE (4x temporal, 8x spatial) built on the meta device: its real latent_shape rule, no weights."""
    fields = {k: v for k, v in dict(cfg.vae).items() if k not in ("path", "loss", "tiling")}
    with torch.device("meta"):
        vae = CausalVAE(dataclass_from(CausalVAEConfig, fields, "vae").validate())
    c = vae.config.latent_channels
    return CausalVideoAutoencoder(vae, torch.zeros(c), torch.ones(c))


def check(*overrides: str):
    """The run's config, after check_training_shapes passed on it (it raises ConfigError otherwise)."""
    cfg = compose_train(*DIT_256_BUCKETS, *overrides)
    vae = dit_256_vae(cfg)
    data_cfg = dataclass_from(VideoDataConfig, cfg.data, "data")  # no validate(): the shards are not here
    dit_cfg = build_dit_config(cfg.model, vae.latent_channels, 1, 1)
    check_training_shapes(cfg, data_cfg, vae, dit_cfg, build_objective_from(cfg))
    return cfg


def test_a_bucket_whose_tokens_do_not_split_over_the_sequence_parallel_ranks_is_refused():
    with pytest.raises(ConfigError) as err:
        check("strategy.sequence_parallel_size=8")
    message = str(err.value)
    assert "data.buckets[1] (33x192x336) gives 2268 tokens per clip" in message
    assert "strategy.sequence_parallel_size=8" in message and "\n" not in message


def test_every_bucket_of_webvid_256_buckets_splits_over_4_ranks():
    cfg = check("strategy.sequence_parallel_size=4")  # 2304, 2268, 1280, 1260, 256, 252 tokens: all multiples of 4
    assert cfg.strategy.sequence_parallel_size == 4 and len(cfg.data.buckets) == 7  # all seven buckets were checked


def test_image_batches_of_each_bucket_are_checked_too():
    """With image_ratio > 0 each bucket's 1-frame shape trains too: 5x192x336 clips give 2 x 252 = 504
    tokens (a multiple of 8), their image batches 252 (not one)."""
    with pytest.raises(ConfigError, match=r"data.buckets\[1\] as images .* gives 252 tokens per clip, not a multiple"):
        check("data.buckets=[{num_frames:33,size:[256,256]},{num_frames:5,size:[192,336]}]",
              "data.image_ratio=0.1", "strategy.sequence_parallel_size=8")


@pytest.mark.parametrize("overrides,match", [
    (("+objective.per_frame_t=true",), "objective.per_frame_t=true does not work with strategy.sequence_parallel_size=4"),
    (("+data.packing={enabled:true,max_tokens:8192}",), "data.packing.enabled=true does not work with"),
    (("+model.pos_embed=sincos",), "supports model.pos_embed=rope only"),
    (("strategy.sequence_parallel_size=16",), "ulysses needs model.num_heads=24 divisible by"),
], ids=["per_frame_t", "packing", "sincos", "ulysses-heads"])
def test_options_sequence_parallelism_cannot_run_are_refused(overrides, match):
    with pytest.raises(ConfigError, match=match) as err:
        check("strategy.sequence_parallel_size=4", *overrides)
    assert "\n" not in str(err.value)


def test_train_refuses_the_bucket_before_building_the_text_encoder(monkeypatch, tmp_path):
    """run.train checks the shapes right after the VAE: T5-XXL (minutes to load) is never built."""
    cfg = compose_train(*DIT_256_BUCKETS, "strategy.sequence_parallel_size=8", f"run_dir={tmp_path}")
    monkeypatch.setenv("DIT_VIDEO_QUIET", "1")
    monkeypatch.setattr(run, "preflight", lambda cfg: None)  # no shards, VAE or T5 weights on this machine
    monkeypatch.setattr(run, "build_data", lambda cfg: (dataclass_from(VideoDataConfig, cfg.data, "data"), None))
    monkeypatch.setattr(run, "build_vae", dit_256_vae)

    def no_text_encoder(cfg):
        raise AssertionError("the text encoder was built before the shapes were checked")

    monkeypatch.setattr(run, "build_text_encoder", no_text_encoder)
    with pytest.raises(ConfigError, match=r"data.buckets\[1\] \(33x192x336\) gives 2268 tokens"):
        run.train(cfg)
