"""Running an ingest: sources cut into units of --unit-size, processed in parallel (--workers
processes), each finished unit saved as OUT/.ingest/unit-XXXXX.json so a rerun with the same
arguments skips it (resume). The merge into manifest and report is in manifest.py."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from data_prep.ingest.config import STATE_DIR, IngestConfig
from data_prep.ingest.manifest import finish
from data_prep.ingest.process import process_source
from dit_video.data.shards import ShardWriter


def run_unit(unit: int, sources: list[dict], cfg: IngestConfig) -> dict:
    """Ingest one unit of sources into its own shards; returns (and saves) its state."""
    out = Path(cfg.out)
    drops: Counter = Counter()
    rows = []
    with ShardWriter(out, prefix=f"{cfg.prefix}-{unit:05d}", max_count=cfg.shard_size,
                     max_bytes=cfg.shard_bytes) as writer:
        for src in sources:
            new = process_source(src, cfg, writer, drops)
            for row in new:
                row["shard"] = f"{cfg.prefix}-{unit:05d}-{len(writer.shards):06d}.tar"
            rows.extend(new)
    state = {"unit": unit, "sources": len(sources), "rows": rows, "dropped_by_reason": dict(drops),
             "shards": [p.name for p in writer.shards]}
    path = out / STATE_DIR / f"unit-{unit:05d}.json"
    tmp = path.with_suffix(".json.partial")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)  # the unit counts as done only once its state is complete
    return state


def ingest(sources: list[dict], cfg: IngestConfig, progress: bool = False) -> dict:
    """Run (or continue) an ingest; writes the manifest and report; returns the report."""
    cfg.validate()
    out = Path(cfg.out)
    (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    units = [sources[i:i + cfg.unit_size] for i in range(0, len(sources), cfg.unit_size)]
    done = {int(p.stem.split("-")[1]) for p in (out / STATE_DIR).glob("unit-*.json")}
    todo = [u for u in range(len(units)) if u not in done]
    start = time.perf_counter()
    bar = _progress(progress, len(units), len(done))
    with bar:
        task = bar.add_task("ingest", total=len(units), completed=len(done)) if bar else None
        if cfg.workers == 1 or len(todo) <= 1:
            for u in todo:
                run_unit(u, units[u], cfg)
                if bar:
                    bar.advance(task)
        else:
            with ProcessPoolExecutor(max_workers=cfg.workers) as pool:
                futures = [pool.submit(run_unit, u, units[u], cfg) for u in todo]
                for fut in as_completed(futures):
                    fut.result()
                    if bar:
                        bar.advance(task)
    return finish(cfg, len(units), len(done), time.perf_counter() - start)


class _NoBar:
    """Stands in for the progress bar when stderr is not a terminal: a context that is falsy."""

    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False

    def __bool__(self):
        return False


def _progress(enabled: bool, total: int, done: int):
    """A rich progress bar over units, or a _NoBar."""
    if not enabled:
        return _NoBar()
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
