"""The end of a run: unit states merged into the manifest (manifest.jsonl and/or manifest.parquet,
one row per sample) and report.json (drops by reason, shards, the config used); reading a
manifest back; the drop table printed to the terminal."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table

from data_prep.ingest.config import STATE_DIR, IngestConfig, have_pyarrow


def finish(cfg: IngestConfig, num_units: int, resumed_units: int, seconds: float) -> dict:
    """Merge unit states into manifest.jsonl (+ .parquet) and report.json."""
    out = Path(cfg.out)
    states = [json.loads((out / STATE_DIR / f"unit-{u:05d}.json").read_text()) for u in range(num_units)]
    rows = [row for s in states for row in s["rows"]]
    drops: Counter = Counter()
    for s in states:
        drops.update(s["dropped_by_reason"])
    fmt = cfg.manifest_format
    if fmt == "auto":
        fmt = "both" if have_pyarrow() else "jsonl"
    written = []
    if fmt in ("jsonl", "both"):
        _write_atomic(out / "manifest.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        written.append("manifest.jsonl")
    if fmt in ("parquet", "both"):
        write_parquet(rows, out / "manifest.parquet")
        written.append("manifest.parquet")
    report = {
        "sources": sum(s["sources"] for s in states),
        "clips_written": len(rows),
        "dropped_by_reason": dict(sorted(drops.items())),
        "dropped_total": sum(drops.values()),
        "shards": sorted(name for s in states for name in s["shards"]),
        "units": num_units, "units_resumed": resumed_units, "seconds": round(seconds, 2),
        "manifest": written,
        "config": dataclasses.asdict(cfg),
    }
    report["config"]["max_aspect"] = None if math.isinf(cfg.max_aspect) else cfg.max_aspect  # JSON has no inf
    _write_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
    return report


def write_parquet(rows: list[dict], path: Path) -> None:
    """manifest.parquet (pyarrow): one row per sample, one column per field (absent fields are null)."""
    import pyarrow as pa  # optional extra: dit-video[parquet]
    import pyarrow.parquet as pq

    tmp = path.with_name(path.name + ".partial")
    pq.write_table(pa.Table.from_pylist(rows), str(tmp))
    os.replace(tmp, path)  # like the JSONL: a reader never sees half a manifest


def read_manifest(path: str | Path) -> list[dict]:
    """Rows of a manifest.jsonl or manifest.parquet (by suffix). Parquet stores every column for
    every row, so fields a row did not have come back as None."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq  # optional extra: dit-video[parquet]

        return pq.read_table(str(path)).to_pylist()
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_atomic(path: Path, text: str) -> None:
    """Write through a .partial file and rename, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def print_report(report: dict) -> None:
    """The drops by reason as a table on stderr (stdout stays for the one-line summary)."""
    table = Table(title=f"ingest: {report['clips_written']} clips from {report['sources']} sources")
    table.add_column("dropped because")
    table.add_column("count", justify="right")
    for reason, n in report["dropped_by_reason"].items():
        table.add_row(reason, str(n))
    Console(stderr=True).print(table)
