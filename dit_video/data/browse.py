"""Looking at shards by eye: the first samples decoded whole (browse_shards) and counts over all
samples (shard_stats), for notebooks (`api.browse_shards`), evaluation's real clips and the
provenance measurement. Not the training path: no plan, no buckets, no crops, tar order.
"""

from __future__ import annotations

import json
import logging
import tarfile
from collections import Counter
from collections.abc import Iterator

from dit_video.data.config import resolve_shards
from dit_video.data.decode import decode_frames
from dit_video.data.index import is_unsafe, split_key

logger = logging.getLogger("dit_video.data.browse")

# A member this large is no training clip (a crafted header, or the wrong file): its sample is
# skipped rather than read into memory whole.
MAX_MEMBER_BYTES = 1 << 30
# First bytes of the compressed formats tarfile would otherwise open transparently.
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


def _shard_paths(shards: str | list[str]) -> list[str]:
    paths = resolve_shards(shards)
    if not paths:
        raise FileNotFoundError(f"no shards match {shards!r}")
    return paths


def _open_tar(path: str) -> tarfile.TarFile:
    """An uncompressed tar, as the loader reads them (dit_video/data/index.py): a compressed shard
    would be decompressed front to back with no bound on what it expands to, so it is refused."""
    with open(path, "rb") as f:
        head = f.read(6)
    for magic, kind in _COMPRESSED.items():
        if head.startswith(magic):
            raise ValueError(f"shard '{path}' is {kind}-compressed: shards are read uncompressed (like the "
                             "training loader); store it as a plain tar (tar -cf), as data_prep.ingest writes")
    try:
        return tarfile.open(path, mode="r:")
    except tarfile.TarError as err:
        raise ValueError(f"shard '{path}' is not a tar file ({err})") from None


def _samples(shards: str | list[str], skipped: Counter | None = None,
             max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) for each sample of local tar shards, in order, without unpacking to disk.

    Keys and names follow the loader (dit_video/data/index.py), and bad samples are skipped and
    counted in `skipped` by reason as it counts them: unsafe_name (a '..' component or a leading
    '/': never read), too_large (a member over `max_member_bytes`), bad_tar (a shard cut short or
    corrupt: the samples before the damage are kept, the one being read is dropped).
    """
    skipped = Counter() if skipped is None else skipped
    for path in _shard_paths(shards):
        with _open_tar(path) as tar:
            current, members, bad = None, {}, None
            try:
                for info in tar:
                    if not info.isfile():
                        continue
                    key, ext = split_key(info.name)
                    if key != current and current is not None:
                        yield from _finished(path, current, members, bad, skipped)
                        members, bad = {}, None
                    current = key
                    if is_unsafe(info.name):
                        bad = bad or "unsafe_name"
                    elif info.size > max_member_bytes:
                        bad = bad or "too_large"
                    elif bad is None:
                        members[ext] = tar.extractfile(info).read()
            except (tarfile.TarError, EOFError, OSError) as err:
                skipped["bad_tar"] += 1
                skipped.update([bad] if bad else [])
                logger.warning("skipped the rest of shard %s: bad_tar (%s: %s)", path, type(err).__name__, err)
                continue
            if current is not None:
                yield from _finished(path, current, members, bad, skipped)


def _finished(path: str, key: str, members: dict, bad: str | None, skipped: Counter):
    if bad is None:
        yield key, members
    else:
        skipped[bad] += 1
        logger.warning("skipped sample %r in %s: %s", key, path, bad)


def browse_shards(shards: str | list[str], limit: int = 16, num_frames: int | None = None) -> list[dict]:
    """The first `limit` samples: {"key", "caption", "meta" (the .json), "clip" uint8 [T, H, W, 3]}
    (all frames, or the first num_frames)."""
    out = []
    for key, members in _samples(shards):
        if len(out) >= limit:
            break
        meta = json.loads(members["json"]) if "json" in members else {}
        clip = decode_frames(members["mp4"], num_frames) if "mp4" in members else None
        out.append({"key": key, "caption": members.get("txt", b"").decode("utf-8").strip(), "meta": meta,
                    "clip": clip})
    return out


def shard_stats(shards: str | list[str]) -> dict:
    """Counts over every sample (no video decoding): {"num_samples", "buckets": Counter of
    (frames, height, width) from the .json members, "words": Counter of caption words,
    "captions": Counter of whole captions, "skipped": Counter of samples not read, by reason}."""
    buckets, words, captions, skipped = Counter(), Counter(), Counter(), Counter()
    n = 0
    for _, members in _samples(shards, skipped):
        n += 1
        meta = json.loads(members["json"]) if "json" in members else {}
        buckets[(meta.get("frames"), meta.get("height"), meta.get("width"))] += 1
        caption = members.get("txt", b"").decode("utf-8").strip()
        captions[caption] += 1
        words.update(caption.lower().split())
    return {"num_samples": n, "buckets": buckets, "words": words, "captions": captions, "skipped": skipped}
