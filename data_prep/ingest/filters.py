"""What leaves a source or a clip out, and the label it is counted under in report.json.

Source filters raise `Drop(reason)`; process_source counts it and moves on:
  bad_row, missing_file, bad_json, decode_error, empty_window     (reading and decoding; shard
                                       sources add the index's own damage reasons)
  missing_caption, caption_too_short, caption_too_long, caption_blocklist      (check_caption)
  low_resolution, bad_aspect                                                      (check_size)
  too_large (frames above --max-source-pixels, or a decode that needed more than the source's
  process may take), too_long (with --split none, a source longer than --max-duration, known from
  the probe), decode_timeout (--decode-timeout)                                   (process.py)
Clip filters (counted in process_source): too_short, too_long, and low_motion (motion_score).
"""

from __future__ import annotations

import numpy as np

from data_prep.ingest.config import IngestConfig
from dit_video.prompt_filter import compile_phrases


class Drop(Exception):
    """A source or clip is left out; `reason` is the label it is counted under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail

    def __reduce__(self):  # raised in the per-source child process (process.py), counted in the parent
        return type(self), (self.reason, self.detail)


def check_caption(caption: str | None, cfg: IngestConfig) -> str:
    """The caption with its whitespace collapsed, or Drop if it is missing, too short, too long or blocked."""
    if caption is None or not caption.strip():
        raise Drop("missing_caption")
    caption = " ".join(caption.split())
    if len(caption.split()) < cfg.min_caption_words:
        raise Drop("caption_too_short", f"{len(caption.split())} words < {cfg.min_caption_words}")
    if len(caption) > cfg.max_caption_chars:
        raise Drop("caption_too_long", f"{len(caption)} characters > {cfg.max_caption_chars}")
    # The sampling prompt filter's matcher: a caption is text the text encoder reads too.
    blocked = compile_phrases(tuple(cfg.caption_blocklist), "--caption-blocklist").match(caption)
    if blocked is not None:
        raise Drop("caption_blocklist", f"contains {blocked!r}")
    return caption


def check_size(info: dict, cfg: IngestConfig) -> None:
    """Drop a source whose probed short side is below min_resolution or whose aspect ratio
    (width / height) is outside [min_aspect, max_aspect]."""
    short = min(info["width"], info["height"])
    if short < cfg.min_resolution:
        raise Drop("low_resolution", f"short side {short} < {cfg.min_resolution}")
    aspect = info["width"] / info["height"]
    if not cfg.min_aspect <= aspect <= cfg.max_aspect:
        raise Drop("bad_aspect", f"aspect {aspect:.3f} outside [{cfg.min_aspect}, {cfg.max_aspect}]")


def motion_score(thumbs: np.ndarray) -> float:
    """Mean |difference| of consecutive 32x32 thumbnails (0-255): ~0 for a still, > 2 for motion."""
    return float(np.abs(np.diff(thumbs.astype(np.float32), axis=0)).mean()) if len(thumbs) > 1 else 0.0


def thumb_diffs(thumbs: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """float32 [T - 1]: mean |difference| of thumbnails i + 1 and i (what scene cuts are found
    on), computed a chunk at a time so a long source's thumbnails are never all converted at once."""
    parts = [np.abs(np.diff(thumbs[i:i + chunk + 1].astype(np.float32), axis=0)).mean(axis=(1, 2, 3))
             for i in range(0, max(len(thumbs) - 1, 0), chunk)]
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)
