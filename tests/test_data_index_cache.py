"""The sample index at scale (dit_video/data/index_cache.py, index_table.py): built once, cached by
the shards' fingerprint, memory-mapped by every rank and worker, and a cache file that is stale,
corrupt or planted is rebuilt, never trusted. Bucket sizes come from the index, not from
re-reading every .json."""

from __future__ import annotations

import json
import logging
import mmap
import multiprocessing as mp
import os
import pickle
import tarfile
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hostile_shards import end, member, sample, write_corpus
from torch.utils.data import DataLoader, IterableDataset

from dit_video.data import index_cache
from dit_video.data.buckets import Bucket, assign_bucket
from dit_video.data.clips import VideoShardDataset
from dit_video.data.index import MemberReader, build_index
from dit_video.data.index_table import ShardIndex, write_index_file
from dit_video.data.samples import read_meta, size_of, video_ext_of
from dit_video.errors import SampleError

BUCKETS = [Bucket(9, 16, 16, 2), Bucket(1, 16, 16, 2), Bucket(5, 32, 16, 2), Bucket(9, 16, 32, 1), Bucket(17, 64, 64, 1)]
SIZES = [(16, 16, 9, 8.0), (16, 32, 12, 8.0), (32, 16, 40, 25.0), (64, 64, 100, 30.0), (8, 8, 9, 8.0), (32, 32, 3, 8.0)]
# Members a few bytes long: the index and the buckets read headers and .json only.
HOSTILE = ["zero_byte", "truncated_mid_member", "corrupt_header_mid_shard", "unsafe_dotdot", "non_utf8_name",
           "symlink_member", "size_negative", "chained_pax_headers", "non_contiguous_key", "stray_member",
           "duplicate_member", "missing_video", "json_nested_200000_deep", "meta_height_nan", "meta_frames_1e400",
           "image_header_claims_30000x30000"]


def _sized_shard(path: Path, first: int, count: int, prefix: str = "s") -> None:
    out = b""
    for i in range(first, first + count):
        w, h, frames, fps = SIZES[i % len(SIZES)]
        meta = json.dumps({"width": w, "height": h, "frames": frames, "fps": fps}).encode()
        if i % 7 == 3:
            meta = None if i % 2 else b'{"width": 16}'  # no size metadata at all, or a field missing
        key = f"{prefix}{i:04d}"
        out += sample(key, b"\0" * 40, meta=meta) if meta is not None else (
            member(f"{key}.mp4", b"\0" * 40) + member(f"{key}.txt", b"a caption"))
    path.write_bytes(out + end())


@pytest.fixture
def shards(tmp_path) -> list[str]:
    """Three shards of 20 samples of several sizes (a few without usable size metadata)."""
    root = tmp_path / "shards"
    root.mkdir()
    for s in range(3):
        _sized_shard(root / f"sized-{s}.tar", 20 * s, 20)
    return sorted(str(p) for p in root.glob("*.tar"))


@pytest.fixture
def mixed(shards) -> list[str]:
    """`shards`, and hostile shards beside them (every skip reason of the index and of the sizes)."""
    write_corpus(Path(shards[0]).parent, HOSTILE)
    return sorted(str(p) for p in Path(shards[0]).parent.glob("*.tar"))


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """The default cache folder moved into tmp_path; shards count as settled at once."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.setattr(index_cache, "RACY_SECONDS", 0.0)
    return index_cache.default_cache_dir()


class _Spy:
    """Counts tar opens (header scans) and .json reads while it is installed, in this process and
    in the processes a build forks (the counters are shared memory)."""

    def __init__(self, monkeypatch):
        self._opens, self._reads = mp.Value("l", 0), mp.Value("l", 0)
        real_open, real_read = tarfile.open, MemberReader.read

        def tar_open(*args, **kwargs):
            with self._opens.get_lock():
                self._opens.value += 1
            return real_open(*args, **kwargs)

        def read(reader, ref, exts=None):
            if exts is not None and "json" in exts:
                with self._reads.get_lock():
                    self._reads.value += 1
            return real_read(reader, ref, exts)

        monkeypatch.setattr(tarfile, "open", tar_open)
        monkeypatch.setattr(MemberReader, "read", read)

    def take(self) -> tuple[int, int]:
        taken = (self._opens.value, self._reads.value)
        self._opens.value = self._reads.value = 0
        return taken


def _mmap_backed(a: np.ndarray) -> bool:
    while isinstance(a, np.ndarray):
        a = a.base
    return isinstance(getattr(a, "obj", a), mmap.mmap)


def _same(a: ShardIndex, b: ShardIndex) -> None:
    assert list(a.samples) == list(b.samples) and [s.members for s in a.samples] == [s.members for s in b.samples]
    assert (a.shards, a.fingerprint(), dict(a.skipped_by_reason)) == (b.shards, b.fingerprint(), dict(b.skipped_by_reason))


def _dataset(shards: list[str], index=None) -> VideoShardDataset:
    return VideoShardDataset(shards, 9, None, (16, 16), buckets=BUCKETS, infinite=False, index=index)


def _reference_buckets(shards: list[str]) -> tuple[np.ndarray, Counter]:
    """Bucketing as it was before the index held sizes: every .json read and checked here."""
    index = build_index(shards)
    reader, out, bad = MemberReader(index.shards), [], Counter()
    for ref in index.samples:
        try:
            meta = read_meta(reader.read(ref, ("json",))) or {}
            image = video_ext_of(ref.members) is None
            out.append(assign_bucket(BUCKETS, *size_of(meta, image), None, image))
        except SampleError as err:
            bad[err.reason] += 1
            out.append(-1)
        except (KeyError, TypeError, OSError, EOFError):
            bad["no_bucket"] += 1
            out.append(-1)
    bad["no_bucket"] += out.count(-1) - sum(bad.values())
    return np.array(out), index.skipped_by_reason + bad


def test_the_index_is_built_once_then_mapped_with_its_bucket_sizes(mixed, cache, monkeypatch):
    spy = _Spy(monkeypatch)
    first = _dataset(mixed)
    opens, reads = spy.take()
    assert opens >= len(mixed) and reads == len(first.index)  # built: every header scanned, every .json read
    second = _dataset(mixed)
    assert spy.take() == (0, 0)  # mapped: no tar opened, no .json read
    assert _mmap_backed(second.index.member_offset) and second.index.file is not None
    assert second.index.file.startswith(str(cache)) and len(list(cache.glob("*.index"))) == 1
    reference, skips = _reference_buckets(mixed)
    assert np.array_equal(first.bucket_of, reference) and np.array_equal(second.bucket_of, reference)
    assert dict(second.index.skipped_by_reason) == dict(skips)
    assert {"bad_json", "bad_meta", "no_bucket", "bad_tar", "unsafe_name"} <= set(skips)  # the cases are exercised
    assert len(set(reference.tolist())) >= 4  # several buckets are chosen, images included


def test_the_cached_index_equals_a_fresh_scan(mixed, cache):
    fresh = build_index(mixed)
    fresh.size_row, fresh.size_rows = index_cache.read_sizes(fresh)
    index_cache.load_index(mixed)
    cached = index_cache.load_index(mixed)
    for index in (cached, index_cache.build_sized_index(mixed, processes=3)):  # shards split over processes
        _same(index, fresh)
        for name, a in fresh.arrays().items():
            assert np.array_equal(getattr(index, name), a), name
    spawned = pickle.loads(pickle.dumps(cached))  # a spawned worker maps the file again, it gets no copy
    assert _mmap_backed(spawned.shard) and spawned.file == cached.file
    _same(spawned, fresh)


def test_a_changed_shard_or_index_code_invalidates_the_cache(shards, cache, monkeypatch):
    index_cache.load_index(shards)
    spy = _Spy(monkeypatch)
    with open(shards[0], "r+b") as f:  # a sample added in place
        f.seek(-1024, os.SEEK_END)
        f.write(sample("added", b"\0" * 40) + end())
    changed = index_cache.load_index(shards)
    assert spy.take()[0] >= len(shards) and "added" in [s.key for s in changed.samples]
    _same(changed, build_index(shards))
    spy.take()
    # Other keys of the same length, written under a new inode with the old mtime put back: a change.
    st = os.stat(shards[1])
    _sized_shard(Path(shards[1] + ".new"), 20, 20, prefix="t")
    assert os.stat(shards[1] + ".new").st_size == st.st_size
    os.replace(shards[1] + ".new", shards[1])
    os.utime(shards[1], ns=(st.st_atime_ns, st.st_mtime_ns))
    assert "t0020" in [s.key for s in index_cache.load_index(shards).samples] and spy.take()[0] > 0
    index_cache.load_index(shards)
    assert spy.take()[0] == 0
    monkeypatch.setattr(index_cache, "code_version", lambda: "another version of the index code")
    index_cache.load_index(shards)
    assert spy.take()[0] > 0


def test_shards_that_just_changed_are_scanned_not_cached(shards, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    index = index_cache.load_index(shards)  # written a moment ago: their timestamps cannot vouch yet
    assert index.file is None and not list(index_cache.default_cache_dir().glob("*.index"))
    _same(index, build_index(shards))


def _planted_pickle(path: Path, canary: Path) -> None:
    class Plant:
        def __reduce__(self):
            return open, (str(canary), "w")

    path.write_bytes(pickle.dumps(Plant()))


def _forged(path: Path, shards: list[str], key: str) -> None:
    """A well-formed file (valid digest) whose members point past the end of their shard."""
    index = build_index(shards)
    arrays = index.arrays()
    arrays["member_offset"] = arrays["member_offset"] + (1 << 40)
    forged = ShardIndex(index.shards, arrays, index.exts, index.skipped_by_reason, index.fingerprint())
    write_index_file(path, forged, key)


@pytest.mark.parametrize("damage", ["empty", "cut", "flipped_byte", "pickle", "forged", "other_shards", "symlink",
                                    "huge_header"])
def test_a_bad_cache_file_is_rebuilt_never_trusted(shards, cache, tmp_path, monkeypatch, caplog, damage):
    fresh = build_index(shards)
    good = Path(index_cache.load_index(shards).file)
    data, canary = good.read_bytes(), tmp_path / "unpickled"
    key = json.loads(data[48:48 + int.from_bytes(data[8:16], "little")])["key"]
    good.unlink()
    if damage == "empty":
        good.write_bytes(b"")
    elif damage == "cut":
        good.write_bytes(data[: len(data) // 2])
    elif damage == "flipped_byte":
        good.write_bytes(data[:-9] + bytes([data[-9] ^ 1]) + data[-8:])
    elif damage == "pickle":
        _planted_pickle(good, canary)
    elif damage == "forged":
        _forged(good, shards, key)
    elif damage == "other_shards":
        write_index_file(good, build_index(shards[1:]), key)
    elif damage == "symlink":
        (tmp_path / "elsewhere.index").write_bytes(data)
        good.symlink_to(tmp_path / "elsewhere.index")
    elif damage == "huge_header":
        good.write_bytes(data[:8] + (1 << 60).to_bytes(8, "little") + data[16:])
    spy = _Spy(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="dit_video.data.dataset"):
        rebuilt = index_cache.load_index(shards)
    assert spy.take()[0] > 0 and any("not usable" in r.getMessage() for r in caplog.records)
    _same(rebuilt, fresh)
    assert not canary.exists() and not good.is_symlink()
    index_cache.load_index(shards)
    assert spy.take()[0] == 0  # replaced by a good file


@pytest.mark.parametrize("problem", ["open_to_others", "symlink"])
def test_an_unsafe_cache_folder_is_not_used(shards, tmp_path, monkeypatch, caplog, problem):
    monkeypatch.setattr(index_cache, "RACY_SECONDS", 0.0)
    folder = tmp_path / "cache"
    if problem == "open_to_others":
        folder.mkdir(mode=0o777)
        folder.chmod(0o777)
    else:
        (tmp_path / "real").mkdir(mode=0o700)
        folder.symlink_to(tmp_path / "real")
    with caplog.at_level(logging.WARNING, logger="dit_video.data.dataset"):
        index = index_cache.load_index(shards, cache_dir=folder)
    assert index.file is None and not list(folder.glob("*")) and any("not using it" in r.getMessage()
                                                                     for r in caplog.records)
    _same(index, build_index(shards))


class _WorkerView(IterableDataset):
    """What a forked DataLoader worker holds of the dataset's index: touched in full, then looked up
    in the worker's own memory map (/proc/self/smaps)."""

    def __init__(self, dataset: VideoShardDataset):
        self.dataset = dataset

    def __iter__(self):
        index = self.dataset.index
        total = sum(int(getattr(index, name).sum()) for name in index.arrays())  # every page read
        keys = [index.samples[i].key for i in range(len(index))]
        smaps = Path("/proc/self/smaps").read_text().split("\n")
        at = [i for i, line in enumerate(smaps) if line.endswith(" " + index.file)]
        fields: Counter = Counter()  # summed over the file's mappings (an earlier dataset may map it too)
        for start in at:
            for line in smaps[start + 1:start + 40]:
                name, _, value = line.partition(":")
                if not name.isidentifier():  # the next mapping's address range
                    break
                if value.strip().endswith(" kB"):
                    fields[name] += int(value.split()[0])
        yield {"pid": os.getpid(), "mapped": bool(at), "rss_kb": fields.get("Rss", 0),
               "own_kb": fields.get("Private_Dirty", -1) + fields.get("Anonymous", -1),
               "mmap_backed": _mmap_backed(index.member_offset), "keys": len(keys), "total": total}


def test_forked_workers_share_the_index_pages(shards, cache):
    _dataset(shards)  # builds the cache
    dataset = _dataset(shards)
    views = list(DataLoader(_WorkerView(dataset), batch_size=None, num_workers=2))
    assert len({v["pid"] for v in views}) == 2 and all(v["pid"] != os.getpid() for v in views)
    for view in views:
        # The worker reads the file's pages shared through the page cache: nothing of the index is
        # its own (private) memory, however much of it it reads.
        assert view["mapped"] and view["mmap_backed"] and view["rss_kb"] > 0 and view["own_kb"] == 0, view
        assert view["keys"] == len(dataset.index)


def _latent_shard(path: Path, keys: list[str]) -> None:
    path.write_bytes(b"".join(member(f"{k}.safetensors", b"\0" * 64) + member(f"{k}.txt", b"a caption")
                              for k in keys) + member("nolatent.txt", b"a caption") + end())


def test_a_latent_index_has_its_own_cache_entry(tmp_path, cache):
    shard = tmp_path / "latents-000000.tar"
    _latent_shard(shard, ["a", "b", "c"])
    latent = index_cache.load_index([str(shard)], required=("safetensors",), sizes=False)
    video = index_cache.load_index([str(shard)])
    assert latent.file != video.file and latent.size_row is None
    _same(latent, build_index([str(shard)], required=("safetensors",)))
    assert [s.key for s in latent.samples] == ["a", "b", "c"] and len(video) == 0


def test_the_parallel_build_finishes_in_a_process_whose_sigterm_handler_only_sets_a_flag(shards):
    """Inside a training process SIGTERM sets a flag (Lightning's handler, or Preemption's). The
    parallel build's pool used to end its workers with SIGTERM (Pool.__exit__ -> terminate), and
    they inherited the handler: the build never returned. Checked in a child process with a timeout."""
    import subprocess
    import sys

    # Pool.terminate() is what sends the SIGTERM: whether it wins the race with the workers' own
    # exit depends on timing, so the child fails outright when the build calls it at all.
    code = ("import os, signal, sys; signal.signal(signal.SIGTERM, lambda *a: None); "
            "import multiprocessing.pool as mpp; mpp.Pool.terminate = lambda self: os._exit(3); "
            "from dit_video.data.index_cache import build_sized_index; "
            "print(len(build_sized_index(sys.argv[1:], processes=3)))")
    out = subprocess.run([sys.executable, "-c", code, *shards], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1], check=True).stdout
    assert int(out) == len(build_index(shards))
