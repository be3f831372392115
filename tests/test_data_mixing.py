"""Joint image+video training from one data config: `data.image_ratio` of the training batches
are image batches (one frame of each clip), chosen inside the epoch plan so the order stays a
pure function of (seed, epoch) and resumes exactly."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.make_demo import make_demo
from dit_video.data.config import VideoDataConfig
from dit_video.data.datamodule import VideoDataModule
from dit_video.data.decode import decode_clip
from dit_video.data.index import MemberReader
from dit_video.data.order import epoch_batches, mix_image_batches

T, SIZE, SOURCE_FRAMES = 5, 16, 9


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mixing")
    make_demo(out, num_clips=24, val_clips=0, size=SIZE, frames=SOURCE_FRAMES, shard_size=8, seed=0)
    return out


def _config(shards: Path, workers: int = 0, **kw) -> VideoDataConfig:
    values = dict(shards=str(shards / "train-*.tar"), val_shards=None, num_frames=T, fps=None, size=(SIZE, SIZE),
                  batch_size=3, num_workers=workers, shuffle_buffer=1, seed=7, crop="center")
    return VideoDataConfig(**(values | kw))


def _consume(module: VideoDataModule, n: int) -> list[dict]:
    loader = module.train_dataloader()
    out = [module.on_before_batch_transfer(b, 0) for b in itertools.islice(loader, n)]
    del loader
    return out


def test_mix_is_pure_keeps_clip_batches_and_hits_the_ratio():
    bucket_of = np.array([0] * 12 + [1] * 6 + [-1] * 2)  # bucket 1 is a 1-frame (image) bucket: no image batches
    clip_batches = epoch_batches(bucket_of, [3, 2], seed=1, epoch=0)
    mixed, ids = mix_image_batches(clip_batches, bucket_of, [5, 0], 0.4, seed=1, epoch=0)
    again = mix_image_batches(clip_batches, bucket_of, [5, 0], 0.4, seed=1, epoch=0)
    assert [b.tolist() for b in mixed] == [b.tolist() for b in again[0]] and ids == again[1]
    # every clip batch is still there once; image batches (id 2 + 0) hold 5 samples of bucket 0
    images = [b for b, i in zip(mixed, ids, strict=True) if i == 2]
    clips = sorted(b.tolist() for b, i in zip(mixed, ids, strict=True) if i < 2)
    assert clips == sorted(b.tolist() for b in clip_batches)
    assert all(len(b) == 5 and set(bucket_of[b].tolist()) == {0} for b in images)
    assert set(ids) <= {0, 1, 2}
    # ratio 0 is the old plan, unchanged
    plain, plain_ids = mix_image_batches(clip_batches, bucket_of, [5, 0], 0.0, seed=1, epoch=0)
    assert [b.tolist() for b in plain] == [b.tolist() for b in clip_batches]
    assert plain_ids == [int(bucket_of[b[0]]) for b in clip_batches]
    # 4 clip batches of bucket 0 at r = 0.4 want 4 * 0.4 / 0.6 = 2.67 image batches: 2 or 3 per
    # epoch (stochastic rounding), 2.67 on average, i.e. a fraction 0.4 of bucket 0's batches.
    want = 4 * 0.4 / 0.6
    counts = [mix_image_batches(epoch_batches(bucket_of, [3, 2], 1, e), bucket_of, [5, 0], 0.4, 1, e)[1].count(2)
              for e in range(400)]
    assert set(counts) == {math.floor(want), math.ceil(want)}
    assert abs(np.mean(counts) - want) < 0.1  # std of the mean is sqrt(p (1 - p) / 400) < 0.025


def test_image_batches_are_single_frames_of_the_clips(shards):
    module = VideoDataModule(_config(shards, image_ratio=0.5, image_batch_size=4))
    dataset = module.train_dataset()
    plan, shapes = dataset.epoch_plan_shapes(0)
    batches = _consume(module, len(plan))
    kinds = [tuple(b["clip"].shape) for b in batches]
    assert kinds == [(s.batch_size, s.num_frames, SIZE, SIZE, 3) for s in shapes]  # the plan says which is which
    assert (4, 1, SIZE, SIZE, 3) in kinds and (3, T, SIZE, SIZE, 3) in kinds
    image = next(b for b in batches if b["clip"].shape[1] == 1)
    reader = MemberReader(dataset.index.shards)
    refs = {ref.key: ref for ref in dataset.index.samples}
    for key, frame in zip(image["key"], image["clip"][:, 0], strict=True):
        # clips have SOURCE_FRAMES frames at SIZE already (centre crop leaves them untouched), so
        # the image must be one of them, bit for bit
        raw = reader.read(refs[key], ("mp4",))
        frames = torch.from_numpy(decode_clip(raw["mp4"], SOURCE_FRAMES, None, np.random.default_rng(0)))
        assert any(torch.equal(frame, f) for f in frames), key
    reader.close()


def test_mixed_order_resumes_exactly_with_workers(shards):
    cfg = dict(image_ratio=0.3, image_batch_size=5)
    total, stop = 14, 5  # crosses into epoch 1
    reference = _consume(VideoDataModule(_config(shards, workers=2, **cfg)), total)
    first = VideoDataModule(_config(shards, workers=2, **cfg))
    _consume(first, stop)
    resumed = VideoDataModule(_config(shards, workers=2, **cfg))
    resumed.load_state_dict(first.state_dict())
    rest = _consume(resumed, total - stop)
    assert any(b["clip"].shape[1] == 1 for b in rest) and any(b["clip"].shape[1] == T for b in rest)
    for want, got in zip(reference[stop:], rest, strict=True):
        assert want["key"] == got["key"]
        assert torch.equal(want["clip"], got["clip"])
    zero_workers = _consume(VideoDataModule(_config(shards, workers=0, **cfg)), total)
    assert [b["key"] for b in zero_workers] == [b["key"] for b in reference]


def test_default_plan_is_unchanged_and_validation_has_no_images(shards):
    module = VideoDataModule(_config(shards))
    dataset = module.train_dataset()
    assert [b.tolist() for b in dataset.epoch_plan(0)] == [
        b.tolist() for b in epoch_batches(dataset.bucket_of, [3], seed=7, epoch=0)]
    mixed = VideoDataModule(_config(shards, image_ratio=0.5, val_shards=str(shards / "train-*.tar")))
    val = list(mixed.val_dataloader())
    assert all(b["clip"].shape[1] == T for b in val)


@pytest.mark.parametrize(("field", "value"), [("image_ratio", 1.0), ("image_ratio", -0.1), ("image_batch_size", 0)])
def test_bad_mixing_fields_are_one_line_errors(shards, field, value):
    with pytest.raises(ValueError, match=f"data.{field}"):
        _config(shards, **{field: value}).validate()
