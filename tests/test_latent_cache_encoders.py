"""Latent caches for any VAE and text-encoder setting: `encode_latents --vae-config` builds a cache
for a pretrained diffusers VAE (a tiny random Wan saved locally), training with the same vae
config accepts it and another VAE is refused; text-encoder settings that change embeddings enter
the cache key only when not at their defaults (so MiniLM caches keep their folder)."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before diffusers/huggingface_hub read it at import

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from data_prep.encode_latents import encode_latents, load_text_encoder, main  # noqa: E402
from data_prep.make_demo import make_demo  # noqa: E402
from dit_video.data.buckets import Bucket  # noqa: E402
from dit_video.data.clips import VideoShardDataset  # noqa: E402
from dit_video.data.latents import (  # noqa: E402
    LatentDataConfig,
    LatentDataModule,
    _plain,
    _short_hash,
    _slug,
    cache_dir,
    text_key,
)
from dit_video.encoders.base import clip_to_video  # noqa: E402
from dit_video.encoders.causal_vae import CausalVAE, CausalVAEConfig, load_vae, save_vae  # noqa: E402
from dit_video.encoders.text import HFTextEncoder, minilm_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
T, SIZE, FPS, C = 9, 16, 8.0, 4  # Wan needs 1 + 4k frames and H, W divisible by 8
# The text-key fields before kind/hidden_state_layer/... were added (the old text_key).
OLD_TEXT_KEY = ("name", "sha256", "max_length", "dim", "dtype")


def _tiny_wan(out: Path, seed: int) -> Path:
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    diffusers.AutoencoderKLWan(
        base_dim=8, z_dim=C, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=torch.randn(C).tolist(), latents_std=(torch.rand(C) + 0.5).tolist()).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent_cache_encoders")
    make_demo(root / "clips", num_clips=6, val_clips=0, size=SIZE, frames=T, shard_size=8, seed=0)
    shards = sorted(str(p) for p in (root / "clips").glob("train-*.tar"))
    return {"root": root, "shards": shards, "text": load_text_encoder("minilm", None, None)}


def test_minilm_key_is_unchanged(world):
    identity = world["text"].identity()
    old = _plain({k: identity.get(k) for k in OLD_TEXT_KEY})
    assert text_key(identity) == old
    bucket = Bucket(T, SIZE, SIZE, 4)
    vae_id = {"name": "v", "sha256": "0", "config": {}}
    assert cache_dir("r", vae_id, identity, bucket).parent.name.endswith(f"{_slug(old['name'])}-{_short_hash(old)}")


def test_text_settings_enter_the_key_only_when_not_default(world):
    identity = world["text"].identity()
    base = text_key(identity)
    assert text_key({**identity, "kind": "bert"}) == base  # what `auto` detects for MiniLM
    assert text_key({**identity, "kind": "clip"}) == {**base, "kind": "clip"}
    assert text_key({**identity, "crop_start": 3}) == {**base, "crop_start": 3}
    assert text_key({**identity, "prompt_template": "a video of {caption}"})["prompt_template"] == "a video of {caption}"
    assert text_key({**identity, "kind": "clip", "clip_pooled": "projected"})["clip_pooled"] == "projected"


def test_cache_with_another_hidden_state_layer_is_refused(world, tmp_path):
    torch.manual_seed(0)
    cfg = CausalVAEConfig(base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, temporal_factor=4,
                          spatial_factor=4)
    save_vae(tmp_path / "vae", CausalVAE(cfg), cfg, torch.zeros(cfg.latent_channels), torch.ones(cfg.latent_channels))
    vae = load_vae(tmp_path / "vae")
    layer2 = HFTextEncoder(minilm_path(), max_length=32, name="all-minilm-l6-v2", hidden_state_layer=-2)
    cache = encode_latents(world["shards"], tmp_path / "latents", vae, layer2, T, (SIZE, SIZE), FPS, batch_size=4)
    assert json.loads((cache / "cache.json").read_text())["text_encoder"]["hidden_state_layer"] == -2
    module = LatentDataModule(LatentDataConfig(cache=str(cache), batch_size=4, num_workers=0))
    module.check_encoders(vae.identity(), layer2.identity())  # the encoders it was built with pass
    with pytest.raises(ValueError, match=r"text encoder differs in hidden_state_layer: "):
        module.check_encoders(vae.identity(), world["text"].identity())
    # The default-layer cache would live in another folder: the two never mix.
    assert cache_dir(tmp_path / "latents", vae.identity(), world["text"].identity(), Bucket(T, SIZE, SIZE, 4)) != cache


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_encode_latents_with_a_diffusers_vae_config_and_train_on_it(world, tmp_path):
    from dit_video.build import build_vae
    from dit_video.errors import ConfigError
    from dit_video.plots import read_metric
    from dit_video.run import train

    wan = _tiny_wan(tmp_path / "wan", seed=0)
    vae_args = ["vae=wan", f"vae.path={wan}", f"vae.latent_channels={C}"]
    cache = main(["--vae-config", "wan", f"vae.path={wan}", f"vae.latent_channels={C}", "--shards", *world["shards"],
                  "--out", str(tmp_path / "latents"), "--num-frames", str(T), "--size", str(SIZE), str(SIZE),
                  "--batch-size", "4", "--workers", "0"])
    adapter = build_vae(_compose("+experiment=demo", *vae_args))
    meta = json.loads((cache / "cache.json").read_text())
    assert meta["vae"]["name"] == "wan_vae" and meta["vae"]["sha256"] == adapter.identity()["sha256"]
    assert meta["vae"]["config"]["kind"] == "wan" and meta["latent_shape"] == [C, 3, 2, 2]
    assert cache.parent.name.startswith("wan_vae-") and meta["samples"] == 6
    # The cached latents are the adapter's latents of the clip loader's centre-crop window.
    clips = VideoShardDataset(world["shards"], T, FPS, (SIZE, SIZE), crop="center", seed=0, infinite=False,
                              batch_size=6, batched=True, rank=0, world_size=1)
    batch = next(iter(clips))
    with torch.no_grad():
        expect = adapter.encode(clip_to_video(batch["clip"]))  # [B, C, T', H', W']
    from safetensors.torch import load as load_safetensors

    with tarfile.open(cache / "latents-000000.tar") as tar:
        got = {m.name.split(".")[0]: load_safetensors(tar.extractfile(m).read())["latents"]
               for m in tar.getmembers() if m.name.endswith(".safetensors")}
    for i, key in enumerate(batch["key"]):
        torch.testing.assert_close(got[key], expect[i], rtol=1e-4, atol=1e-5)

    common = ["+experiment=demo", "data=latents", f"data.cache={cache}", "data.batch_size=4", "data.num_workers=0",
              "model.depth=2", "model.hidden_size=32", "model.num_heads=2", "trainer.max_steps=2",
              "trainer.log_every_n_steps=1", "trainer.enable_model_summary=false"]
    train(_compose(*common, *vae_args, f"run_dir={tmp_path / 'ok'}"))
    losses = read_metric(tmp_path / "ok" / "metrics.csv", "train/loss")[1]
    assert len(losses) == 2 and np.all(np.isfinite(losses))
    other = _tiny_wan(tmp_path / "other_wan", seed=1)
    with pytest.raises(ConfigError, match=r"VAE differs in (config, )?sha256"):
        train(_compose(*common, "vae=wan", f"vae.path={other}", f"vae.latent_channels={C}",
                       f"run_dir={tmp_path / 'refused'}"))


def test_encode_latents_vae_arguments_are_checked(world, tmp_path, capsys):
    common = ["--shards", *world["shards"], "--out", str(tmp_path)]
    with pytest.raises(SystemExit):
        main([*common, "--vae", str(tmp_path), "vae.path=x"])
    assert "overrides go with --vae-config" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*common, "--vae-config", "wan", "vae.pth=x"])
    assert "has no field 'pth'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(common)  # neither --vae nor --vae-config
    assert "--vae" in capsys.readouterr().err
