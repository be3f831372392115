"""Every corrupt case skipped and counted by reason (in training, with full-size batches), the
decode timeout, and fewer shards than workers."""

from __future__ import annotations

import io
import itertools
import tarfile
import time
from collections import Counter

import numpy as np
import pytest
from torch.utils.data import DataLoader

import dit_video.data.clips as loader_mod
from dit_video.data.clips import VideoShardDataset
from dit_video.data.config import VideoDataConfig
from dit_video.data.datamodule import VideoDataModule
from dit_video.data.decode import TimedCall
from dit_video.data.index import build_index
from dit_video.data.samples import collate_clips
from dit_video.data.shards import encode_mp4
from dit_video.data.synthetic import render_clip
from dit_video.errors import SampleError

T, SIZE, FPS = 9, 16, 8.0


def _mp4(seed: int, frames: int = T) -> bytes:
    return encode_mp4(render_clip("green", "square", "up", frames, SIZE, np.random.default_rng(seed)), FPS)


def _add(tar, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _sample(tar, key: str, mp4: bytes | None = None, caption: bytes | None = b"a green square moving up",
            meta: bytes | None = b'{"fps": 8.0}') -> None:
    if mp4 is not None:
        _add(tar, f"{key}.mp4", mp4)
    if caption is not None:
        _add(tar, f"{key}.txt", caption)
    if meta is not None:
        _add(tar, f"{key}.json", meta)


@pytest.fixture(scope="module")
def corrupt_set(tmp_path_factory):
    """Three shards: one per kind of damage, 10 good samples in all."""
    root = tmp_path_factory.mktemp("corrupt")
    good = _mp4(0)
    with tarfile.open(root / "c-000000.tar", "w") as tar:
        _sample(tar, "good_00", good)
        _sample(tar, "zero_video", b"")  # zero-byte mp4
        _sample(tar, "truncated", good[: len(good) // 3])
        _sample(tar, "short", _mp4(1, frames=4))  # shorter than the clip
        _sample(tar, "no_caption", good, caption=None)
        _sample(tar, "bad_json", good, meta=b"{oops")
        _sample(tar, "good_01", good)
        _add(tar, "../evil.mp4", good)  # odd member names
        _add(tar, "/abs.mp4", good)
        _add(tar, "split.mp4", good)  # non-contiguous key: split.txt comes after another key
        _sample(tar, "good_02", good)
        _add(tar, "split.txt", b"a caption far from its video")
        _sample(tar, "dup", good)
        _add(tar, "dup.mp4", good)  # duplicate member
        for i in range(3, 6):
            _sample(tar, f"good_{i:02d}", good)
    (root / "c-000001.tar").write_bytes(b"")  # zero-byte shard
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(6, 10):
            _sample(tar, f"good_{i:02d}", good)
        _sample(tar, "cut_off", good)
    data = buf.getvalue()
    (root / "c-000002.tar").write_bytes(data[: data.index(b"cut_off.mp4") + 800])  # truncated tar, mid-member
    return root


INDEX_REASONS = {"unsafe_name": 2, "non_contiguous_key": 1, "duplicate_member": 1, "bad_tar": 2}
READ_REASONS = {"decode_error": 2, "too_short": 1, "empty_caption": 1, "bad_json": 1}


def test_index_counts_structural_damage(corrupt_set):
    shards = sorted(str(p) for p in corrupt_set.glob("c-*.tar"))
    index = build_index(shards)
    assert dict(index.skipped_by_reason) == INDEX_REASONS
    keys = sorted(s.key for s in index.samples)
    assert keys == sorted([f"good_{i:02d}" for i in range(10)] + ["zero_video", "truncated", "short", "no_caption",
                                                                   "bad_json"])


def test_validation_pass_skips_and_counts_every_case(corrupt_set):
    items = list(VideoShardDataset(str(corrupt_set / "c-*.tar"), T, None, (SIZE, SIZE), infinite=False))
    assert sorted(it["key"] for it in items) == [f"good_{i:02d}" for i in range(10)]
    counts = Counter()
    for it in items:
        counts.update(it["skipped_by_reason"])
    assert dict(counts) == {**INDEX_REASONS, **READ_REASONS}


def test_training_replaces_bad_samples_and_reports_them(corrupt_set):
    dataset = VideoShardDataset(str(corrupt_set / "c-*.tar"), T, None, (SIZE, SIZE), batch_size=5, batched=True,
                                shuffle_buffer=1, seed=0, rank=0, world_size=1)
    batches = list(itertools.islice(iter(dataset), 3))  # one epoch: 15 indexed samples, 3 batches
    assert all(len(b["key"]) == 5 and b["clip"].shape[0] == 5 for b in batches)
    assert all(k.startswith("good_") for b in batches for k in b["key"])
    counts = Counter()
    for b in batches:
        counts.update(b["skipped_by_reason"])
        assert int(b["skipped"]) == sum(b["skipped_by_reason"].values())
    assert dict(counts) == {**INDEX_REASONS, **READ_REASONS}


def test_decode_timeout_skips_a_hanging_decoder(corrupt_set, monkeypatch):
    real = loader_mod.decode_clip

    def hangs_on_one_video(data, *args):
        if data == _HANG:
            time.sleep(5)  # a decoder stuck inside FFmpeg
        return real(data, *args)

    global _HANG
    _HANG = _mp4(7)
    root = corrupt_set.parent / "hang"
    root.mkdir(exist_ok=True)
    with tarfile.open(root / "h-000000.tar", "w") as tar:
        _sample(tar, "hangs", _HANG)
        _sample(tar, "fine", _mp4(8))
    monkeypatch.setattr(loader_mod, "decode_clip", hangs_on_one_video)
    start = time.perf_counter()
    items = list(VideoShardDataset(str(root / "h-*.tar"), T, None, (SIZE, SIZE), infinite=False, decode_timeout=0.5))
    assert time.perf_counter() - start < 3
    assert [it["key"] for it in items] == ["fine"] and items[0]["skipped_by_reason"] == {"decode_timeout": 1}


def test_timed_call_passes_results_and_errors_through():
    timed = TimedCall(1.0)
    assert timed(sum, [1, 2]) == 3
    with pytest.raises(SampleError, match="too_short"):
        timed(_raise_too_short)
    assert TimedCall(None)(len, "abc") == 3
    with pytest.raises(ValueError):
        TimedCall(0)


def _raise_too_short():
    raise SampleError("too_short", "test")


def test_fewer_shards_than_workers(tmp_path):
    with tarfile.open(tmp_path / "one-000000.tar", "w") as tar:
        for i in range(6):
            _sample(tar, f"s{i}", _mp4(i))
    cfg = VideoDataConfig(shards=str(tmp_path / "one-*.tar"), val_shards=str(tmp_path / "one-*.tar"), num_frames=T,
                          fps=None, size=(SIZE, SIZE), batch_size=2, num_workers=3, seed=0)
    module = VideoDataModule(cfg)
    train = list(itertools.islice(module.train_dataloader(), 5))  # 3 batches an epoch, 3 workers, into epoch 2
    assert [b["position"] for b in train] == [(0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    val = list(module.val_dataloader())
    assert sorted(k for b in val for k in b["key"]) == [f"s{i}" for i in range(6)]
    # An item-level DataLoader with more workers than shards also sees every sample exactly once.
    dataset = VideoShardDataset(str(tmp_path / "one-*.tar"), T, None, (SIZE, SIZE), infinite=False)
    keys = [k for b in DataLoader(dataset, batch_size=2, num_workers=3, collate_fn=collate_clips) for k in b["key"]]
    assert sorted(keys) == [f"s{i}" for i in range(6)]


def test_more_processes_than_batches_is_a_clear_error(tmp_path):
    with tarfile.open(tmp_path / "tiny-000000.tar", "w") as tar:
        _sample(tar, "only", _mp4(0))
    dataset = VideoShardDataset(str(tmp_path / "tiny-*.tar"), T, None, (SIZE, SIZE), batch_size=1, batched=True,
                                rank=0, world_size=2)
    with pytest.raises(ValueError, match="fewer than the 2 processes"):
        next(iter(dataset))

