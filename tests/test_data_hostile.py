"""Hostile shards (tests/hostile_shards.py, generated here) through the loader (0 and 2 workers,
validation and training) and through `data_prep.ingest --shards`: the run goes on, every bad
sample is counted under its reason, every good sample beside it is read. Plus: the index over
random tar bytes never raises, and a shard cut after indexing is a counted skip."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from hostile_shards import SIZE, T, base256, good_mp4, header, patched, sample, write_corpus
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from dit_video.data.buckets import Bucket
from dit_video.data.clips import VideoShardDataset
from dit_video.data.index import MemberReader, build_index

ROOT = Path(__file__).resolve().parents[1]
BUCKETS = [Bucket(T, SIZE, SIZE, 1), Bucket(1, SIZE, SIZE, 1)]  # two buckets: metadata is read and checked


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    return root, write_corpus(root)


def _expected(shards, field: str) -> Counter:
    total: Counter = Counter()
    for shard in shards:
        total.update(getattr(shard, field))
    return total


def test_the_corpus_has_at_least_25_kinds(corpus):
    _, shards = corpus
    assert len(shards) >= 25 and len({s.kind for s in shards}) == len(shards)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_counts_every_bad_sample_and_reads_every_good_one(corpus, workers):
    root, shards = corpus
    dataset = VideoShardDataset(str(root / "*.tar"), T, None, (SIZE, SIZE), infinite=False, buckets=BUCKETS,
                                decode_timeout=30.0)
    keys, counts = [], Counter()
    for item in DataLoader(dataset, batch_size=None, num_workers=workers):
        keys.append(item["key"])
        counts.update(item["skipped_by_reason"])
        assert tuple(item["clip"].shape) in {(T, SIZE, SIZE, 3), (1, SIZE, SIZE, 3)}
    assert sorted(keys) == sorted(k for s in shards for k in s.loader_good)
    assert counts == _expected(shards, "loader")


def test_training_goes_on_through_the_corpus(corpus):
    root, shards = corpus
    dataset = VideoShardDataset(str(root / "*.tar"), T, None, (SIZE, SIZE), infinite=True, buckets=BUCKETS,
                                decode_timeout=30.0, batched=True, seed=0, rank=0, world_size=1)
    good = {k for s in shards for k in s.loader_good}
    batches = list(itertools.islice(iter(dataset), 2 * len(good)))  # two epochs' worth
    assert all(k in good for b in batches for k in b["key"])
    counts = Counter()
    for b in batches:
        counts.update(b["skipped_by_reason"])
    # Structural and metadata skips are counted once; each bad sample that is read is counted once.
    assert set(counts) == set(_expected(shards, "loader"))


def test_ingest_counts_every_bad_sample_and_writes_every_good_one(corpus, tmp_path):
    root, shards = corpus
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "data_prep.ingest", "--shards", str(root / "*.tar"), "--out", str(out),
                           "--workers", "2", "--unit-size", "16"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["dropped_by_reason"] == dict(sorted(_expected(shards, "ingest").items()))
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    written = sorted(row["source"].rsplit("#", 1)[1] for row in rows)
    assert written == sorted(k for s in shards for k in s.ingest_good)
    # ... and what ingest wrote decodes in the loader, every clip of it.
    items = list(VideoShardDataset(str(out / "*.tar"), 4, None, (SIZE, SIZE), infinite=False))
    assert len(items) == len(rows) and all(it["skipped_by_reason"] == {} for it in items)


def test_a_shard_cut_after_indexing_is_a_counted_skip(tmp_path):
    mp4 = good_mp4()
    path = tmp_path / "cut-000000.tar"
    path.write_bytes(sample("a", mp4) + sample("b", mp4) + b"\0" * 1024)
    dataset = VideoShardDataset(str(path), T, None, (SIZE, SIZE), infinite=False)  # indexes the whole file
    with open(path, "r+b") as f:  # then someone rewrites the shard: b's video is cut short
        f.truncate(len(sample("a", mp4)) + 512 + len(mp4) // 2)
    items = list(dataset)
    assert [it["key"] for it in items] == ["a"] and items[0]["skipped_by_reason"] == {"shard_changed": 1}


_NAMES = st.one_of(st.sampled_from(["a.mp4", "a.txt", "a.json", "b.mp4", "../c.mp4", "/d.txt", "e"]),
                   st.binary(min_size=1, max_size=30).filter(lambda b: b"\0" not in b)
                   .map(lambda b: b.decode("utf-8", "surrogateescape")))
_TYPES = st.sampled_from([tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE,
                          tarfile.FIFOTYPE, tarfile.GNUTYPE_SPARSE, tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME, b"Z"])
_SIZES = st.one_of(st.none(), st.integers(-(1 << 70), 1 << 80), st.integers(-1024, 4096))


@st.composite
def tar_bytes(draw) -> bytes:
    """Tars whose headers are valid blocks with hostile fields (names, types, base-256 sizes),
    followed by random data, sometimes cut anywhere; or plain random bytes."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=4096))
    out = b""
    for _ in range(draw(st.integers(1, 4))):
        data = draw(st.binary(max_size=1500))
        block = header(draw(_NAMES), len(data), draw(_TYPES))
        size = draw(_SIZES)
        if size is not None:
            block = block[:-512] + patched(block[-512:], 124, base256(size))
        out += block + data + b"\0" * (-len(data) % 512)
    if draw(st.booleans()):
        out += b"\0" * 1024
    return out[:draw(st.integers(0, len(out)))] if draw(st.booleans()) else out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=tar_bytes())
def test_the_index_never_raises_on_any_bytes(tmp_path, data):
    path = tmp_path / "fuzz.tar"
    path.write_bytes(data)
    index = build_index([str(path)])  # anything wrong is a counted skip, nothing else
    reader = MemberReader(index.shards)
    for ref in index.samples:
        for ext, (offset, size) in ref.members.items():
            assert 0 <= offset and offset + size <= len(data), (ext, offset, size)
        assert {e: len(b) for e, b in reader.read(ref).items()} == {e: s for e, (_, s) in ref.members.items()}
        ref.key.encode("utf-8")  # keys are text: they are logged, hashed and batched
    reader.close()
    index.fingerprint()
    assert all(n > 0 for n in index.skipped_by_reason.values())
