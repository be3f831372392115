"""Tar shards -> a random-access sample index: which members each sample has and where they lie.

Exact, resumable order needs random access (sample i of epoch e, wherever it lives), so instead
of streaming tars front to back, the loader scans each shard's headers once (tarfile seeks over
the data, so this reads ~512 bytes per member) and later reads members by byte offset.

A sample is the set of members sharing a key (the member name up to the first dot of its base
name, as in WebDataset). Structural problems are found here, once, and counted by reason:
  bad_tar             zero-byte, truncated or corrupt tar, once per damaged place: samples before
                      it are kept, and scanning resumes at the next valid header after it (a member
                      beside the damage may be lost, so the samples touching it are dropped)
  unsafe_name         a member name with a '..' component or a leading '/' (never read)
  bad_name            a member name that is not UTF-8 (keys are logged, hashed and batched as text)
  not_a_file          a link, device or fifo member (never followed)
  sparse_member       a GNU sparse member (its bytes in the tar are not its content)
  too_large           a sample whose members add up to more than MAX_SAMPLE_BYTES
  non_contiguous_key  a key whose members are not adjacent in the tar and whose first run of
                      members is not a complete sample (ambiguous: which members belong to it?),
                      dropped whole
  stray_member        a later run of members repeating the key of a complete sample: the first
                      complete sample is kept, each stray run is counted here
  duplicate_member    the same key.ext twice in one run of members, dropped whole
  missing_video       no video (mp4/webm/mkv/mov/avi) or image (jpg/png/webp) member
  (a custom `required` set replaces the video rule: latent shards need `safetensors`)
The scan reads only headers: a header claiming a petabyte, a negative size or a chain of
extended headers is damage (bad_tar), never an allocation, a seek past the file or a loop.
"""

from __future__ import annotations

import logging
import os
import tarfile
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence

from dit_video.data.index_table import IndexBuilder, SampleRef, ShardIndex

logger = logging.getLogger("dit_video.data.dataset")  # skips are logged where the reader logs them

VIDEO_EXTS = ("mp4", "webm", "mkv", "mov", "avi")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# A sample is read whole into a loader worker's memory: 2 GiB is ten minutes of 1080p H.264 at
# 25 Mbit/s, far above any training clip, and a few workers at this size still fit a 24 GiB machine.
MAX_SAMPLE_BYTES = 2 << 30
# tarfile reads extended headers (PAX records, GNU long names) whole while scanning; real ones
# are a few hundred bytes. A header claiming more is damage, not a reason to allocate.
MAX_HEADER_BYTES = 1 << 20
# What tarfile raises (besides TarError) on crafted headers: OverflowError for sizes beyond a
# C long, IndexError / ValueError in the GNU sparse maps, RecursionError for chained extended headers.
_SCAN_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError, OverflowError, IndexError, RecursionError)


def split_key(name: str) -> tuple[str, str]:
    """'dir/abc.x.mp4' -> ('dir/abc', 'x.mp4'); the extension is lower-cased."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:].lower()


def is_unsafe(name: str) -> bool:
    """A name that could escape a directory if it were ever extracted."""
    return name.startswith("/") or ".." in name.split("/")


def is_utf8(name: str) -> bool:
    """False for a name tarfile decoded with surrogate escapes (its bytes were not UTF-8)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _default_usable(members: dict) -> bool:
    return any(ext in members for ext in VIDEO_EXTS + IMAGE_EXTS)


def _complete(members: dict, required: Sequence[str] | None) -> bool:
    """A run of members that is a whole sample on its own: what a later stray run cannot add to."""
    if required:
        return all(e in members for e in required)
    return _default_usable(members) and "txt" in members


class _Run:
    """Consecutive members of one key: {ext: (offset, size)}, the first reason to drop them, and
    whether they border on damage (then they are kept only if complete: a member may be lost)."""

    def __init__(self, key: str):
        self.key, self.members, self.reason, self.near_damage = key, {}, None, False

    def drop(self, reason: str) -> None:
        self.reason = self.reason or reason


class _HeaderReads:
    """The shard file as tarfile sees it while scanning. Scanning never reads member data, only
    headers and extended headers (PAX records, GNU long names): a read of more than
    MAX_HEADER_BYTES, or of more than the file still holds, is a header lying about its size and
    raises instead of allocating. Seeks stay inside the file."""

    def __init__(self, f, size: int):
        self.f, self.size = f, size

    def read(self, n: int = -1) -> bytes:
        left = max(0, self.size - self.f.tell())
        if n is None or n < 0 or n > MAX_HEADER_BYTES or (n > tarfile.BLOCKSIZE and n > left):
            raise tarfile.ReadError(f"an extended header claims {n} bytes, {left} are left in the file")
        return self.f.read(min(n, left))

    def seek(self, pos: int, whence: int = 0) -> int:
        base = (0, self.f.tell(), self.size)[whence]
        return self.f.seek(min(max(0, base + pos), self.size))

    def tell(self) -> int:
        return self.f.tell()


def _all_zero(f, start: int, stop: int) -> bool:
    """Whether bytes [start, stop) of `f` are all NUL (end-of-archive padding, not damage)."""
    f.seek(start)
    while start < stop:
        chunk = f.read(min(1 << 20, stop - start))
        if not chunk:
            break
        if chunk.strip(b"\0"):
            return False
        start += len(chunk)
    return True


class _Scan:
    """One pass over a shard's headers: its runs of members in tar order, and its damaged places
    (each counted once, however many blocks it spans)."""

    def __init__(self):
        self.runs: list[_Run] = []
        self.damage = 0
        self._in_damage = False  # between a damaged place and the next valid member

    def damaged(self) -> None:
        """Damage at the current place: the run before it may have lost its last members."""
        if not self._in_damage:
            self.damage += 1
            self._in_damage = True
        if self.runs:
            self.runs[-1].near_damage = True

    def run_for(self, key: str) -> _Run:
        after_damage = self._in_damage
        if not self.runs or self.runs[-1].key != key or after_damage:
            self.runs.append(_Run(key))
            self.runs[-1].near_damage = after_damage  # it may have lost its first members
        self._in_damage = False
        return self.runs[-1]

    def member(self, info: tarfile.TarInfo, file_size: int) -> bool:
        """Add one member to its run; False if its header claims data beyond the end of the file."""
        key, ext = split_key(info.name)
        run = self.run_for(key)
        carries_data = info.isreg() or info.type not in tarfile.SUPPORTED_TYPES
        if carries_data and not info.issparse() and (info.size < 0 or info.offset_data + info.size > file_size):
            run.drop("bad_tar")  # cut off, or a size that lies: either way its bytes are not there
            self.damaged()
            return False
        if is_unsafe(info.name):
            run.drop("unsafe_name")
        elif not is_utf8(info.name):
            run.drop("bad_name")
        elif info.issparse():  # before the size check: a sparse member's size is its expanded size
            run.drop("sparse_member")
        elif not info.isfile():
            run.drop("not_a_file")
        elif ext in run.members:
            run.drop("duplicate_member")
        else:
            run.members[ext] = (info.offset_data, info.size)
        return True


def _scan_runs(path: str) -> tuple[list[_Run], int]:
    """The shard's runs of members in tar order and how many damaged places it has.

    ignore_zeros: past a damaged header tarfile tries each following block for the next valid
    one; where tarfile gives up instead (an exception), scanning starts again after the place it
    failed. Either way the samples after the damage are still found."""
    scan = _Scan()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        reads = _HeaderReads(f, size)
        start = expected = 0  # expected: where the next header should start (non-zero bytes before it are damage)
        if size == 0:
            scan.damaged()  # not a tar at all (an interrupted copy, a failed download)
        while start < size:
            f.seek(start)
            try:
                with tarfile.open(fileobj=reads, mode="r:", ignore_zeros=True, encoding="utf-8",
                                  errors="surrogateescape") as tar:
                    for info in tar:
                        resume, expected = expected, min(tar.offset, size)
                        if info.offset > resume and not _all_zero(f, resume, info.offset):
                            scan.damaged()
                        if tar.offset <= info.offset:  # a negative size: tarfile would read this header forever
                            scan.run_for(split_key(info.name)[0]).drop("bad_tar")
                            scan.damaged()
                        elif info.isdir() or scan.member(info, size):
                            continue
                        # look for the next header right after this one (a cut shard has none)
                        tar.offset = expected = info.offset_data
                break
            except _SCAN_ERRORS as exn:
                logger.warning("shard %s is damaged near byte %d (%s: %s)", path, expected, type(exn).__name__,
                               str(exn)[:200])
                scan.damaged()
                # Go on from where tarfile stopped reading (past a chain of extended headers), at
                # least one block on (so the scan always advances).
                start = expected = max(f.tell(), start + tarfile.BLOCKSIZE, expected)
        if expected < size and not _all_zero(f, expected, size):
            scan.damaged()  # a cut or corrupt header at the end: tarfile stops quietly there
    return scan.runs, scan.damage


def scan_shard(path: str, shard_id: int, required: Sequence[str] | None = None) -> tuple[list[SampleRef], Counter]:
    """Index one tar; returns (samples, skips by reason). Never raises for bad data."""
    skips: Counter = Counter()
    try:
        runs, damage = _scan_runs(path)
    except OSError as exn:  # the file itself cannot be opened or read (damage inside is counted by the scan)
        runs, damage = [], 1
        logger.warning("skipped shard %s: bad_tar (%s: %s)", path, type(exn).__name__, str(exn)[:200])
    if damage:
        skips["bad_tar"] += damage
        logger.warning("shard %s: %d damaged place(s) (bad_tar); the samples around them are left out", path, damage)
    by_key: OrderedDict[str, list[_Run]] = OrderedDict()
    for run in runs:
        by_key.setdefault(run.key, []).append(run)
    samples = []
    for key, key_runs in by_key.items():
        first, strays = key_runs[0], key_runs[1:]
        reason = first.reason
        if reason is None and first.near_damage and not _complete(first.members, required):
            reason = "bad_tar"
        if reason is None and strays:
            if _complete(first.members, required):
                for stray in strays:
                    if stray.reason != "bad_tar" and not (stray.near_damage and not stray.members):
                        skips["stray_member"] += 1
                        logger.warning("skipped a stray run of %r in %s: stray_member (members %s)", key, path,
                                       sorted(stray.members))
            else:
                reason = "non_contiguous_key"
        if reason is None:
            usable = all(e in first.members for e in required) if required else _default_usable(first.members)
            reason = None if usable else "missing_video"
        if reason is None and sum(s for _, s in first.members.values()) > MAX_SAMPLE_BYTES:
            reason = "too_large"
        if reason is not None:
            if reason != "bad_tar":  # damage was counted once, where it is
                skips[reason] += 1
            logger.warning("skipped sample %r in %s: %s (members %s)", key, path, reason, sorted(first.members))
            continue
        samples.append(SampleRef(shard_id, key, first.members))
    return samples, skips


def build_index(shards: Sequence[str], required: Sequence[str] | None = None) -> ShardIndex:
    """Scan every shard (in the given order) into one ShardIndex (arrays, in memory; index_cache.py
    builds it once per node and shares it)."""
    builder = IndexBuilder(shards)
    for i, path in enumerate(shards):
        found, bad = scan_shard(path, i, required)
        for ref in found:
            builder.add(ref)
        builder.skipped_by_reason.update(bad)
    return builder.finish()


class MemberReader:
    """Reads members by offset, keeping a few shard files open (one reader per worker process)."""

    def __init__(self, shards: Sequence[str], max_open: int = 16):
        self.shards = list(shards)
        self.max_open = max_open
        self._files: OrderedDict[int, object] = OrderedDict()

    def read(self, ref: SampleRef, exts: Iterable[str] | None = None) -> dict[str, bytes]:
        """{ext: bytes} for the members of `ref` (all of them, or those in `exts`)."""
        wanted = [(ext, span) for ext, span in ref.members.items() if exts is None or ext in exts]
        if not wanted:
            return {}
        # A sample's members are adjacent in the tar (index.py drops keys that are not), so one
        # seek and one read cover them all: one syscall pair per sample instead of one per member.
        first = min(offset for _, (offset, _) in wanted)
        end = max(offset + size for _, (offset, size) in wanted)
        f = self._file(ref.shard)
        # The index checked every member lies inside the file; a file cut since then gives a short
        # read (EOFError below), never a read sized by a stale index beyond the end of the file.
        f.seek(first)
        block = f.read(max(0, min(end, os.fstat(f.fileno()).st_size) - first))
        out = {}
        for ext, (offset, size) in wanted:
            data = block[offset - first:offset - first + size]
            if len(data) != size:
                raise EOFError(f"member {ref.key}.{ext} is cut short ({len(data)} of {size} bytes)")
            out[ext] = data
        return out

    def _file(self, shard: int):
        f = self._files.pop(shard, None)
        if f is None:
            f = open(self.shards[shard], "rb")  # noqa: SIM115 (closed on eviction / close())
            if len(self._files) >= self.max_open:
                self._files.popitem(last=False)[1].close()
        self._files[shard] = f
        return f

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __del__(self):
        self.close()
