"""Looking at shards by eye: the first samples decoded whole (browse_shards) and counts over all
samples (shard_stats), for notebooks (`api.browse_shards`), evaluation's real clips and the
provenance measurement. Not the training path: no plan, no buckets, no crops, tar order.
"""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from collections.abc import Iterator

from dit_video.data.config import resolve_shards
from dit_video.data.decode import decode_frames


def _shard_paths(shards: str | list[str]) -> list[str]:
    paths = resolve_shards(shards)
    if not paths:
        raise FileNotFoundError(f"no shards match {shards!r}")
    return paths


def _samples(shards: str | list[str]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) for each sample of local tar shards, in order, without unpacking to disk."""
    for path in _shard_paths(shards):
        with tarfile.open(path) as tar:
            current, members = None, {}
            for info in tar:
                if not info.isfile() or "/" in info.name or info.name.startswith(".."):
                    continue  # never follow paths out of the shard
                key, _, ext = info.name.partition(".")
                if key != current and current is not None:
                    yield current, members
                    members = {}
                current = key
                members[ext] = tar.extractfile(info).read()
            if current is not None:
                yield current, members


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
    "captions": Counter of whole captions}."""
    buckets, words, captions = Counter(), Counter(), Counter()
    n = 0
    for _, members in _samples(shards):
        n += 1
        meta = json.loads(members["json"]) if "json" in members else {}
        buckets[(meta.get("frames"), meta.get("height"), meta.get("width"))] += 1
        caption = members.get("txt", b"").decode("utf-8").strip()
        captions[caption] += 1
        words.update(caption.lower().split())
    return {"num_samples": n, "buckets": buckets, "words": words, "captions": captions}
