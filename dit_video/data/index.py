"""Tar shards -> a random-access sample index: which members each sample has and where they lie.

Exact, resumable order needs random access (sample i of epoch e, wherever it lives), so instead
of streaming tars front to back, the loader scans each shard's headers once (tarfile seeks over
the data, so this reads ~512 bytes per member) and later reads members by byte offset.

A sample is the set of members sharing a key (the member name up to the first dot of its base
name, as in WebDataset). Structural problems are found here, once, and counted by reason:
  bad_tar             zero-byte, truncated or corrupt tar (samples before the damage are kept)
  unsafe_name         a member name with a '..' component or a leading '/' (never read)
  non_contiguous_key  a key whose members are not adjacent in the tar (ambiguous: which
                      members belong to which sample?), dropped whole
  duplicate_member    the same key.ext twice in a shard, dropped whole
  missing_video       no video (mp4/webm/mkv/mov/avi) or image (jpg/png/webp) member
  (a custom `required` set replaces the video rule: latent shards need `safetensors`)
"""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

logger = logging.getLogger("dit_video.data.dataset")  # skips are logged where the reader logs them

VIDEO_EXTS = ("mp4", "webm", "mkv", "mov", "avi")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


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


@dataclass(frozen=True)
class SampleRef:
    """One sample: its shard (index into ShardIndex.shards), key and members {ext: (offset, size)}."""

    shard: int
    key: str
    members: dict[str, tuple[int, int]]


@dataclass
class ShardIndex:
    """Every usable sample of a shard set, in shard order then tar order (the canonical order the
    epoch permutation is applied to), and the structural skips found while scanning."""

    shards: list[str]
    samples: list[SampleRef]
    skipped_by_reason: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.samples)

    def fingerprint(self) -> str:
        """Short hash of (shard names, keys): a resumed run checks it still reads the same data."""
        h = hashlib.sha256()
        for s in self.samples:
            h.update(f"{os.path.basename(self.shards[s.shard])}/{s.key}\n".encode())
        return h.hexdigest()[:16]


def _default_usable(members: dict) -> bool:
    return any(ext in members for ext in VIDEO_EXTS + IMAGE_EXTS)


def scan_shard(path: str, shard_id: int, required: Sequence[str] | None = None) -> tuple[list[SampleRef], Counter]:
    """Index one tar; returns (samples, skips by reason). Never raises for bad data."""
    skips: Counter = Counter()
    groups: OrderedDict[str, dict[str, tuple[int, int]]] = OrderedDict()
    closed: set[str] = set()  # keys whose run of members has ended
    bad: dict[str, str] = {}  # key -> reason it is dropped
    current = None
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = split_key(info.name)
                if is_unsafe(info.name):
                    bad.setdefault(key, "unsafe_name")
                    current = key
                    continue
                if key != current:
                    if current is not None:
                        closed.add(current)
                    if key in closed:
                        bad.setdefault(key, "non_contiguous_key")
                    current = key
                members = groups.setdefault(key, {})
                if ext in members:
                    bad.setdefault(key, "duplicate_member")
                members[ext] = (info.offset_data, info.size)
    except (tarfile.TarError, OSError, EOFError) as exn:
        skips["bad_tar"] += 1
        logger.warning("skipped the rest of shard %s: bad_tar (%s: %s)", path, type(exn).__name__, str(exn)[:200])
        # The last group may be cut off mid-sample: drop it rather than read a partial sample.
        if current is not None and current in groups:
            bad.setdefault(current, "bad_tar")
    samples = []
    for key, members in groups.items():
        reason = bad.get(key)
        if reason is None:
            usable = all(e in members for e in required) if required else _default_usable(members)
            reason = None if usable else "missing_video"
        if reason is not None:
            if reason != "bad_tar":  # the truncated shard itself was already counted
                skips[reason] += 1
            logger.warning("skipped sample %r in %s: %s (members %s)", key, path, reason, sorted(members))
            continue
        samples.append(SampleRef(shard_id, key, members))
    for key, reason in bad.items():  # unsafe keys have no group
        if key not in groups:
            skips[reason] += 1
            logger.warning("skipped sample %r in %s: %s", key, path, reason)
    return samples, skips


def build_index(shards: Sequence[str], required: Sequence[str] | None = None) -> ShardIndex:
    """Scan every shard (in the given order) into one ShardIndex."""
    samples: list[SampleRef] = []
    skips: Counter = Counter()
    for i, path in enumerate(shards):
        found, bad = scan_shard(path, i, required)
        samples.extend(found)
        skips.update(bad)
    return ShardIndex(list(shards), samples, skips)


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
        f.seek(first)
        block = f.read(end - first)
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
