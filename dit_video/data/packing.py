"""Token-budget packed batches for the DiT's packed mode (NaViT; model side: dit_video/model/packing.py).

Bucket batches hold B clips of one shape. A packed batch instead holds clips of any buckets whose
DiT token counts sum to at most `max_tokens`, so every step costs about the same compute however
the clips are shaped, and no token is padding. The plan stays a pure function of (seed, epoch):

    usable samples --permutation (seed, epoch)--> first-fit into `open_packs` packs being filled
    (a sample joins the first with room; when none has room, the oldest pack is closed and a
    new one opened) --> global batches g = 0, 1, ... (closing order)

`fit: decreasing` packs fuller (pack_epoch_decreasing): the same permutation, cut into windows of
PACK_WINDOW samples; each window is packed first-fit decreasing (largest clip first, every pack of
the window open), and its packs are shuffled. Online first fit closes a pack whenever a large clip
does not fit, which left 3.3% of a 4 x 2304-token budget empty on a realistic mix where first-fit
decreasing leaves 1.6% (benchmarks/balance.py, docs/performance.md).

Everything downstream of the plan is the bucket loader's: rank r / worker w take the same global
batches, a bad sample is replaced by a draw from its own bucket (same token count, so the pack
still fits) and the loader state is (epoch, batches_into_epoch), so resume is exact.

Token counts come from the run (run.py hands the datamodule a `tokens_per_clip(T, H, W)` built
from the VAE's latent_shape and the DiT's patch size): the data config does not repeat them.
The dataset is loader.PackedVideoShardDataset; batches are collate_packed dicts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dit_video.data.buckets import Bucket

TokensPerClip = Callable[[int, int, int], int]  # (num_frames, height, width) in pixels -> DiT tokens
PACKING_FITS = ("first", "decreasing")
PACK_WINDOW = 1024  # samples packed together by fit=decreasing: fuller packs than 256, ~as full as 4096 and 4x faster


@dataclass
class PackingConfig:
    """`data.packing`: token-budget packed training batches (validation keeps bucket batches; the
    batch sizes of data.batch_size / data.buckets are not used for training while it is on)."""

    enabled: bool = False  # True: training batches are packs of clips of any shape, `clip` a list
    max_tokens: int = 4096  # DiT tokens per packed batch, per process; every bucket must fit alone
    open_packs: int = 8  # packs filled at once (first fit); more = fuller packs, 1 = next fit
    fit: str = "decreasing"  # "decreasing": first-fit decreasing per window (pad <= 3%, docs/performance.md); "first": online first fit over open_packs

    def validate(self) -> None:
        if not (isinstance(self.max_tokens, int) and self.max_tokens >= 1):
            raise ValueError(f"data.packing.max_tokens: must be an integer >= 1, got {self.max_tokens!r}")
        if not (isinstance(self.open_packs, int) and self.open_packs >= 1):
            raise ValueError(f"data.packing.open_packs: must be an integer >= 1, got {self.open_packs!r}")
        if self.fit not in PACKING_FITS:
            raise ValueError(f"data.packing.fit: must be one of {PACKING_FITS}, got {self.fit!r}")


def bucket_tokens(buckets: Sequence[Bucket], tokens_per_clip: TokensPerClip, max_tokens: int) -> list[int]:
    """DiT tokens of a clip of each bucket; raises naming data.packing.max_tokens if one cannot fit."""
    tokens = [int(tokens_per_clip(b.num_frames, b.height, b.width)) for b in buckets]
    for b, n in zip(buckets, tokens, strict=True):
        if n > max_tokens:
            raise ValueError(
                f"data.packing.max_tokens={max_tokens}: a clip of bucket ({b.num_frames} frames, {b.height}x"
                f"{b.width}) has {n} tokens; raise max_tokens to at least {max(tokens)} or drop that bucket"
            )
    return tokens


def pack_epoch(bucket_of: np.ndarray, tokens: Sequence[int], max_tokens: int, open_packs: int, seed: int,
               epoch: int) -> list[np.ndarray]:
    """Packed global batches of one epoch: int64 arrays of sample indices, each with at most
    max_tokens tokens in total. bucket_of [N] (-1 = unused), tokens[b] = tokens of bucket b.
    Every usable sample is in exactly one pack."""
    members = np.flatnonzero(bucket_of >= 0)  # [n] usable samples
    order = np.random.default_rng([seed, epoch, 10]).permutation(members)  # own stream: not the bucket plan's
    cost = np.asarray(tokens, dtype=np.int64)[bucket_of[order]]  # [n] tokens per sample, in order
    packs: list[np.ndarray] = []
    open_: list[tuple[list[int], int]] = []  # (sample indices, tokens used), oldest first
    for index, n in zip(order.tolist(), cost.tolist(), strict=True):
        slot = next((k for k, (_, used) in enumerate(open_) if used + n <= max_tokens), None)
        if slot is None:
            if len(open_) == open_packs:
                packs.append(np.asarray(open_.pop(0)[0], dtype=np.int64))
            open_.append(([], 0))
            slot = len(open_) - 1
        samples, used = open_[slot]
        samples.append(index)
        open_[slot] = (samples, used + n)
    packs.extend(np.asarray(samples, dtype=np.int64) for samples, _ in open_)
    return packs


def pack_epoch_decreasing(bucket_of: np.ndarray, tokens: Sequence[int], max_tokens: int, seed: int, epoch: int,
                          window: int = PACK_WINDOW) -> list[np.ndarray]:
    """pack_epoch's contract (every usable sample in exactly one pack of at most max_tokens tokens; a
    pure function of (seed, epoch)), packed first-fit decreasing per window of `window` samples."""
    members = np.flatnonzero(bucket_of >= 0)  # [n] usable samples
    order = np.random.default_rng([seed, epoch, 10]).permutation(members)  # pack_epoch's permutation
    size = np.asarray(tokens, dtype=np.int64)[bucket_of[order]]  # [n] tokens per sample, in order
    packs: list[np.ndarray] = []
    for w, begin in enumerate(range(0, len(order), window)):
        samples, sizes = order[begin:begin + window], size[begin:begin + window]  # [m]
        largest_first = np.argsort(-sizes, kind="stable")  # [m]
        room = np.full(len(samples) + 1, max_tokens, dtype=np.int64)  # room[used] is always a fresh pack
        pack_of = np.empty(len(samples), dtype=np.int64)
        used = 0
        for j in largest_first.tolist():
            k = int(np.argmax(room[:used + 1] >= sizes[j]))  # the first pack with room (a fresh one at worst)
            if k == used:
                used += 1
            room[k] -= sizes[j]
            pack_of[j] = k
        by_pack = largest_first[np.argsort(pack_of[largest_first], kind="stable")]  # [m] grouped by pack
        window_packs = np.split(samples[by_pack], np.cumsum(np.bincount(pack_of, minlength=used))[:-1])
        # largest-first creation order would put the window's long clips first: shuffle its packs
        shuffle = np.random.default_rng([seed, epoch, 11, w]).permutation(used)
        packs.extend(window_packs[k].astype(np.int64) for k in shuffle.tolist())
    return packs


def collate_packed(samples: list[dict]) -> dict:
    """Samples of different shapes -> {"clip": list of uint8 [T_i, H_i, W_i, 3], "caption",
    "key", "skipped", "skipped_by_reason"} (collate_clips' batch, with the clips left unstacked)."""
    by_reason: Counter[str] = Counter()
    for s in samples:
        by_reason.update(s.get("skipped_by_reason", {}))
    return {
        "clip": [s["clip"] for s in samples],  # B x [T_i, H_i, W_i, 3]
        "caption": [s["caption"] for s in samples],
        "key": [s["key"] for s in samples],
        "skipped": torch.tensor(sum(by_reason.values()), dtype=torch.int64),
        "skipped_by_reason": dict(by_reason),
    }
