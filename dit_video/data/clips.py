"""The planned shard reader (dataset.py) over video shards: each sample becomes a clip.

VideoShardDataset reads each sample's video (or, for 1-frame buckets, image) member, samples
the bucket's frames and crops them; PackedVideoShardDataset reads the same samples but batches
token-budget packs of clips of any bucket (packing.py) for DiT.forward_packed.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch

from dit_video.data.balance import ClipCost
from dit_video.data.buckets import Bucket, assign_bucket
from dit_video.data.config import CROP_MODES, resolve_shards
from dit_video.data.dataset import PlannedShardDataset
from dit_video.data.decode import BACKENDS, TimedCall, decode_clip, decode_image, resize_crop
from dit_video.data.index_cache import load_index, read_sizes
from dit_video.data.index_table import SIZE_STATUS, ShardIndex
from dit_video.data.packing import collate_packed, pack_epoch, pack_epoch_decreasing
from dit_video.data.samples import collate_clips, image_ext_of, read_caption, read_meta, video_ext_of
from dit_video.errors import SampleError

logger = logging.getLogger(__name__)


class VideoShardDataset(PlannedShardDataset):
    """Yields {"clip": uint8 [T, H, W, 3], "caption": str, "key": str, "skipped": int,
    "skipped_by_reason": dict[str, int]} from local WebDataset shards ({key}.mp4/.txt/.json,
    or an image member {key}.jpg/.png/.webp for 1-frame buckets).

    With batched=True it yields collate_clips batches plus "position" (training). Without
    `buckets`, every clip is (num_frames, size) and the plan's batch size is `batch_size`.
    """

    def __init__(self, shards: str | Sequence[str], num_frames: int, fps: float | None,
                 size: tuple[int, int], *, crop: str = "random", decoder: str = "auto",
                 shuffle_buffer: int = 0, seed: int = 0, infinite: bool = True, batch_size: int = 1,
                 buckets: Sequence[Bucket] | None = None, decode_timeout: float | None = None,
                 batched: bool = False, rank: int | None = None, world_size: int | None = None,
                 start: tuple = (0, 0), index: ShardIndex | None = None, image_ratio: float = 0.0,
                 image_batch_size: int | None = None, balance: bool = False,
                 costs: dict[tuple[int, int, int], ClipCost] | None = None):
        urls = resolve_shards(shards)
        if not urls:
            raise ValueError(f"shards: no files match {shards!r}")
        if crop not in CROP_MODES:
            raise ValueError(f"crop: must be one of {CROP_MODES}, got {crop!r}")
        if decoder not in BACKENDS:
            raise ValueError(f"decoder: must be one of {BACKENDS}, got {decoder!r}")
        self.urls = urls
        self.num_frames, self.fps, self.size = num_frames, fps, tuple(size)
        self.crop, self.decoder = crop, decoder
        self.timed = TimedCall(decode_timeout)
        if buckets is None:
            buckets = [Bucket(num_frames, self.size[0], self.size[1], batch_size)]
        index = index if index is not None else load_index(urls)
        bucket_of = self._assign(index, buckets, fps) if len(buckets) > 1 else np.zeros(len(index), np.int64)
        super().__init__(index, bucket_of, buckets, seed=seed, infinite=infinite, shuffle=shuffle_buffer > 0,
                         batched=batched, rank=rank, world_size=world_size, start=start, image_ratio=image_ratio,
                         image_batch_size=image_batch_size, balance=balance, costs=costs)

    @staticmethod
    def _assign(index: ShardIndex, buckets: Sequence[Bucket], fps: float | None) -> np.ndarray:
        """Bucket per sample from its .json size metadata (width, height, frames, fps), as the
        index holds it (read once, when it was built: index_cache.read_sizes); -1 = none fits."""
        if index.size_row is None:  # an index scanned in memory: read the .json members now
            index.size_row, index.size_rows = read_sizes(index)
        rows = index.size_rows.tolist()  # [R] distinct (status, width, height, frames, fps, is_image)
        row_bucket = np.full(len(rows), -1, dtype=np.int64)  # [R]
        for r, (status, width, height, frames, source_fps, is_image) in enumerate(rows):
            if status == SIZE_STATUS.index("ok"):
                row_bucket[r] = assign_bucket(buckets, int(width), int(height), int(frames), source_fps, fps,
                                              bool(is_image))
        out = row_bucket[index.size_row]  # [N]
        samples_per_row = np.bincount(index.size_row, minlength=len(rows))  # [R]
        bad: Counter = Counter()  # samples whose metadata is unreadable or lies, by reason
        for (status, *_), n in zip(rows, samples_per_row.tolist(), strict=True):
            if SIZE_STATUS[int(status)] != "ok":
                bad[SIZE_STATUS[int(status)]] += n
        bad["no_bucket"] += int((out < 0).sum()) - sum(bad.values())  # and those that fit no bucket
        index.skipped_by_reason.update(+bad)
        return out

    def load(self, raw: dict[str, bytes], key: str, bucket: Bucket, rng: np.random.Generator) -> dict:
        video_ext, image_ext = video_ext_of(raw), image_ext_of(raw)
        if video_ext is None and image_ext is None:
            raise SampleError("missing_video", f"no video or image member, has {sorted(raw)}")
        caption = read_caption(raw)
        read_meta(raw)
        if video_ext is not None:
            clip = self.timed(decode_clip, raw[video_ext], bucket.num_frames, self.fps, rng, self.decoder)
        else:
            clip = decode_image(raw[image_ext])  # [1, H, W, 3]
            if bucket.num_frames != 1:
                raise SampleError("too_short", f"an image is one frame, the clip needs {bucket.num_frames}")
        clip = resize_crop(clip, (bucket.height, bucket.width), mode=self.crop, rng=rng)  # [T, H, W, 3]
        return {"clip": torch.from_numpy(np.ascontiguousarray(clip)), "caption": caption, "key": key}

    def collate(self, items: list[dict]) -> dict:
        return collate_clips(items)


class PackedVideoShardDataset(VideoShardDataset):
    """Training batches that are token-budget packs of clips of any bucket (data/packing.py):
    same reading, replacement and resume as VideoShardDataset; only the plan and the collate differ.

    tokens[b]: DiT tokens of a clip of bucket b (packing.bucket_tokens). Each clip is read at its
    own bucket's shape; a batch's "clip" is a list of uint8 [T_i, H_i, W_i, 3]. fit: "first"
    (pack_epoch) or "decreasing" (pack_epoch_decreasing).
    """

    def __init__(self, *args, tokens: Sequence[int], max_tokens: int, open_packs: int, fit: str = "decreasing", **kwargs):
        super().__init__(*args, **kwargs)
        self.tokens, self.max_tokens, self.open_packs, self.fit = list(tokens), int(max_tokens), int(open_packs), fit

    def epoch_plan(self, epoch: int) -> list[np.ndarray]:
        if self.fit == "decreasing":
            return pack_epoch_decreasing(self.bucket_of, self.tokens, self.max_tokens, self.seed, epoch)
        return pack_epoch(self.bucket_of, self.tokens, self.max_tokens, self.open_packs, self.seed, epoch)

    def epoch_plan_shapes(self, epoch: int) -> tuple[list[np.ndarray], list[None]]:
        packs = self.epoch_plan(epoch)
        return packs, [None] * len(packs)  # None: each sample at its own bucket's shape

    def collate(self, items: list[dict]) -> dict:
        return collate_packed(items)
