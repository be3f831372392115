"""One sample's members -> the fields of an item, and items -> a batch of clips.

Members arrive as bytes read by offset (index.MemberReader) and are decoded here or in decode.py:
txt as utf-8 (read_caption), json with `json` (read_meta), never unpickled. video_ext_of and
image_ext_of say which member holds the pixels; key_seed gives each sample key its own random
stream; collate_clips stacks clips of one shape into a batch.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import torch

from dit_video.data.index import IMAGE_EXTS, VIDEO_EXTS
from dit_video.errors import SampleError


def key_seed(key: str) -> int:
    """A stable 63-bit integer for a sample key (Python's hash() changes per process)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


def read_caption(raw: dict[str, bytes]) -> str:
    """The .txt member, utf-8 and stripped; SampleError("bad_caption" / "empty_caption") otherwise."""
    caption = raw.get("txt", b"")
    try:
        caption = caption.decode("utf-8").strip()
    except UnicodeDecodeError as exn:
        raise SampleError("bad_caption", f"caption is not utf-8: {exn}") from None
    if not caption:
        raise SampleError("empty_caption", "caption (.txt) is missing or empty")
    return caption


def read_meta(raw: dict[str, bytes]) -> dict | None:
    """The .json member as a dict, None if absent; SampleError("bad_json") if unreadable."""
    if "json" not in raw:
        return None
    try:
        meta = json.loads(raw["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exn:
        raise SampleError("bad_json", str(exn)[:200]) from None
    if not isinstance(meta, dict):
        raise SampleError("bad_json", f"metadata is a {type(meta).__name__}, not an object")
    return meta


def video_ext_of(members) -> str | None:
    """The extension of the sample's video member (first of index.VIDEO_EXTS), None if it has none."""
    return next((e for e in VIDEO_EXTS if e in members), None)


def image_ext_of(members) -> str | None:
    """The extension of the sample's image member (first of index.IMAGE_EXTS), None if it has none."""
    return next((e for e in IMAGE_EXTS if e in members), None)


def collate_clips(samples: list[dict]) -> dict:
    """Samples -> {"clip": uint8 [B, T, H, W, 3], "caption": list[str], "key": list[str],
    "skipped": int64 [] (samples skipped since the previous batch of this worker),
    "skipped_by_reason": dict[str, int]}."""
    by_reason: Counter[str] = Counter()
    for s in samples:
        by_reason.update(s.get("skipped_by_reason", {}))  # hand-built samples carry no skip counts
    return {
        "clip": torch.stack([s["clip"] for s in samples]),  # [B, T, H, W, 3]
        "caption": [s["caption"] for s in samples],
        "key": [s["key"] for s in samples],
        "skipped": torch.tensor(sum(by_reason.values()), dtype=torch.int64),
        "skipped_by_reason": dict(by_reason),
    }
