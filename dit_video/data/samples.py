"""One sample's members -> the fields of an item, and items -> a batch of clips.

Members arrive as bytes read by offset (index.MemberReader) and are decoded here or in decode.py:
txt as utf-8 (read_caption), json with `json` (read_meta; size_of checks the sizes bucketing
uses), never unpickled. video_ext_of and
image_ext_of say which member holds the pixels; key_seed gives each sample key its own random
stream; collate_clips stacks clips of one shape into a batch.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter

import torch

from dit_video.data.index import IMAGE_EXTS, VIDEO_EXTS
from dit_video.errors import SampleError

# Metadata beyond these is a lie (or a mistake), not a sample to bucket: 64k pixels a side, 100
# hours at 240 fps, and a frame rate no camera records.
MAX_DIMENSION = 1 << 16
MAX_FRAMES = 100 * 3600 * 240
MAX_FPS = 10_000.0


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
    # ValueError: also an integer literal past Python's digit limit; RecursionError: deep nesting
    except (ValueError, RecursionError) as exn:
        raise SampleError("bad_json", f"{type(exn).__name__}: {str(exn)[:200]}") from None
    if not isinstance(meta, dict):
        raise SampleError("bad_json", f"metadata is a {type(meta).__name__}, not an object")
    return meta


def size_of(meta: dict, is_image: bool) -> tuple[int, int, int, float]:
    """(width, height, frames, fps) from a sample's metadata, for bucketing: frames is 1 for an
    image, fps 1.0 when absent. KeyError if a size field is missing; SampleError("bad_meta") for a
    value that is not a positive finite number in range (a lie that would divide by zero or
    overflow in the bucket arithmetic, or send a sample to a bucket it cannot fill)."""
    fields = {"width": MAX_DIMENSION, "height": MAX_DIMENSION, "frames": MAX_FRAMES, "fps": MAX_FPS}
    given = {"width": meta["width"], "height": meta["height"], "frames": 1 if is_image else meta["frames"],
             "fps": 1.0 if meta.get("fps") is None else meta["fps"]}
    out = {}
    for name, limit in fields.items():
        try:
            value = math.nan if isinstance(given[name], bool) else float(given[name])
        except (TypeError, ValueError, OverflowError):
            value = math.nan
        if not 0 < (value if name == "fps" else math.floor(value) if math.isfinite(value) else value) <= limit:
            raise SampleError("bad_meta", f"metadata {name}={given[name]!r:.40} is not a number in (0, {limit}]")
        out[name] = value if name == "fps" else int(value)
    return out["width"], out["height"], out["frames"], out["fps"]


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
