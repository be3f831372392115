"""Token-budget packed batches: the plan is a partition within the budget, a pure function of
(seed, epoch), and a packed training stream resumes exactly (2 workers)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from test_buckets import write_mixed_shard

from dit_video.data.buckets import make_buckets
from dit_video.data.config import VideoDataConfig
from dit_video.data.datamodule import VideoDataModule
from dit_video.data.packing import bucket_tokens, pack_epoch

BUCKETS = [{"num_frames": 9, "size": [16, 16]}, {"num_frames": 9, "size": [16, 32]},
           {"num_frames": 5, "size": [32, 16]}, {"num_frames": 1, "size": [16, 16]}]
MAX_TOKENS = 48


def tokens_per_clip(num_frames: int, height: int, width: int) -> int:
    """A causal 4x temporal, 4x spatial VAE and (1, 2, 2) patches: (1 + (T-1)/4) * H/8 * W/8."""
    return (1 + (num_frames - 1) // 4) * (height // 8) * (width // 8)


def test_pack_epoch_is_a_partition_within_the_budget():
    rng = np.random.default_rng(0)
    bucket_of = rng.integers(-1, 4, size=200)  # -1: a sample that fits no bucket
    tokens = [12, 24, 16, 4]
    packs = pack_epoch(bucket_of, tokens, MAX_TOKENS, open_packs=4, seed=3, epoch=0)
    flat = np.concatenate(packs)
    assert sorted(flat.tolist()) == np.flatnonzero(bucket_of >= 0).tolist()  # every usable sample once
    loads = [sum(tokens[bucket_of[i]] for i in p) for p in packs]
    assert max(loads) <= MAX_TOKENS
    assert len({int(bucket_of[i]) for p in packs for i in p}) == 4 and any(len({int(bucket_of[i]) for i in p}) > 1 for p in packs)
    # Pure function of (seed, epoch); another epoch is another order.
    again = pack_epoch(bucket_of, tokens, MAX_TOKENS, open_packs=4, seed=3, epoch=0)
    assert [p.tolist() for p in packs] == [p.tolist() for p in again]
    assert [p.tolist() for p in packs] != [p.tolist() for p in pack_epoch(bucket_of, tokens, MAX_TOKENS, 4, 3, 1)]
    # More open packs fill better than next fit (open_packs=1), never worse.
    next_fit = pack_epoch(bucket_of, tokens, MAX_TOKENS, open_packs=1, seed=3, epoch=0)
    assert len(packs) <= len(next_fit)
    assert sum(loads) / (len(packs) * MAX_TOKENS) > 0.9  # first fit over 4 open packs wastes little


def test_a_bucket_larger_than_the_budget_is_a_clear_error():
    buckets = make_buckets([{**b, "batch_size": 1} for b in BUCKETS])
    assert bucket_tokens(buckets, tokens_per_clip, MAX_TOKENS) == [12, 24, 16, 4]
    with pytest.raises(ValueError, match=r"data.packing.max_tokens=20: .* raise max_tokens to at least 24"):
        bucket_tokens(buckets, tokens_per_clip, 20)


def test_packing_config_errors_name_the_field():
    with pytest.raises(ValueError, match="data.packing: unknown field"):
        VideoDataConfig(packing={"enable": True})
    cfg = VideoDataConfig(packing={"enabled": True, "max_tokens": 0})
    with pytest.raises(ValueError, match="data.packing.max_tokens"):
        cfg.packing.validate()


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory):
    """Square, wide and tall videos and png images in two shards (all four buckets used)."""
    root = tmp_path_factory.mktemp("packed")
    rng = np.random.default_rng(0)
    sizes = {"square": (16, 16, 9), "wide": (16, 32, 9), "tall": (32, 16, 5), "image": (24, 24, 1)}
    for shard in range(2):
        write_mixed_shard(root / f"mixed-{shard:06d}.tar", sizes, 12, rng, key=lambda kind, i, s=shard: f"{kind}_{s}{i:02d}",
                          caption=lambda key: f"a red circle {key}")
    return root


def _module(root, workers: int) -> VideoDataModule:
    cfg = VideoDataConfig(shards=str(root / "mixed-*.tar"), val_shards=None, num_frames=9, fps=8.0,
                          size=(16, 16), buckets=[{**b, "batch_size": 2} for b in BUCKETS], num_workers=workers,
                          seed=5, packing={"enabled": True, "max_tokens": MAX_TOKENS, "open_packs": 4})
    module = VideoDataModule(cfg)
    module.tokens_per_clip = tokens_per_clip
    return module


def _consume(module: VideoDataModule, n: int) -> list[dict]:
    loader = module.train_dataloader()
    out = [module.on_before_batch_transfer(b, 0) for b in itertools.islice(loader, n)]
    del loader
    return out


def test_packed_batches_hold_clips_of_several_shapes_within_the_budget(mixed_shards):
    batches = _consume(_module(mixed_shards, workers=0), 6)
    shapes = set()
    for batch in batches:
        assert isinstance(batch["clip"], list) and len(batch["clip"]) == len(batch["key"]) == len(batch["caption"])
        for clip in batch["clip"]:
            assert clip.dtype == torch.uint8 and clip.shape[-1] == 3
            shapes.add(tuple(clip.shape[:3]))
        assert sum(tokens_per_clip(*c.shape[:3]) for c in batch["clip"]) <= MAX_TOKENS
    assert shapes == {(9, 16, 16), (9, 16, 32), (5, 32, 16), (1, 16, 16)}
    assert any(len({tuple(c.shape) for c in b["clip"]}) > 1 for b in batches)  # packs mix shapes


def test_packing_without_a_token_count_is_a_clear_error(mixed_shards):
    module = _module(mixed_shards, workers=0)
    module.tokens_per_clip = None
    with pytest.raises(ValueError, match="data.packing.enabled: the loader needs the DiT's tokens per clip"):
        module.train_dataset()


@pytest.mark.parametrize("stop", [2, 5])
def test_packed_resume_with_two_workers_gives_the_same_batches(mixed_shards, stop):
    per_epoch = len(_module(mixed_shards, 0).train_dataset().epoch_plan(0))
    total = per_epoch + 2  # crosses into epoch 1
    reference = _consume(_module(mixed_shards, workers=2), total)
    assert [b["key"] for b in _consume(_module(mixed_shards, workers=0), total)] == [b["key"] for b in reference]
    first = _module(mixed_shards, workers=2)
    _consume(first, stop)
    state = first.state_dict()
    assert (state["epoch"], state["batches_into_epoch"]) == (0, stop)
    resumed = _module(mixed_shards, workers=2)
    resumed.load_state_dict(state)
    rest = _consume(resumed, total - stop)
    for want, got in zip(reference[stop:], rest, strict=True):
        assert want["key"] == got["key"]
        assert len(want["clip"]) == len(got["clip"])
        assert all(torch.equal(a, b) for a, b in zip(want["clip"], got["clip"], strict=True))  # same frames and crops


def test_packed_training_runs_end_to_end(tmp_path_factory, tmp_path, monkeypatch):
    """train.py with data.packing: run.py gives the loader the DiT's tokens per clip, the module
    routes the list-of-clips batches to Objective.loss_packed, and the loss is finite."""
    import csv

    from tiny_run import TINY_DIT, compose_train, tiny_run

    from dit_video.diffusion.objective import Objective
    from dit_video.run import train

    world = tiny_run(tmp_path_factory)
    seen = []
    real = Objective.loss_packed

    def spy(self, model, latents, *args, **kwargs):
        seen.append([tuple(x.shape) for x in latents])
        return real(self, model, latents, *args, **kwargs)

    monkeypatch.setattr(Objective, "loss_packed", spy)
    # Demo clips: 17 frames at 32x32 -> (5, 8, 8) latents -> 80 tokens with (1, 2, 2) patches.
    train(compose_train("+experiment=demo", f"data.shards={world['shards']}/train-*.tar", "data.val_shards=null",
                        "data.num_workers=0", "num_threads=1", *TINY_DIT, f"vae.path={world['vae']}",
                        "+data.packing={enabled: true, max_tokens: 250}", "trainer.max_steps=3",
                        "trainer.log_every_n_steps=1", f"run_dir={tmp_path}", "trainer.enable_model_summary=false"))
    assert seen == [[(4, 5, 8, 8)] * 3] * 3  # three 80-token clips fit 250 tokens
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 3 and all(np.isfinite(losses))


def test_packed_clips_are_encoded_one_vae_call_per_shape():
    """DiTModule.encode_clip_list: latents in input order, each equal to encoding that clip alone."""
    import types

    from dit_video.lit_module import DiTModule

    calls = []

    def encode_clips(clip):  # a stand-in VAE: per-sample, shape-dependent
        calls.append(tuple(clip.shape))
        return clip.float().mean(-1)[:, None]  # [n, 1, T, H, W]

    gen = torch.Generator().manual_seed(0)
    shapes = [(9, 16, 16), (5, 32, 16), (9, 16, 16), (1, 24, 24), (5, 32, 16)]
    clips = [torch.randint(0, 256, (*s, 3), dtype=torch.uint8, generator=gen) for s in shapes]
    fake = types.SimpleNamespace(encode_clips=encode_clips)
    latents = DiTModule.encode_clip_list(fake, clips)
    assert len(calls) == 3 and sorted(n for n, *_ in calls) == [1, 2, 2]  # one call per distinct shape
    for clip, z in zip(clips, latents, strict=True):
        torch.testing.assert_close(z, encode_clips(clip[None])[0])
