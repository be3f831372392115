"""Buckets: the (num_frames, height, width) shapes a batch may have, with per-bucket batch sizes.

Every batch holds one bucket's shape, so mixed resolutions, aspect ratios and lengths train
without padding. A bucket's batch size keeps frames x pixels per batch (proportional to DiT
tokens, hence to activation memory) near a budget, so a rare large bucket cannot OOM a run
that fits its common ones (Open-Sora #437). A sample goes to the nearest bucket it fits:
  fits     enough source frames for num_frames at the loader's fps (images fit 1-frame buckets
           only), and a source frame at least as large as the bucket (no upscaling)
  nearest  smallest |log(aspect_sample / aspect_bucket)|, then the largest frames x pixels
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Bucket:
    num_frames: int  # T of the clip (1 = image)
    height: int  # H in pixels
    width: int  # W in pixels
    batch_size: int  # clips per batch for this shape, per process

    @property
    def voxels(self) -> int:
        return self.num_frames * self.height * self.width

    @property
    def aspect(self) -> float:
        return self.width / self.height


def make_buckets(spec: Sequence[Mapping], budget: int | None = None) -> list[Bucket]:
    """Buckets from config entries {num_frames, size: [H, W], batch_size?}.

    An entry without batch_size gets floor(budget / (num_frames * H * W)) (at least 1), which
    keeps voxels (and tokens) per batch within one sample of the budget for every bucket.
    """
    buckets = []
    for i, entry in enumerate(spec):
        unknown = set(entry) - {"num_frames", "size", "batch_size"}
        if unknown:
            raise ValueError(f"data.buckets[{i}]: unknown field(s) {sorted(unknown)}; use num_frames, size, batch_size")
        t = int(entry["num_frames"])
        h, w = (int(s) for s in entry["size"])
        if t < 1 or h < 1 or w < 1:
            raise ValueError(f"data.buckets[{i}]: num_frames and size must be positive, got {dict(entry)}")
        size = entry.get("batch_size")
        if size is None:
            if budget is None:
                raise ValueError(f"data.buckets[{i}]: give batch_size, or data.bucket_budget for all buckets")
            size = max(1, budget // (t * h * w))
        buckets.append(Bucket(t, h, w, int(size)))
    if len({(b.num_frames, b.height, b.width) for b in buckets}) != len(buckets):
        raise ValueError("data.buckets: two buckets have the same (num_frames, size)")
    return buckets


def frames_needed(num_frames: int, source_fps: float, fps: float | None) -> int:
    """Source frames a clip of `num_frames` at `fps` spans (same rule as decode.frame_indices)."""
    stride = 1.0 if fps is None else source_fps / fps
    return int(round((num_frames - 1) * stride)) + 1


def assign_bucket(buckets: Sequence[Bucket], width: int, height: int, frames: int, source_fps: float,
                  fps: float | None, is_image: bool = False) -> int:
    """Index of the nearest bucket the sample fits, or -1 if none fits."""
    best, best_score = -1, None
    for i, b in enumerate(buckets):
        if is_image and b.num_frames != 1:
            continue
        if not is_image and frames < frames_needed(b.num_frames, source_fps, fps):
            continue
        if max(b.height / height, b.width / width) > 1.0 + 1e-9:
            continue  # resize_crop would have to upscale
        score = (abs(math.log((width / height) / b.aspect)), -b.voxels)
        if best_score is None or score < best_score:
            best, best_score = i, score
    return best


def image_buckets(buckets: Sequence[Bucket], image_batch_size: int | None = None) -> list[Bucket | None]:
    """Joint image+video training: the 1-frame shape an image batch made from each bucket's clips
    is read at (same H, W; image_batch_size images, None = the bucket's batch_size), or None for
    a bucket that is already 1-frame (its samples are images anyway)."""
    return [None if b.num_frames == 1 else Bucket(1, b.height, b.width, image_batch_size or b.batch_size)
            for b in buckets]
