"""Shards -> batches of clips: the training and validation input pipeline, exactly resumable.

    shard paths --(scan headers once per node, mapped by every rank and worker: index.py,
    index_cache.py)--> sample index [N] --(bucket per sample)-->
    global batches of the epoch (order.py: f(seed, epoch)) --(rank r takes start + s*W + r;
    worker w takes steps s = w mod num_workers)--> read members by offset --> decode + crop
    --> collate --> {"clip", "caption", "key", "skipped", "skipped_by_reason", "position"}

This module walks that plan: PlannedShardDataset (ranks, workers, replacement of bad samples,
skip counts). The rest of the pipeline, by job:
  config.py      VideoDataConfig, resolve_shards (the shard spec -> local files)
  samples.py     one sample's members -> caption, metadata, per-key seed; collate_clips
  clips.py       VideoShardDataset, PackedVideoShardDataset: the plan read as clips
  datamodule.py  ResumableDataModule, VideoDataModule: loaders and the checkpointed position
  latents.py     the same plan read from a latent cache (data=latents)

Joint image+video training (data.image_ratio > 0): the epoch's global batches also hold image
batches, one frame of each of their clips (order.mix_image_batches), so which batches are images
is part of the same pure plan and resumes exactly.

Packed batches (data.packing.enabled, for DiT.forward_packed): the global batches are token-budget
packs of clips of any bucket instead (data/packing.py: pack_epoch, also a pure f(seed, epoch));
PackedVideoShardDataset reads each clip at its own bucket's shape and `clip` is a list.

Balanced steps (data.balance, on by default; data/balance.py): the global batches of an epoch are
grouped into steps of about the same DiT cost, so no rank waits for another at the all-reduce; with
one bucket or one process the order is order.py's unchanged. Every training batch carries its
step's planned `rank_imbalance` and `pad_fraction` when the run gave the loader its clip costs.

Exact resume (the loader state, for checkpoints; see order.py for the derivation):
    VideoDataModule.state_dict() -> {"epoch": int, "batches_into_epoch": int, "seed": int,
                                     "world_size": int, "fingerprint": str[, "segments": [[W, steps], ...]]}
  `batches_into_epoch` counts global batches (over all ranks) consumed so far in `epoch`;
  `segments` (balanced steps only) is the epoch's history of world sizes (balance.segment_order).
  Lightning stores it in checkpoints under "VideoDataModule" and calls load_state_dict() before
  building the loaders; other trainers call the two methods themselves. Guarantees:
  * same world size, any num_workers: the resumed run yields exactly the batches (keys, frames,
    crops) the uninterrupted run would have yielded from that step on;
  * another world size: the epoch continues with the batches not read yet (order.py: from the
    same global batch; balanced: the rest re-planned), so no sample of the epoch is repeated or dropped, except that each epoch ends with the last
    (remaining mod world size) batches skipped so all ranks make the same number of steps;
  * `fingerprint` hashes the shard names and keys: resuming on other data logs a warning and
    starts the next epoch from its beginning (the old position means nothing there).
  The position is recorded when a batch reaches the training step (`on_before_batch_transfer`),
  not when a worker produces it, so prefetched batches are not counted as consumed.

Security: only local files are opened (config.check_local); members are read as bytes by offset
and decoded by the dataset (mp4 with the video decoder, txt as utf-8, json with `json`;
clips.py, samples.py): never unpickled, never `pipe:`.

Bad samples are skipped, never fatal, and counted by reason: structural problems once, when the
index is built (index.py: bad_tar, unsafe_name, bad_name, not_a_file, sparse_member, too_large,
non_contiguous_key, stray_member, duplicate_member, missing_video), size metadata when buckets
are assigned from the sizes the index holds (clips.py: bad_json, bad_meta, no_bucket), content
problems when read (decode_error, decode_timeout, too_short, too_large, empty_caption, bad_caption, bad_json,
shard_changed: a member cut short since the index was built). A training batch replaces a bad sample by a
deterministic draw from the same bucket, so batch shapes and the order stay exact; validation
just yields fewer. Counts ride on the next batch (`skipped`, `skipped_by_reason`), so they reach
the training process from DataLoader workers. Fewer shards than workers is fine: workers split
batches, not shards.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from dit_video.data.balance import ClipCost, loader_position, read_epoch
from dit_video.data.buckets import Bucket, image_buckets
from dit_video.data.index import MemberReader, ShardIndex
from dit_video.data.order import epoch_batches, eval_steps, mix_image_batches, steps_per_rank, train_steps
from dit_video.data.samples import key_seed
from dit_video.errors import SampleError

logger = logging.getLogger(__name__)

# A training reader that cannot use this many samples in a row is reading the wrong files (or
# broken ones); replacing them would otherwise retry forever without yielding anything.
MAX_CONSECUTIVE_SKIPS = 1000


def dist_info(sequence_parallel_size: int = 1) -> tuple[int, int]:
    """(rank, world size) for reading data: torch.distributed if initialised, else RANK /
    WORLD_SIZE from the launcher's environment, else (0, 1).

    sequence_parallel_size > 1 (strategy.sequence_parallel_size): the data-parallel (rank, size)
    instead. The world is a (data-parallel, sequence-parallel) grid in row-major order (as
    dit_video/parallel.py builds its groups), and the sp ranks of one group read the same batches.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return rank // sequence_parallel_size, world // sequence_parallel_size


class _SkipLog:
    """Skips seen by one reader (one worker of one process) since they were last handed on."""

    def __init__(self):
        self.pending: Counter[str] = Counter()
        self.in_a_row = 0  # reset by the reader whenever a sample decodes

    def skip(self, reason: str, key: str, url: str, detail: str) -> None:
        logger.warning("skipped sample %r in %s: %s (%s)", key, url, reason, detail)
        self.charge({reason: 1}, f"last: {reason} in {url}: {detail}")

    def charge(self, counts: Mapping[str, int], last: str) -> None:
        """Count skips without logging them (index-time skips were logged when found)."""
        self.pending.update(counts)
        self.in_a_row += sum(counts.values())
        if self.in_a_row >= MAX_CONSECUTIVE_SKIPS:
            raise RuntimeError(
                f"data.shards: {self.in_a_row} samples in a row could not be used ({last}); "
                "check that the shards are dit-video shards ({key}.mp4/.txt/.json)"
            )

    def take(self) -> dict[str, int]:
        taken, self.pending = dict(self.pending), Counter()
        return taken


class PlannedShardDataset(IterableDataset):
    """Samples of an indexed shard set in the order of order.py; subclasses say how one sample's
    members become an item (`load`) and how items become a batch (`collate`).

    infinite=True (training): epoch after epoch from `start` = (epoch, batches_into_epoch[, segments]),
    bad samples replaced from their bucket; balance=True puts global batches of about the same cost
    (`costs`: balance.cost_table) in each step (data/balance.py). infinite=False (validation): one
    pass over the index in order, split across ranks and workers; every pass is identical.
    batched=True yields collated batches (use DataLoader(batch_size=None)); batched=False yields
    the items of those batches one by one (for a DataLoader that batches itself).
    """

    def __init__(self, index: ShardIndex, bucket_of: np.ndarray, buckets: Sequence[Bucket], *, seed: int,
                 infinite: bool, shuffle: bool, batched: bool, rank: int | None = None,
                 world_size: int | None = None, start: tuple = (0, 0), image_ratio: float = 0.0,
                 image_batch_size: int | None = None, balance: bool = False,
                 costs: dict[tuple[int, int, int], ClipCost] | None = None):
        super().__init__()
        self.index, self.buckets = index, list(buckets)
        # Joint image+video training (infinite only): image batches read one frame of each clip.
        self.image_ratio = float(image_ratio) if infinite else 0.0
        self.image_buckets = image_buckets(self.buckets, image_batch_size)
        self.bucket_of = np.asarray(bucket_of, dtype=np.int64)  # [N], -1 = fits no bucket
        self.seed, self.infinite, self.shuffle, self.batched = seed, infinite, shuffle, batched
        if rank is None or world_size is None:
            rank, world_size = dist_info()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.rank, self.world_size = rank, world_size
        self.start = loader_position(start)
        self.balance, self.costs = bool(balance), costs
        if len(self.start) > 2 and not self.balance:  # order.py cannot continue a balanced epoch
            logger.warning("data.balance is off but the loader state was saved mid-epoch with it on: "
                           "starting epoch %d from its beginning", self.start[0] + 1)
            self.start = (self.start[0] + 1, 0)
        self.bucket_members = [np.flatnonzero(self.bucket_of == b) for b in range(len(self.buckets))]

    # -- subclass interface ----------------------------------------------------------------
    def load(self, raw: dict[str, bytes], key: str, bucket: Bucket, rng: np.random.Generator) -> dict:
        raise NotImplementedError

    def collate(self, items: list[dict]) -> dict:
        raise NotImplementedError

    member_exts: tuple[str, ...] | None = None  # members to read (None = all)
    max_tokens: int | None = None  # token slots of a pack (packed datasets); bucket batches hold batch_size clips

    # -- the order -------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Start training at the beginning of `epoch` (a resume sets `start` instead)."""
        self.start = (int(epoch), 0)

    def epoch_plan(self, epoch: int) -> list[np.ndarray]:
        return self.epoch_plan_shapes(epoch)[0]

    def epoch_plan_shapes(self, epoch: int) -> tuple[list[np.ndarray], list[Bucket]]:
        """(global batches of `epoch`, the bucket each batch is read at): with image_ratio > 0 some
        batches are image batches of a clip bucket (order.mix_image_batches), read at 1 frame."""
        sizes = [b.batch_size for b in self.buckets]
        batches = epoch_batches(self.bucket_of, sizes, self.seed, epoch, shuffle=self.shuffle, drop_last=self.infinite)
        image_sizes = [0 if b is None else b.batch_size for b in self.image_buckets]
        batches, ids = mix_image_batches(batches, self.bucket_of, image_sizes, self.image_ratio, self.seed, epoch)
        shapes = self.buckets + self.image_buckets  # ids >= len(self.buckets) name image buckets
        return batches, [shapes[i] for i in ids]

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader = MemberReader(self.index.shards)
        skips = _SkipLog()
        try:
            if self.infinite:
                yield from self._train(reader, skips, worker, num_workers)
            else:
                yield from self._eval(reader, skips, worker, num_workers)
        finally:
            reader.close()

    def _index_skips(self, skips: _SkipLog, worker: int) -> None:
        # Structural skips are charged once, to one reader, so totals are not multiplied.
        if self.rank == 0 and worker == 0 and self.index.skipped_by_reason:
            skips.pending.update(self.index.skipped_by_reason)

    def _train(self, reader: MemberReader, skips: _SkipLog, worker: int, num_workers: int) -> Iterator[dict]:
        epoch, position = self.start[0], self.start
        steps_before = 0  # steps of this rank in earlier epochs of this iterator (all workers)
        bad: set[int] = set()  # samples this reader found unusable (skipped without re-reading)
        first_pass = True
        while True:
            plan, shapes = self.epoch_plan_shapes(epoch)
            # which unit each index reads: order.py's order, or balanced steps (balance.py)
            reading = read_epoch(plan, shapes, self.bucket_of, self.buckets, position, self.world_size, self.balance,
                                 self.costs, self.max_tokens)
            if steps_per_rank(reading.length, reading.start, self.world_size) == 0:
                if not any(len(m) for m in self.bucket_members):  # nothing usable at all: fail, do not spin
                    skips.charge(self.index.skipped_by_reason or {"no_bucket": 1}, "no usable sample in the shards")
                elif reading.before + reading.start == 0:
                    raise ValueError(
                        f"data: an epoch has {len(plan)} batches, fewer than the {self.world_size} processes "
                        "reading it; use more data or a smaller batch_size"
                    )
                epoch, position = epoch + 1, (epoch + 1, 0)
                continue
            if first_pass:
                self._index_skips(skips, worker)
                first_pass = False
            steps = train_steps(reading.length, reading.start, self.world_size, self.rank, num_workers, worker,
                                steps_before)
            for _, index, after in steps:
                g = reading.unit(index)
                items = [self._load_slot(reader, skips, int(i), epoch, g, slot, bad, shapes[g])
                         for slot, i in enumerate(plan[g])]
                more = steps_per_rank(reading.length, after, self.world_size) > 0
                nxt = reading.position(epoch, after) if more else (epoch + 1, 0)
                items[0]["skipped_by_reason"] = skips.take()
                items[0]["skipped"] = sum(items[0]["skipped_by_reason"].values())
                yield from self._emit(items, position=nxt, step=reading.step_stats(index, self.rank))
            steps_before += steps_per_rank(reading.length, reading.start, self.world_size)
            epoch, position = epoch + 1, (epoch + 1, 0)

    def _load_slot(self, reader, skips, index: int, epoch: int, g: int, slot: int, bad: set[int],
                   shape: Bucket | None = None) -> dict:
        """Load sample `index`; on failure, a replacement drawn from its bucket (deterministically:
        the first draw that decodes does not depend on which samples this reader already knows to
        be bad, so the choice is the same for any worker count). A bad sample is counted once."""
        bucket = int(self.bucket_of[index])
        draw = None  # made on the first failure only: seeding one costs ~15-45 us, 1-3% of a 32x32 clip decode
        while True:
            if index not in bad:
                try:
                    item = self._load_index(reader, index, epoch, shape)
                    skips.in_a_row = 0
                    return item
                except SampleError as err:
                    bad.add(index)
                    skips.skip(err.reason, self.index.samples[index].key, self._shard_of(index), err.detail)
            elif len(bad) >= len(self.bucket_members[bucket]) and bad.issuperset(self.bucket_members[bucket].tolist()):
                raise RuntimeError(f"data: every sample of bucket {self.buckets[bucket]} failed to load")
            members = self.bucket_members[bucket]
            if draw is None:
                draw = np.random.default_rng([self.seed, epoch, g, slot, 3])
            index = int(members[draw.integers(len(members))])

    def _eval(self, reader: MemberReader, skips: _SkipLog, worker: int, num_workers: int) -> Iterator[dict]:
        plan = self.epoch_plan(0)
        self._index_skips(skips, worker)
        held = None  # each item is held back until the next is ready, so trailing skips ride on it
        for g in eval_steps(len(plan), self.world_size, self.rank, num_workers, worker):
            items = []
            for i in plan[g]:
                try:
                    items.append(self._load_index(reader, int(i), 0))
                except SampleError as err:
                    skips.skip(err.reason, self.index.samples[int(i)].key, self._shard_of(int(i)), err.detail)
            if not items:
                continue
            if self.batched:
                items[0]["skipped_by_reason"] = skips.take()
                items[0]["skipped"] = sum(items[0]["skipped_by_reason"].values())
                yield from self._emit(items, position=None)
                continue
            for item in items:
                if held is not None:
                    yield _with_skips(held, skips.take())
                held = item
        if held is not None:
            yield _with_skips(held, skips.take())

    def _emit(self, items: list[dict], position, step: dict[str, float] | None = None) -> Iterator[dict]:
        if self.batched:
            batch = self.collate(items)
            if position is not None:
                batch["position"] = position
            batch.update(step or {})  # the step's planned rank_imbalance and pad_fraction (balance.py)
            yield batch
        else:
            for item in items:
                item.setdefault("skipped", 0)
                item.setdefault("skipped_by_reason", {})
                yield item

    def _load_index(self, reader: MemberReader, index: int, epoch: int, shape: Bucket | None = None) -> dict:
        """Load sample `index` at `shape` (an image batch's 1-frame bucket), default its own bucket."""
        ref = self.index.samples[index]
        try:
            raw = reader.read(ref, self.member_exts)
        except EOFError as exn:  # the shard is shorter than when it was indexed
            raise SampleError("shard_changed", f"{exn}; was the shard rewritten after the run started?") from None
        except OSError as exn:
            raise SampleError("bad_tar", f"{type(exn).__name__}: {exn}") from None
        # One stream per (seed, epoch, sample key): frames and crops depend neither on who reads
        # the sample nor on which other shards are in the set (data_prep.encode_latents relies on it).
        rng = np.random.default_rng([self.seed, epoch, key_seed(ref.key)])
        return self.load(raw, ref.key, shape or self.buckets[int(self.bucket_of[index])], rng)

    def _shard_of(self, index: int) -> str:
        return self.index.shards[self.index.samples[index].shard]


def _with_skips(item: dict, skipped: dict[str, int]) -> dict:
    item["skipped"] = sum(skipped.values())
    item["skipped_by_reason"] = skipped
    return item
