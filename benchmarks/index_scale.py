"""The sample index at WebVid scale: built once per node, mapped by every rank and worker.

    python benchmarks/index_scale.py [--samples 1000000] [--shard-size 10000] [--workers 8] [--out DIR]

Writes --samples synthetic samples into tar shards under --out (kept, and reused by the next run
with the same sizes): each has an mp4, a txt and a json member with WebVid-like size metadata
(a few sizes, frame counts of 100-1000 at 24-30 fps). Member data is a few bytes: the index reads
headers and .json members only, so data size changes seeks, not work. Then it measures

  build       what the first process of a node does (and, before the cache, what every rank
              did at start): scan every tar header (index.build_index), read every .json
              (index_cache.read_sizes), write the cache file. The shards were just written, so
              they are in the page cache: this is the CPU cost, not a cold disk's.
  load/rank   what every rank does now: stat the shards, map the cache file and check it
              (sha256 of it all, every offset and id), assign buckets (conf/data/webvid_256_buckets
              at its fps): VideoShardDataset's construction, in a fresh process.
  memory      per forked worker (--workers at once, as DataLoader forks them), the growth of RSS,
              PSS, USS (private pages) and private dirty pages (copied ones) while the worker
              touches the whole index: for the mapped arrays, and for what each worker held
              before, the Python list of SampleRef (its pages are copied as reference counts change).

Each figure is printed beside its extrapolation to 10M clips and 64 ranks (8 nodes x 8 GPUs,
--workers loader workers each): linear in samples, build once per node (the nodes in parallel),
load on every rank. Timings on a busy machine are noisy; memory figures are not.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit_video.data import index_cache  # noqa: E402
from dit_video.data.buckets import make_buckets  # noqa: E402
from dit_video.data.clips import VideoShardDataset  # noqa: E402
from dit_video.data.config import resolve_shards  # noqa: E402
from dit_video.data.index import build_index  # noqa: E402
from dit_video.data.index_table import write_index_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGET_SAMPLES, NODES, GPUS_PER_NODE = 10_000_000, 8, 8
SIZES = [(596, 336), (640, 360), (480, 270), (336, 596), (426, 240)]
FPS = [24.0, 25.0, 29.97, 30.0]


# --- synthetic shards --------------------------------------------------------------------------

def _member(name: str, data: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 1_700_000_000
    return info.tobuf(format=tarfile.GNU_FORMAT) + data + b"\0" * (-len(data) % 512)


def write_shards(out: Path, samples: int, shard_size: int) -> list[str]:
    """`samples` samples in shards of `shard_size` under `out` (reused if already complete)."""
    done = out / "complete.json"
    want = {"samples": samples, "shard_size": shard_size, "version": 1}
    if done.exists() and json.loads(done.read_text()) == want:
        return resolve_shards(str(out / "shard-*.tar"))
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("shard-*.tar"):
        old.unlink()
    start = time.perf_counter()
    for s, first in enumerate(range(0, samples, shard_size)):
        chunks = []
        for i in range(first, min(samples, first + shard_size)):
            key = f"{i:09d}"
            w, h = SIZES[i % len(SIZES)]
            meta = {"width": w, "height": h, "frames": 100 + (i * 37) % 900, "fps": FPS[(i // 7) % len(FPS)],
                    "source": f"webvid/{i}"}
            chunks += [_member(f"{key}.mp4", b"\0" * 16), _member(f"{key}.txt", b"a caption"),
                       _member(f"{key}.json", json.dumps(meta).encode())]
        (out / f"shard-{s:06d}.tar").write_bytes(b"".join(chunks) + b"\0" * 1024)
    done.write_text(json.dumps(want))
    print(f"wrote {samples} samples in {-(-samples // shard_size)} shards in {time.perf_counter() - start:.0f} s")
    time.sleep(index_cache.RACY_SECONDS)  # shards this fresh are not cached (index_cache's racy rule)
    return resolve_shards(str(out / "shard-*.tar"))


# --- memory of forked workers ------------------------------------------------------------------

def rollup(pid: int | str = "self") -> dict[str, int]:
    """/proc/PID/smaps_rollup in kB: Rss, Pss, Private_Clean, Private_Dirty, ..."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            out[name] = int(value.split()[0])
    return out


def mapping(path: str) -> dict[str, int]:
    """/proc/self/smaps fields (kB) summed over this process's mappings of the file `path`."""
    out: dict[str, int] = {}
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        name, _, value = line.partition(":")
        if not name.isidentifier():  # a mapping's header: "address perms offset dev inode path"
            inside = line.endswith(" " + path)
        elif inside and value.strip().endswith("kB"):
            out[name] = out.get(name, 0) + int(value.split()[0])
    return out


_HELD = None  # what forked workers inherit: the mapped ShardIndex, or the old list of SampleRef


def _touch(held) -> int:
    if isinstance(held, list):  # the old index: every SampleRef's refcount (and its members') changes
        return sum(len(ref.members) for ref in held)
    return sum(int(a.sum()) for a in held.arrays().values())  # every page of every array read


def _worker(barrier, queue) -> None:
    before = rollup()
    _touch(_HELD)
    barrier.wait()  # all workers hold their pages before any is measured (PSS divides by sharers)
    after, mapped = rollup(), ({} if isinstance(_HELD, list) else mapping(_HELD.file))
    barrier.wait()
    queue.put({"private": after["Private_Clean"] + after["Private_Dirty"] - before["Private_Clean"]
               - before["Private_Dirty"], "file_rss": mapped.get("Rss", 0), "file_pss": mapped.get("Pss", 0)})


def worker_memory(held, workers: int) -> dict[str, float]:
    """Per forked worker (mean, MB), `workers` at once: private pages gained while touching all of
    `held` (pages copied from the parent: its own memory), and for a mapped index the resident
    size and proportional share (PSS) of the index file's pages."""
    global _HELD
    _HELD = held
    ctx = mp.get_context("fork")
    barrier, queue = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(barrier, queue)) for _ in range(workers)]
    for p in procs:
        p.start()
    grown = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    _HELD = None
    return {k: sum(g[k] for g in grown) / len(grown) / 1024 for k in grown[0]}


# --- timings -----------------------------------------------------------------------------------

def _rank_start(shards: list[str], cache_dir: str, queue) -> None:
    """A fresh process doing what a rank does at start (the index and its buckets)."""
    cfg = yaml.safe_load((ROOT / "conf/data/webvid_256_buckets.yaml").read_text())
    fps = yaml.safe_load((ROOT / "conf/data/webvid_256.yaml").read_text())["fps"]
    buckets = make_buckets(cfg["buckets"], cfg["bucket_budget"])
    start = time.perf_counter()
    index = index_cache.load_index(shards, cache_dir=cache_dir)
    mapped = time.perf_counter() - start
    dataset = VideoShardDataset(shards, 33, float(fps), (256, 256), buckets=buckets, infinite=True, index=index,
                                rank=0, world_size=1)
    queue.put({"map": mapped, "total": time.perf_counter() - start, "fits": int((dataset.bucket_of >= 0).sum()),
               "rows": len(index.size_rows)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--shard-size", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=8, help="forked workers measured at once (webvid_256: 8)")
    parser.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "dit_video-index-bench"))
    parser.add_argument("--skip-old", action="store_true", help="skip the memory of the old list of SampleRef")
    args = parser.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    print(f"CPU: {cpu}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")

    out = Path(args.out)
    shards = write_shards(out / "shards", args.samples, args.shard_size)
    cache_dir = out / "cache"
    cache_dir.mkdir(mode=0o700, exist_ok=True)
    for old in cache_dir.glob("*"):
        old.unlink()
    n = args.samples

    # 1. build: scan, sizes, write in one process; then the node's build over all its cores
    t0 = time.perf_counter()
    index = build_index(shards)
    t1 = time.perf_counter()
    index.size_row, index.size_rows = index_cache.read_sizes(index)
    t2 = time.perf_counter()
    probe = cache_dir / "probe.index"
    write_index_file(probe, index, "probe")
    t3 = time.perf_counter()
    file_mb = probe.stat().st_size / 2**20
    probe.unlink()
    assert len(index) == n, (len(index), n)
    cores = min(len(os.sched_getaffinity(0)), len(shards) // index_cache.MIN_SHARDS_PER_PROCESS)
    t4 = time.perf_counter()
    index_cache.load_index(shards, cache_dir=cache_dir)  # builds the cache the ranks below map
    build = {"scan": t1 - t0, "sizes": t2 - t1, "write": t3 - t2, "node": time.perf_counter() - t4}

    # 2. load per rank (a fresh process, so nothing is warm in Python; the file is in the page cache)
    ctx, loads = mp.get_context("spawn"), []
    for _ in range(3):
        queue = ctx.Queue()
        p = ctx.Process(target=_rank_start, args=(shards, str(cache_dir), queue))
        p.start()
        loads.append(queue.get())
        p.join()
    load = min(loads, key=lambda x: x["total"])

    # 3. memory per forked worker
    mapped = index_cache.load_index(shards, cache_dir=cache_dir)
    new_mem = worker_memory(mapped, args.workers)
    old_mem, list_mb = None, None
    if not args.skip_old:
        del index
        gc.collect()
        before = rollup()["Rss"]
        refs = list(mapped.samples)  # what ShardIndex.samples was: one SampleRef (and dict, tuples, str) each
        list_mb = (rollup()["Rss"] - before) / 1024
        old_mem = worker_memory(refs, args.workers)
        del refs

    scale, procs_per_node = TARGET_SAMPLES / n, GPUS_PER_NODE * (1 + args.workers)
    one = build["scan"] + build["sizes"] + build["write"]
    print(f"\n{n:,} samples ({3 * n:,} members) in {len(shards)} shards; cache file {file_mb:.0f} MB "
          f"({file_mb * 2**20 / n:.0f} B/sample); {load['rows']} distinct sizes, {load['fits']:,} samples fit a bucket")
    print(f"{'':46s}{'measured':>12s}{'10M clips, 64 ranks':>28s}")
    row = "{:46s}{:>12s}{:>28s}".format
    print(row("build, 1 process: scan headers", f"{build['scan']:.1f} s", f"{build['scan'] * scale / 60:.1f} min"))
    print(row("build, 1 process: read .json sizes", f"{build['sizes']:.1f} s", f"{build['sizes'] * scale / 60:.1f} min"))
    print(row("build, 1 process: write cache file", f"{build['write']:.2f} s", f"{build['write'] * scale:.1f} s"))
    print(row(f"build once per node, {cores} processes here", f"{build['node']:.1f} s",
              f"{one * scale / 60 / 64:.1f} min of CPU / 64 cores"))
    print(row("load per rank: map + check cache file", f"{load['map']:.2f} s", f"{load['map'] * scale:.1f} s"))
    print(row("load per rank: assign buckets", f"{load['total'] - load['map']:.2f} s",
              "~same (per distinct size)"))
    before_s = build["scan"] + build["sizes"]
    print(row("before: every rank scans + reads .json", f"{before_s:.1f} s", f"{before_s * scale / 60:.0f} min x 64 ranks"))
    print(row("cache file in the page cache, per node", f"{file_mb:.0f} MB", f"{file_mb * scale / 1024:.2f} GB"))
    gb = scale / 1024
    print(row(f"per worker ({args.workers} forked), mapped: resident", f"{new_mem['file_rss']:.0f} MB",
              f"{new_mem['file_rss'] * gb:.2f} GB"))
    print(row("per worker, mapped: PSS (share of page cache)", f"{new_mem['file_pss']:.0f} MB",
              f"{new_mem['file_pss'] * gb:.2f} GB"))
    print(row("per worker, mapped: private (copied) pages", f"{new_mem['private']:.1f} MB",
              f"{new_mem['private'] * gb:.2f} GB"))
    if old_mem is not None:
        print(row("before: list of SampleRef per rank", f"{list_mb:.0f} MB", f"{list_mb * gb:.1f} GB"))
        print(row("before: per worker, private (copied) pages", f"{old_mem['private']:.0f} MB",
                  f"{old_mem['private'] * gb:.1f} GB"))
        node_old = (list_mb + args.workers * old_mem["private"]) * gb * GPUS_PER_NODE
        node_new = file_mb * gb + new_mem["private"] * gb * procs_per_node
        print(row(f"index memory per node ({procs_per_node} processes)", "",
                  f"{node_old:.0f} GB -> {node_new:.1f} GB"))
    print("(timings on a shared machine are noisy; memory figures are not)")


if __name__ == "__main__":
    main()
