"""Bucket table: batch sizes from a voxel budget, nearest-fitting assignment, one shape per
batch, image samples in 1-frame buckets."""

from __future__ import annotations

import io
import itertools
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from dit_video.data.buckets import Bucket, assign_bucket, frames_needed, make_buckets
from dit_video.data.clips import VideoShardDataset
from dit_video.data.config import VideoDataConfig
from dit_video.data.shards import encode_mp4
from dit_video.data.synthetic import render_clip

TABLE = [{"num_frames": 17, "size": [32, 32]}, {"num_frames": 17, "size": [32, 64]},
         {"num_frames": 9, "size": [64, 32]}, {"num_frames": 1, "size": [32, 32]}]


def test_batch_sizes_keep_voxels_per_batch_about_constant():
    budget = 8 * 17 * 32 * 32
    buckets = make_buckets(TABLE, budget)
    assert [b.batch_size for b in buckets] == [8, 4, 7, 136]
    for b in buckets:
        assert budget - b.voxels < b.batch_size * b.voxels <= budget  # within one sample of the budget
    assert make_buckets([{"num_frames": 5, "size": [8, 8], "batch_size": 3}])[0].batch_size == 3


@pytest.mark.parametrize("entry, match", [
    ({"num_frames": 5, "size": [8, 8], "frames": 3}, "unknown field"),
    ({"num_frames": 0, "size": [8, 8], "batch_size": 1}, "positive"),
    ({"num_frames": 5, "size": [8, 8]}, "bucket_budget"),
])
def test_bad_bucket_entries_name_the_field(entry, match):
    with pytest.raises(ValueError, match=match):
        make_buckets([entry])
    with pytest.raises(ValueError, match=match):
        VideoDataConfig(buckets=[entry], val_shards=None, shards="x").bucket_table()


def test_nearest_fitting_bucket():
    buckets = make_buckets(TABLE, 8 * 17 * 32 * 32)
    assert assign_bucket(buckets, 64, 64, 40, 8.0, 8.0) == 0  # square, long enough: the 17-frame square
    assert assign_bucket(buckets, 128, 60, 40, 8.0, 8.0) == 1  # wide
    assert assign_bucket(buckets, 40, 80, 40, 8.0, 8.0) == 2  # tall
    assert assign_bucket(buckets, 64, 64, 12, 8.0, 8.0) == 3  # too short for 17 frames: falls to 1 frame
    assert assign_bucket(buckets, 40, 80, 5, 8.0, 8.0) == 3  # too short for 9 frames as well
    assert assign_bucket(buckets, 100, 60, 40, 8.0, 8.0, is_image=True) == 3  # images only in 1-frame buckets
    assert assign_bucket(buckets, 16, 16, 40, 8.0, 8.0) == -1  # would need upscaling everywhere
    assert frames_needed(17, 24.0, 8.0) == 49 and frames_needed(17, 8.0, None) == 17


def _write(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


KINDS = ("square", "wide", "tall", "image")


def write_mixed_shard(path, sizes: dict, count: int, rng, key=lambda kind, i: f"{kind}_{i:03d}",
                      caption=lambda key: "a red circle moving left") -> None:
    """A tar of `count` samples cycling through KINDS; sizes[kind] = (H, W, frames); images as png."""
    with tarfile.open(path, "w") as tar:
        for i in range(count):
            kind = KINDS[i % 4]
            name = key(kind, i)
            h, w, t = sizes[kind]
            clip = render_clip("red", "circle", "left", max(t, 2), (h, w), rng)[:t]  # [T, H, W, 3]
            if kind == "image":
                png = io.BytesIO()
                Image.fromarray(clip[0]).save(png, format="PNG")
                _write(tar, f"{name}.png", png.getvalue())
            else:
                _write(tar, f"{name}.mp4", encode_mp4(clip, 8.0))
            _write(tar, f"{name}.txt", caption(name).encode())
            _write(tar, f"{name}.json", json.dumps({"fps": 8.0, "frames": t, "width": w, "height": h}).encode())


@pytest.fixture(scope="module")
def mixed_shard(tmp_path_factory):
    """Square and wide 17-frame videos, short 9-frame tall videos, and png images."""
    path = tmp_path_factory.mktemp("mixed") / "mixed-000000.tar"
    sizes = {"square": (32, 32, 17), "wide": (32, 64, 17), "tall": (64, 32, 9), "image": (48, 48, 1)}
    write_mixed_shard(path, sizes, 24, np.random.default_rng(0))
    return path


def test_loader_batches_hold_one_bucket_each(mixed_shard):
    buckets = make_buckets([{**entry, "batch_size": size} for entry, size in zip(TABLE, [3, 2, 3, 2], strict=True)])
    dataset = VideoShardDataset(str(mixed_shard), 17, 8.0, (32, 32), buckets=buckets, batched=True, seed=0,
                                shuffle_buffer=1, rank=0, world_size=1)
    kinds = {dataset.index.samples[i].key.split("_")[0]: int(b) for i, b in enumerate(dataset.bucket_of)}
    assert kinds == {"square": 0, "wide": 1, "tall": 2, "image": 3}
    seen = set()
    for batch in itertools.islice(iter(dataset), 12):
        _, t, h, w, _ = batch["clip"].shape
        bucket = next(i for i, bk in enumerate(buckets) if (bk.num_frames, bk.height, bk.width) == (t, h, w))
        assert len(batch["key"]) == buckets[bucket].batch_size
        assert {k.split("_")[0] for k in batch["key"]} == {["square", "wide", "tall", "image"][bucket]}
        seen.add(bucket)
    assert seen == {0, 1, 2, 3}


def test_bucket_dataclass():
    b = Bucket(17, 32, 64, 4)
    assert b.voxels == 17 * 32 * 64 and b.aspect == 2.0
