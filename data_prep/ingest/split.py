"""Cutting one decoded source into clips: scene starts (builtin thumbnail-difference detector or
PySceneDetect), then [first, end) frame ranges per scene and/or fixed-length pieces."""

from __future__ import annotations

import tempfile

import numpy as np

from data_prep.ingest.config import IngestConfig
from data_prep.ingest.filters import thumb_diffs


def scene_cuts(thumbs: np.ndarray, cfg: IngestConfig) -> list[int]:
    """Frame indices where a new scene starts (builtin detector).

    A cut is a peak of the mean |thumbnail difference| above the threshold that is the largest
    within min_scene_frames on either side, so fast motion just before a hard cut cannot claim
    the cut's place (a greedy first-above-threshold rule would)."""
    diffs = thumb_diffs(thumbs)  # [T - 1]; diffs[i - 1]: frame i vs i - 1
    m = cfg.min_scene_frames
    cuts: list[int] = []
    for i in np.argsort(-diffs, kind="stable"):  # strongest first
        frame = int(i) + 1
        if diffs[i] <= cfg.scene_threshold:
            break
        if all(abs(frame - c) >= m for c in cuts):
            cuts.append(frame)
    return sorted(cuts)


def pyscenedetect_cuts(data: bytes, times: np.ndarray) -> list[int]:
    """Scene starts from PySceneDetect's ContentDetector, mapped onto our (fps-reduced) frames."""
    from scenedetect import ContentDetector, detect  # optional extra: dit-video[scenes]

    with tempfile.NamedTemporaryFile(suffix=".mp4") as f:
        f.write(data)
        f.flush()
        scenes = detect(f.name, ContentDetector())
    starts = [s.seconds if hasattr(s, "seconds") else s.get_seconds() for s, _ in scenes[1:]]  # 0.7 renamed it
    return sorted({int(np.searchsorted(times, t)) for t in starts} - {0, len(times)})


def segments(num: int, fps: float, cuts: list[int], cfg: IngestConfig) -> list[tuple[int, int]]:
    """[(first, end)) frame ranges: scenes (cut at `cuts`), each cut into fixed pieces if asked."""
    bounds = [0, *cuts, num] if "scene" in cfg.split else [0, num]
    out = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        if "fixed" in cfg.split:
            step = max(1, int(round(cfg.clip_seconds * fps)))
            out.extend((s, min(s + step, b)) for s in range(a, b, step))
        else:
            out.append((a, b))
    return out
