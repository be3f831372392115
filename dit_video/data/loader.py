"""Shards -> batches of clips: the training and validation input pipeline, exactly resumable.

    shard paths --(scan headers once: index.py)--> sample index [N] --(bucket per sample)-->
    global batches of the epoch (order.py: f(seed, epoch)) --(rank r takes start + s*W + r;
    worker w takes steps s = w mod num_workers)--> read members by offset --> decode + crop
    --> collate --> {"clip", "caption", "key", "skipped", "skipped_by_reason", "position"}

Joint image+video training (data.image_ratio > 0): the epoch's global batches also hold image
batches, one frame of each of their clips (order.mix_image_batches), so which batches are images
is part of the same pure plan and resumes exactly.

Packed batches (data.packing.enabled, for DiT.forward_packed): the global batches are token-budget
packs of clips of any bucket instead (data/packing.py: pack_epoch, also a pure f(seed, epoch));
PackedVideoShardDataset reads each clip at its own bucket's shape and `clip` is a list.

Exact resume (the loader state, for checkpoints; see order.py for the derivation):
    VideoDataModule.state_dict() -> {"epoch": int, "batches_into_epoch": int, "seed": int,
                                     "world_size": int, "fingerprint": str}
  `batches_into_epoch` counts global batches (over all ranks) consumed so far in `epoch`.
  Lightning stores it in checkpoints under "VideoDataModule" and calls load_state_dict() before
  building the loaders; other trainers call the two methods themselves. Guarantees:
  * same world size, any num_workers: the resumed run yields exactly the batches (keys, frames,
    crops) the uninterrupted run would have yielded from that step on;
  * another world size: the epoch continues at the same global batch, so no sample of the
    epoch is repeated or dropped, except that each epoch ends with the last
    (remaining mod world size) batches skipped so all ranks make the same number of steps;
  * `fingerprint` hashes the shard names and keys: resuming on other data logs a warning and
    starts the next epoch from its beginning (the old position means nothing there).
  The position is recorded when a batch reaches the training step (`on_before_batch_transfer`),
  not when a worker produces it, so prefetched batches are not counted as consumed.

Security: only local files are opened; members are read as bytes by offset and decoded here
(mp4 with the video decoder, txt as utf-8, json with `json`): never unpickled, never `pipe:`.

Bad samples are skipped, never fatal, and counted by reason: structural problems once, when the
index is built (index.py: bad_tar, unsafe_name, non_contiguous_key, duplicate_member,
missing_video), content problems when read (decode_error, decode_timeout, too_short,
empty_caption, bad_caption, bad_json, no_bucket). A training batch replaces a bad sample by a
deterministic draw from the same bucket, so batch shapes and the order stay exact; validation
just yields fewer. Counts ride on the next batch (`skipped`, `skipped_by_reason`), so they reach
the training process from DataLoader workers. Fewer shards than workers is fine: workers split
batches, not shards.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import braceexpand
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dit_video.data.buckets import Bucket, assign_bucket, image_buckets, make_buckets
from dit_video.data.decode import (
    BACKENDS,
    SampleError,
    TimedCall,
    decode_clip,
    decode_image,
    resize_crop,
    torchcodec_problem,
)
from dit_video.data.index import IMAGE_EXTS, VIDEO_EXTS, MemberReader, ShardIndex, build_index
from dit_video.data.order import epoch_batches, eval_steps, mix_image_batches, steps_per_rank, train_steps
from dit_video.data.packing import PackingConfig, TokensPerClip, bucket_tokens, collate_packed, pack_epoch

logger = logging.getLogger(__name__)

# "pipe:", "http://", "s3://", "file:" ...: a URL scheme at the start of the string.
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
CROP_MODES = ("center", "random")
# A training reader that cannot use this many samples in a row is reading the wrong files (or
# broken ones); replacing them would otherwise retry forever without yielding anything.
MAX_CONSECUTIVE_SKIPS = 1000


def check_local(path: str, field: str = "shards") -> str:
    """Return `path` if it is a local file path; raise a one-line ValueError for any URL."""
    if _URL_SCHEME.match(path):
        raise ValueError(
            f"{field}: {path!r} is a URL, but dit-video reads local shard files only "
            "(webdataset would run 'pipe:' URLs as shell commands); copy the shards to local disk"
        )
    return path


def resolve_shards(spec: str | Sequence[str], field: str = "shards") -> list[str]:
    """Expand braces ('train-{000000..000009}.tar') and globs ('train-*.tar') into a sorted
    list of existing local files. URLs are refused; a pattern matching nothing adds nothing."""
    patterns = [spec] if isinstance(spec, str) else list(spec)
    paths: set[str] = set()
    for pattern in patterns:
        for expanded in braceexpand.braceexpand(check_local(str(pattern), field)):
            paths.update(p for p in glob.glob(os.path.expanduser(expanded)) if os.path.isfile(p))
    return sorted(paths)


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


@dataclass
class VideoDataConfig:
    """Where clips come from and how they are sampled. Filled from `conf/data/*.yaml`."""

    shards: str | list[str] = "data/demo/train-*.tar"  # training shards: glob/brace pattern or list of paths (local only)
    val_shards: str | list[str] | None = "data/demo/val-*.tar"  # validation shards, or None for no validation
    num_frames: int = 17  # T: frames per clip (the single bucket when `buckets` is None)
    fps: float | None = 8.0  # sampling rate of the clip; None = consecutive source frames
    size: tuple[int, int] = (32, 32)  # (H, W) after resizing the short side and cropping
    batch_size: int = 16  # clips per batch, per process (per GPU)
    num_workers: int = 2  # DataLoader worker processes per training process; 0 = decode in the main process
    shuffle_buffer: int = 256  # 0 = index order; > 0 = a full permutation per epoch (kept for old configs)
    seed: int = 0  # seeds the epoch order, frame starts and crops (with epoch and sample index)
    decoder: str = "auto"  # "auto" (decord, PyAV fallback), "decord", "pyav" or "torchcodec" (see data/decode.py)
    crop: str = "random"  # training crop: "random" or "center" (validation always uses "center")
    kind: str = "clips"  # "clips" (this config) or "latents" (dit_video.data.latents.LatentDataConfig)
    buckets: list | None = None  # [{num_frames, size: [H, W], batch_size?}, ...]; None = one bucket (num_frames, size, batch_size)
    bucket_budget: int | None = None  # frames*H*W per batch for buckets without batch_size (tokens per batch ~ constant)
    decode_timeout: float | None = 30.0  # seconds; a sample whose decode takes longer is skipped (decode_timeout)
    image_ratio: float = 0.0  # joint image+video training: fraction of training batches that are images (one frame per clip)
    image_batch_size: int | None = None  # images per image batch (more than batch_size keeps tokens per batch ~ constant); None = batch_size
    packing: PackingConfig | dict | None = None  # token-budget packed training batches {enabled, max_tokens, open_packs} (data/packing.py); None = off

    def __post_init__(self):
        # Hydra hands over ListConfig / lists from YAML: normalise them to plain Python types.
        if not isinstance(self.shards, str):
            self.shards = [str(s) for s in self.shards]
        if self.val_shards is not None and not isinstance(self.val_shards, str):
            self.val_shards = [str(s) for s in self.val_shards]
        if not isinstance(self.size, int | str):
            self.size = tuple(int(s) for s in self.size)
        if self.fps is not None and not isinstance(self.fps, str):
            self.fps = float(self.fps)
        if self.buckets is not None:
            self.buckets = [dict(b) for b in self.buckets]
        if not isinstance(self.packing, PackingConfig):
            packing = dict(self.packing or {})
            unknown = set(packing) - {"enabled", "max_tokens", "open_packs"}
            if unknown:
                raise ValueError(f"data.packing: unknown field(s) {sorted(unknown)}; use enabled, max_tokens, open_packs")
            self.packing = PackingConfig(**packing)

    def bucket_table(self) -> list[Bucket]:
        """The buckets batches are drawn from (one, (num_frames, size, batch_size), by default)."""
        if self.buckets is None:
            return [Bucket(self.num_frames, self.size[0], self.size[1], self.batch_size)]
        return make_buckets(self.buckets, self.bucket_budget)

    def validate(self) -> None:
        """Raise a one-line ValueError naming the first bad field and the fix."""
        if self.kind != "clips":
            raise ValueError(f"data.kind: VideoDataConfig is kind 'clips', got {self.kind!r}")
        for field in ("shards", "val_shards"):
            spec = getattr(self, field)
            if spec is None:
                continue
            if len(spec) == 0:
                raise ValueError(f"data.{field}: is empty; give a glob such as 'data/demo/train-*.tar'")
            if not resolve_shards(spec, field=f"data.{field}"):
                first = spec if isinstance(spec, str) else spec[0]
                out = os.path.dirname(first) or "."
                raise ValueError(
                    f"data.{field}: no files match {spec!r} — run 'python -m data_prep.make_demo --out {out}' "
                    "to create the demo set, or point it at your shards"
                )
        if not (isinstance(self.num_frames, int) and self.num_frames >= 1):
            raise ValueError(f"data.num_frames: must be an integer >= 1, got {self.num_frames!r}")
        if self.fps is not None and not (isinstance(self.fps, float) and self.fps > 0):
            raise ValueError(f"data.fps: must be > 0 or null (consecutive frames), got {self.fps!r}")
        if not (isinstance(self.size, tuple) and len(self.size) == 2 and all(s >= 1 for s in self.size)):
            raise ValueError(f"data.size: must be [H, W] with positive integers, got {self.size!r}")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise ValueError(f"data.batch_size: must be an integer >= 1, got {self.batch_size!r}")
        if not (isinstance(self.num_workers, int) and self.num_workers >= 0):
            raise ValueError(f"data.num_workers: must be an integer >= 0, got {self.num_workers!r}")
        if not (isinstance(self.shuffle_buffer, int) and self.shuffle_buffer >= 0):
            raise ValueError(f"data.shuffle_buffer: must be an integer >= 0, got {self.shuffle_buffer!r}")
        if self.decoder not in BACKENDS:
            raise ValueError(f"data.decoder: must be one of {BACKENDS}, got {self.decoder!r}")
        if self.decoder == "torchcodec" and torchcodec_problem():
            raise ValueError(f"data.decoder=torchcodec: {torchcodec_problem()}")
        if self.crop not in CROP_MODES:
            raise ValueError(f"data.crop: must be one of {CROP_MODES}, got {self.crop!r}")
        if self.decode_timeout is not None and not self.decode_timeout > 0:
            raise ValueError(f"data.decode_timeout: must be > 0 seconds or null, got {self.decode_timeout!r}")
        if not (isinstance(self.image_ratio, int | float) and 0.0 <= self.image_ratio < 1.0):
            raise ValueError(f"data.image_ratio: must be in [0, 1) (0 = videos only), got {self.image_ratio!r}")
        if self.image_batch_size is not None and not (isinstance(self.image_batch_size, int) and self.image_batch_size >= 1):
            raise ValueError(f"data.image_batch_size: must be an integer >= 1 or null (= batch_size), got {self.image_batch_size!r}")
        self.packing.validate()
        if self.packing.enabled and self.image_ratio > 0:
            raise ValueError("data.packing.enabled packs 1-frame buckets with clips already; set data.image_ratio=0")
        self.bucket_table()  # raises naming the bad bucket


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

    infinite=True (training): epoch after epoch from `start` = (epoch, batches_into_epoch),
    bad samples replaced from their bucket. infinite=False (validation): one pass over the index
    in order, split across ranks and workers; every pass is identical.
    batched=True yields collated batches (use DataLoader(batch_size=None)); batched=False yields
    the items of those batches one by one (for a DataLoader that batches itself).
    """

    def __init__(self, index: ShardIndex, bucket_of: np.ndarray, buckets: Sequence[Bucket], *, seed: int,
                 infinite: bool, shuffle: bool, batched: bool, rank: int | None = None,
                 world_size: int | None = None, start: tuple[int, int] = (0, 0), image_ratio: float = 0.0,
                 image_batch_size: int | None = None):
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
        self.start = (int(start[0]), int(start[1]))
        self.bucket_members = [np.flatnonzero(self.bucket_of == b) for b in range(len(self.buckets))]

    # -- subclass interface ----------------------------------------------------------------
    def load(self, raw: dict[str, bytes], key: str, bucket: Bucket, rng: np.random.Generator) -> dict:
        raise NotImplementedError

    def collate(self, items: list[dict]) -> dict:
        raise NotImplementedError

    member_exts: tuple[str, ...] | None = None  # members to read (None = all)

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
        epoch, start = self.start
        steps_before = 0  # steps of this rank in earlier epochs of this iterator (all workers)
        bad: set[int] = set()  # samples this reader found unusable (skipped without re-reading)
        first_pass = True
        while True:
            plan, shapes = self.epoch_plan_shapes(epoch)
            if steps_per_rank(len(plan), start, self.world_size) == 0:
                if not any(len(m) for m in self.bucket_members):  # nothing usable at all: fail, do not spin
                    skips.charge(self.index.skipped_by_reason or {"no_bucket": 1}, "no usable sample in the shards")
                elif start == 0:
                    raise ValueError(
                        f"data: an epoch has {len(plan)} batches, fewer than the {self.world_size} processes "
                        "reading it; use more data or a smaller batch_size"
                    )
                epoch, start = epoch + 1, 0
                continue
            if first_pass:
                self._index_skips(skips, worker)
                first_pass = False
            steps = train_steps(len(plan), start, self.world_size, self.rank, num_workers, worker, steps_before)
            for _, g, after in steps:
                items = [self._load_slot(reader, skips, int(i), epoch, g, slot, bad, shapes[g])
                         for slot, i in enumerate(plan[g])]
                nxt = (epoch, after) if steps_per_rank(len(plan), after, self.world_size) > 0 else (epoch + 1, 0)
                items[0]["skipped_by_reason"] = skips.take()
                items[0]["skipped"] = sum(items[0]["skipped_by_reason"].values())
                yield from self._emit(items, position=nxt)
            steps_before += steps_per_rank(len(plan), start, self.world_size)
            epoch, start = epoch + 1, 0

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

    def _emit(self, items: list[dict], position) -> Iterator[dict]:
        if self.batched:
            batch = self.collate(items)
            if position is not None:
                batch["position"] = position
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
        except OSError as exn:
            raise SampleError("bad_tar", f"{type(exn).__name__}: {exn}") from None
        # One stream per (seed, epoch, sample key): frames and crops depend neither on who reads
        # the sample nor on which other shards are in the set (data_prep.encode_latents relies on it).
        rng = np.random.default_rng([self.seed, epoch, key_seed(ref.key)])
        return self.load(raw, ref.key, shape or self.buckets[int(self.bucket_of[index])], rng)

    def _shard_of(self, index: int) -> str:
        return self.index.shards[self.index.samples[index].shard]


def key_seed(key: str) -> int:
    """A stable 63-bit integer for a sample key (Python's hash() changes per process)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


def read_caption(raw: dict[str, bytes]) -> str:
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


def _video_ext(members) -> str | None:
    return next((e for e in VIDEO_EXTS if e in members), None)


def _image_ext(members) -> str | None:
    return next((e for e in IMAGE_EXTS if e in members), None)


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
                 start: tuple[int, int] = (0, 0), index: ShardIndex | None = None, image_ratio: float = 0.0,
                 image_batch_size: int | None = None):
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
        index = index if index is not None else build_index(urls)
        bucket_of = self._assign(index, buckets, fps) if len(buckets) > 1 else np.zeros(len(index), np.int64)
        super().__init__(index, bucket_of, buckets, seed=seed, infinite=infinite, shuffle=shuffle_buffer > 0,
                         batched=batched, rank=rank, world_size=world_size, start=start, image_ratio=image_ratio,
                         image_batch_size=image_batch_size)

    @staticmethod
    def _assign(index: ShardIndex, buckets: Sequence[Bucket], fps: float | None) -> np.ndarray:
        """Bucket per sample from its .json metadata (width, height, frames, fps); -1 = none fits."""
        out = np.full(len(index), -1, dtype=np.int64)
        reader = MemberReader(index.shards)
        for i, ref in enumerate(index.samples):
            try:
                meta = read_meta(reader.read(ref, ("json",))) or {}
                is_image = _video_ext(ref.members) is None
                frames = 1 if is_image else int(meta["frames"])
                out[i] = assign_bucket(buckets, int(meta["width"]), int(meta["height"]), frames,
                                       float(meta.get("fps") or 1.0), fps, is_image)
            except (SampleError, KeyError, TypeError, ValueError, OSError) as exn:
                logger.warning("sample %r has no usable size metadata (%s): left out of the buckets", ref.key, exn)
        reader.close()
        missing = int((out < 0).sum())
        if missing:
            index.skipped_by_reason["no_bucket"] += missing
        return out

    def load(self, raw: dict[str, bytes], key: str, bucket: Bucket, rng: np.random.Generator) -> dict:
        video_ext, image_ext = _video_ext(raw), _image_ext(raw)
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
    own bucket's shape; a batch's "clip" is a list of uint8 [T_i, H_i, W_i, 3].
    """

    def __init__(self, *args, tokens: Sequence[int], max_tokens: int, open_packs: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.tokens, self.max_tokens, self.open_packs = list(tokens), int(max_tokens), int(open_packs)

    def epoch_plan(self, epoch: int) -> list[np.ndarray]:
        return pack_epoch(self.bucket_of, self.tokens, self.max_tokens, self.open_packs, self.seed, epoch)

    def epoch_plan_shapes(self, epoch: int) -> tuple[list[np.ndarray], list[None]]:
        packs = self.epoch_plan(epoch)
        return packs, [None] * len(packs)  # None: each sample at its own bucket's shape

    def collate(self, items: list[dict]) -> dict:
        return collate_packed(items)


def _with_skips(item: dict, skipped: dict[str, int]) -> dict:
    item["skipped"] = sum(skipped.values())
    item["skipped_by_reason"] = skipped
    return item


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


def _as_is(batch):
    return batch  # the dataset collates: the DataLoader only moves batches across processes


class ResumableDataModule(L.LightningDataModule):
    """Holds the training loader position and implements the checkpoint interface described in
    the module docstring. Subclasses build `_train_dataset(start, rank, world_size)`."""

    STATE_VERSION = 1

    def __init__(self):
        super().__init__()
        self._position = (0, 0)  # (epoch, global batches consumed in it)
        self._restored: dict | None = None
        self._fingerprint: str | None = None
        self.train_world_size = 1

    def _seed(self) -> int:
        return int(self.cfg.seed)

    def state_dict(self) -> dict:
        return {
            "version": self.STATE_VERSION,
            "epoch": int(self._position[0]),
            "batches_into_epoch": int(self._position[1]),
            "seed": self._seed(),
            "world_size": int(self.train_world_size),
            "fingerprint": self._fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != self.STATE_VERSION:
            raise ValueError(f"data loader state version {state.get('version')!r} is not {self.STATE_VERSION}")
        self._restored = dict(state)
        self._position = (int(state["epoch"]), int(state["batches_into_epoch"]))

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        if isinstance(batch, dict) and batch.get("position") is not None:
            self._position = tuple(int(p) for p in batch["position"])  # consumed, not just prefetched
        return batch

    def _rank_world(self) -> tuple[int, int]:
        """(rank, world size) to shard data by: the data-parallel ones. Under a Trainer they are
        the strategy's DistributedSampler arguments, which dit_video.parallel's sequence-parallel
        strategies set so all ranks of one group read the same batches (= trainer rank/world otherwise)."""
        from lightning.pytorch.strategies import ParallelStrategy

        trainer = getattr(self, "trainer", None)  # set by Lightning's Trainer; None when used alone
        if trainer is not None and isinstance(trainer.strategy, ParallelStrategy) and trainer.world_size > 1:
            kwargs = trainer.strategy.distributed_sampler_kwargs
            return int(kwargs["rank"]), int(kwargs["num_replicas"])
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        return dist_info()

    def _start(self, fingerprint: str, seed: int) -> tuple[int, int]:
        """Where training enters the order, after checking a restored state fits this data."""
        self._fingerprint = fingerprint
        if self._restored is None:
            return self._position
        state, self._restored = self._restored, None
        if state.get("fingerprint") not in (None, fingerprint) or state.get("seed") != seed:
            logger.warning(
                "data loader state is for other data or another seed (fingerprint %s, seed %s; now %s, %s): "
                "starting epoch %d from its beginning", state.get("fingerprint"), state.get("seed"),
                fingerprint, seed, int(state["epoch"]) + 1)
            self._position = (int(state["epoch"]) + 1, 0)
        return self._position

    def _loader(self, dataset: IterableDataset, num_workers: int) -> DataLoader:
        return DataLoader(
            dataset, batch_size=None, num_workers=num_workers, collate_fn=_as_is,
            # Persistent workers keep their place in the infinite training stream across validation.
            persistent_workers=num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )


class VideoDataModule(ResumableDataModule):
    """Training (infinite, exact order, `cfg.crop`, buckets) and validation (one pass, centre
    crop, fixed seed) loaders over WebDataset video shards; resumable via state_dict()."""

    def __init__(self, cfg: VideoDataConfig | Mapping):
        super().__init__()
        # A mapping (e.g. Hydra's cfg.data) is checked field by field: unknown keys are a TypeError.
        self.cfg = cfg if isinstance(cfg, VideoDataConfig) else VideoDataConfig(**cfg)
        # (num_frames, height, width) -> DiT tokens of a clip; set by the run from its VAE and DiT
        # (run.py), read only by data.packing.
        self.tokens_per_clip: TokensPerClip | None = None

    def setup(self, stage: str | None = None) -> None:
        self.cfg.validate()  # here, not in __init__: composing a config must not need the data

    def train_dataset(self) -> VideoShardDataset:
        cfg = self.cfg
        cfg.validate()
        rank, world = self._rank_world()
        self.train_world_size = world
        urls = resolve_shards(cfg.shards)
        index = build_index(urls)
        start = self._start(index.fingerprint(), cfg.seed)
        if cfg.packing.enabled:
            return self._packed_train_dataset(urls, index, start, rank, world)
        return VideoShardDataset(
            urls, cfg.num_frames, cfg.fps, cfg.size, crop=cfg.crop, decoder=cfg.decoder,
            shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed, infinite=True, batch_size=cfg.batch_size,
            buckets=cfg.bucket_table(), decode_timeout=cfg.decode_timeout, batched=True, rank=rank,
            world_size=world, start=start, index=index, image_ratio=cfg.image_ratio,
            image_batch_size=cfg.image_batch_size,
        )

    def _packed_train_dataset(self, urls, index, start, rank, world) -> PackedVideoShardDataset:
        cfg = self.cfg
        if self.tokens_per_clip is None:
            raise ValueError(
                "data.packing.enabled: the loader needs the DiT's tokens per clip; train through dit_video.run "
                "(task=dit) or set VideoDataModule.tokens_per_clip = f(num_frames, height, width)"
            )
        buckets = cfg.bucket_table()
        return PackedVideoShardDataset(
            urls, cfg.num_frames, cfg.fps, cfg.size, crop=cfg.crop, decoder=cfg.decoder, seed=cfg.seed,
            infinite=True, buckets=buckets, decode_timeout=cfg.decode_timeout, batched=True, rank=rank,
            world_size=world, start=start, index=index,
            tokens=bucket_tokens(buckets, self.tokens_per_clip, cfg.packing.max_tokens),
            max_tokens=cfg.packing.max_tokens, open_packs=cfg.packing.open_packs,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset(), self.cfg.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        cfg = self.cfg
        if cfg.val_shards is None:
            return []  # Lightning skips validation for an empty list
        cfg.validate()
        rank, world = self._rank_world()
        dataset = VideoShardDataset(
            cfg.val_shards, cfg.num_frames, cfg.fps, cfg.size, crop="center", decoder=cfg.decoder,
            shuffle_buffer=0, seed=cfg.seed, infinite=False, batch_size=cfg.batch_size,
            buckets=cfg.bucket_table(), decode_timeout=cfg.decode_timeout, batched=True, rank=rank,
            world_size=world,
        )
        return self._loader(dataset, cfg.num_workers)
