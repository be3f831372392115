"""The sample index, built once per node and shared: every rank and DataLoader worker maps one file.

Without this every rank scans every tar header (and, with buckets, reads every sample's .json)
at startup: 64 ranks x 10M WebVid clips is 64 scans of 30M headers. `load_index` instead

    key   = sha256(the index code's own source, `required`, and for every shard its absolute
            path, size, mtime, ctime and inode)       -- any change to a shard or to the code
    file  = CACHE_DIR/{slot}.index                    -- one slot per (code, shard paths, required)
    valid file for `key`  -> map it (index_table.open_index_file checks all of it, and it never
                             holds code: a planted file is data that fails its checks)
    otherwise             -> the first process of the node to take {slot}.lock scans the shards,
                             reads each sample's .json size metadata (for buckets), writes the file
                             under a temporary name and renames it; the others wait, then map it

A file that is stale, cut, corrupt or forged is rebuilt (and its problem logged), never trusted.
A shard changed less than RACY_SECONDS ago is not cached: a change within the file system's
timestamp resolution could leave its size, mtime and ctime as they were (git's "racy clean"
problem); such a shard set is scanned in memory, as before, until it settles.

CACHE_DIR defaults to a folder of this user in the node's temp dir, mode 0700: a folder that is
not ours, is open to others or is a symlink is not used (a warning, and the scan in memory).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import multiprocessing as mp
import os
import signal
import tempfile
import time
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from dit_video.data import index as index_module
from dit_video.data import index_table, samples
from dit_video.data.index import MemberReader, build_index, scan_shard
from dit_video.data.index_table import (
    SIZE_COLUMNS,
    SIZE_STATUS,
    IndexBuilder,
    IndexFileError,
    SampleRef,
    ShardIndex,
    open_index_file,
    write_index_file,
)
from dit_video.data.samples import read_meta, size_of, video_ext_of
from dit_video.errors import SampleError
from dit_video.files import atomic_write, private_folder_problem

logger = logging.getLogger("dit_video.data.dataset")

RACY_SECONDS = 2.0  # coarser than any file system's timestamps (FAT's are 2 s; ext4, xfs, NFSv4: ns to ms)
MIN_SHARDS_PER_PROCESS = 4  # below this a build stays in one process (forking costs more than it saves)


def default_cache_dir() -> Path:
    """This user's index cache on this node (on clusters the temp dir is per node)."""
    return Path(tempfile.gettempdir()) / f"dit_video-index-{os.getuid()}"


@functools.cache
def code_version() -> str:
    """sha256 of the source of every module that decides what an index holds: editing any of
    them (a skip rule, a limit, the size checks, the file format) invalidates every cache."""
    h = hashlib.sha256()
    for module in (index_module, index_table, samples):
        h.update(Path(module.__file__).read_bytes())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()


def load_index(shards: Sequence[str], required: Sequence[str] | None = None, *, sizes: bool = True,
               cache_dir: str | os.PathLike | None = None) -> ShardIndex:
    """The ShardIndex of `shards` (as index.build_index gives it), from this node's cache when it
    is valid, else built by one process of the node and cached for the others.

    sizes: also hold each sample's .json size metadata (video shards, for buckets); a cached index
    has them, one scanned in memory reads them when bucketing asks (read_sizes)."""
    shards = list(shards)
    folder = _private_folder(Path(cache_dir) if cache_dir is not None else default_cache_dir())
    try:
        stats = [os.stat(s) for s in shards]
    except OSError:  # a shard vanished since it was listed: the scan counts it (bad_tar)
        return build_index(shards, required)
    settled = time.time_ns() - int(RACY_SECONDS * 1e9)
    fresh = [s for s, st in zip(shards, stats, strict=True) if max(st.st_mtime_ns, st.st_ctime_ns) > settled]
    if fresh:
        logger.info("index of %d shards not cached: %s changed less than %g s ago", len(shards), fresh[0],
                    RACY_SECONDS)
    if folder is None or fresh:
        return build_index(shards, required)
    paths = [os.path.abspath(s) for s in shards]
    what = {"code": code_version(), "required": list(required) if required else None, "sizes": sizes}
    slot = _sha256({**what, "shards": paths})[:32]
    key = _sha256({**what, "shards": [[p, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
                                      for p, st in zip(paths, stats, strict=True)]})
    path, sizes_now = folder / f"{slot}.index", [st.st_size for st in stats]
    start = time.perf_counter()
    index, _ = _try_open(path, key, shards, sizes_now)
    if index is None:
        with _locked(folder / f"{slot}.lock"):
            index, problem = _try_open(path, key, shards, sizes_now)  # another process may have built it meanwhile
            if index is None:
                if problem is not None:
                    logger.warning("index cache %s is not usable (%s): rebuilding it", path, problem)
                built = _build_and_write(path, key, shards, required, sizes)
                index, problem = _try_open(path, key, shards, sizes_now)
                if index is None:  # not written (a full disk?): this process keeps its own copy
                    logger.warning("index cache %s could not be written or read back (%s): using the index "
                                   "in memory", path, problem)
                    return built
    logger.info("index of %d shards (%d samples) mapped from %s in %.2f s", len(shards), len(index), path,
                time.perf_counter() - start)
    return index


def _try_open(path: Path, key: str, shards: list[str], sizes: list[int]) -> tuple[ShardIndex | None, str | None]:
    """(the index in `path`, None), or (None, why not; None when there is no file)."""
    if not path.exists():
        return None, None
    try:
        return open_index_file(path, key, shards, sizes), None
    except IndexFileError as exn:
        return None, str(exn)


def _build_and_write(path: Path, key: str, shards: list[str], required, sizes: bool) -> ShardIndex:
    start = time.perf_counter()
    index = build_sized_index(shards, required, sizes=sizes)
    try:
        atomic_write(path, lambda tmp: write_index_file(tmp, index, key))
    except OSError as exn:
        logger.warning("index cache %s: %s: %s", path, type(exn).__name__, exn)
    logger.info("indexed %d shards (%d samples) in %.1f s", len(shards), len(index), time.perf_counter() - start)
    return index


def build_sized_index(shards: Sequence[str], required: Sequence[str] | None = None, *, sizes: bool = True,
                      processes: int | None = None) -> ShardIndex:
    """index.build_index, plus each sample's size metadata (read_sizes), with the shards split over
    `processes` forked processes (default: every core this process may use, with at least
    MIN_SHARDS_PER_PROCESS shards each).

    The same index as the sequential scan, in the same order: shards are merged in their order."""
    shards = list(shards)
    if processes is None:
        processes = min(len(os.sched_getaffinity(0)), len(shards) // MIN_SHARDS_PER_PROCESS)
    if mp.current_process().daemon:  # a DataLoader worker may not fork processes of its own
        processes = 1
    builder, rows, size_row = IndexBuilder(shards), {}, array("i")
    jobs = [(path, required, sizes) for path in shards]
    # fork, as DataLoader starts its workers: nothing is re-imported. Each job carries one path;
    # each answer is that shard's index as arrays (no Python object per sample crosses processes).
    pool = mp.get_context("fork").Pool(processes, initializer=_default_signals) if processes > 1 else None
    try:
        answers = pool.imap(_index_shard, jobs) if pool else map(_index_shard, jobs)
        for i, (part, local_rows, local_row) in enumerate(answers):
            builder.extend(part, i)
            lookup = np.array([rows.setdefault(row, len(rows)) for row in local_rows], np.int32)  # [r] -> [R]
            size_row.extend(lookup[local_row].tolist())
    finally:
        # close + join lets the workers exit on their own; Pool.__exit__ would terminate() them
        # with SIGTERM, which hangs forever when the builder runs inside a training process whose
        # SIGTERM handler only sets a flag (Lightning's, or dit_video.callbacks.Preemption).
        if pool is not None:
            pool.close()
            pool.join()
    index = builder.finish()
    if sizes:
        index.size_row = np.array(size_row, np.int32)  # [N]
        index.size_rows = np.array(list(rows), np.float64).reshape(-1, SIZE_COLUMNS)  # [R, 6]
    return index


def _default_signals() -> None:
    """Pool workers die of SIGTERM/SIGINT as plain processes do: the training process they were
    forked from may have handlers that only set a flag."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _index_shard(job) -> tuple[ShardIndex, list[tuple], np.ndarray]:
    """One shard's index (as shard 0 of its own), and if asked its distinct size rows and the row
    of each sample: the unit of work of a build."""
    path, required, sizes = job
    refs, skips = scan_shard(path, 0, required)
    builder = IndexBuilder([path])
    for ref in refs:
        builder.add(ref)
    builder.skipped_by_reason.update(skips)
    rows: dict[tuple, int] = {}
    if sizes:
        reader = MemberReader([path])
        try:
            local_row = np.array([rows.setdefault(_size_row(reader, ref), len(rows)) for ref in refs], np.int32)
        finally:
            reader.close()
    else:
        local_row = np.zeros(0, np.int32)
    return builder.finish(), list(rows), local_row


def read_sizes(index: ShardIndex) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's size metadata from its .json, for bucketing: (size_row int32 [N], size_rows
    float64 [R, 6]): rows (status, width, height, frames, fps, is_image), one per distinct value."""
    rows: dict[tuple, int] = {}
    size_row = np.empty(len(index), np.int32)  # [N]
    reader = MemberReader(index.shards)
    try:
        for i, ref in enumerate(index.samples):
            size_row[i] = rows.setdefault(_size_row(reader, ref), len(rows))
    finally:
        reader.close()
    return size_row, np.array(list(rows), dtype=np.float64).reshape(-1, SIZE_COLUMNS)  # [R, 6]


def _size_row(reader: MemberReader, ref: SampleRef) -> tuple:
    """(status, width, height, frames, fps, is_image) of one sample. status indexes SIZE_STATUS:
    "ok", or why the sample cannot be bucketed: "bad_json" (unreadable), "bad_meta" (a size that
    lies: samples.size_of), "no_bucket" (no .json, or a size field missing); logged here, once."""
    is_image = video_ext_of(ref.members) is None
    try:
        meta = read_meta(reader.read(ref, ("json",))) or {}
        return (SIZE_STATUS.index("ok"), *size_of(meta, is_image), is_image)
    except SampleError as err:  # bad_json, bad_meta
        logger.warning("skipped sample %r: %s (%s)", ref.key, err.reason, err.detail)
        return (SIZE_STATUS.index(err.reason), 0, 0, 0, 0.0, is_image)
    except (KeyError, TypeError, OSError, EOFError) as exn:
        logger.warning("sample %r has no usable size metadata (%s): left out of the buckets", ref.key, exn)
        return (SIZE_STATUS.index("no_bucket"), 0, 0, 0, 0.0, is_image)


def _sha256(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _private_folder(path: Path) -> Path | None:
    """`path`, created with mode 0700 if absent; None (and a warning) if it is a symlink, not a
    folder, not ours or open to other users: someone else could plant or swap files in it."""
    try:
        problem = private_folder_problem(path)
    except OSError as exn:
        logger.warning("index cache folder %s cannot be made (%s): scanning the shards in memory", path, exn)
        return None
    if problem:
        logger.warning("index cache folder %s is %s: not using it (scanning the shards in memory); remove it, "
                       "or pass a folder only you can write", path, problem)
        return None
    return path


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    # The node's processes queue here; the lock goes with the file descriptor, also if we die.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
