"""Shards -> batches of clips: the training and validation input pipeline.

    shard paths --(resample | split by node and worker)--> tar members --(group by key)-->
    raw samples --(shuffle buffer)--> decode + crop --> {"clip", "caption", "key"} --> collate

Security: WebDataset's default decoders unpickle `.pyd` and `torch.load` `.pth` members, and
its URL opener runs `pipe:` URLs as shell commands. So this module opens only local files
itself, uses WebDataset just to walk tar members and group them into samples, and decodes
every member from bytes here: mp4 with the video decoder, txt as utf-8, json with `json`.

Bad samples are skipped, never fatal. Each skip is logged once (key + reason) and counted;
the count rides on the next sample the worker yields (`skipped`, `skipped_by_reason`) so it
reaches the training process even from DataLoader workers, where `collate_clips` sums it into
`batch["skipped"]`.
"""

from __future__ import annotations

import glob
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
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from dit_video.data.decode import BACKENDS, SampleError, decode_clip, resize_crop

logger = logging.getLogger(__name__)

# "pipe:", "http://", "s3://", "file:" ...: a URL scheme at the start of the string.
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
CROP_MODES = ("center", "random")
# A training reader that cannot use this many samples in a row is reading the wrong files (or
# broken ones); resampling would otherwise retry them forever without yielding anything.
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


@dataclass
class VideoDataConfig:
    """Where clips come from and how they are sampled. Filled from `conf/data/*.yaml`."""

    shards: str | list[str] = "data/demo/train-*.tar"  # training shards: glob/brace pattern or list of paths (local only)
    val_shards: str | list[str] | None = "data/demo/val-*.tar"  # validation shards, or None for no validation
    num_frames: int = 17  # T: frames per clip
    fps: float | None = 8.0  # sampling rate of the clip; None = consecutive source frames
    size: tuple[int, int] = (32, 32)  # (H, W) after resizing the short side and cropping
    batch_size: int = 16  # clips per batch, per process (per GPU)
    num_workers: int = 2  # DataLoader worker processes per training process; 0 = decode in the main process
    shuffle_buffer: int = 256  # samples held for shuffling (about one shard mixes across shards); 0 = no shuffle
    seed: int = 0  # seeds shard resampling, shuffling, frame starts and crops (combined with rank and worker)
    decoder: str = "auto"  # "auto" (decord, PyAV fallback), "decord" or "pyav"
    crop: str = "random"  # training crop: "random" or "center" (validation always uses "center")

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

    def validate(self) -> None:
        """Raise a one-line ValueError naming the first bad field and the fix."""
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
        if self.crop not in CROP_MODES:
            raise ValueError(f"data.crop: must be one of {CROP_MODES}, got {self.crop!r}")


class _SkipLog:
    """Skips seen by one reader (one worker of one process) since they were last handed on."""

    def __init__(self):
        self.pending: Counter[str] = Counter()
        self.in_a_row = 0  # reset by the reader whenever a sample decodes

    def skip(self, reason: str, key: str, url: str, detail: str) -> None:
        logger.warning("skipped sample %r in %s: %s (%s)", key, url, reason, detail)
        self.pending[reason] += 1
        self.in_a_row += 1
        if self.in_a_row >= MAX_CONSECUTIVE_SKIPS:
            raise RuntimeError(
                f"data.shards: {self.in_a_row} samples in a row could not be used (last: {reason} in {url}: "
                f"{detail}); check that the shards are dit-video shards ({{key}}.mp4/.txt/.json)"
            )

    def take(self) -> dict[str, int]:
        taken, self.pending = dict(self.pending), Counter()
        return taken


class VideoShardDataset(IterableDataset):
    """Yields {"clip": uint8 [T, H, W, 3], "caption": str, "key": str, "skipped": int,
    "skipped_by_reason": dict[str, int]} from local WebDataset shards.

    infinite=True (training): each reader (rank x worker) draws shards with replacement from
    its own seeded stream, so no reader ever runs dry however few shards there are, and
    shuffles samples through a buffer. infinite=False (validation): one pass over the shards
    in order, split across ranks and workers, no shuffle; every pass is identical.
    """

    def __init__(self, shards: str | Sequence[str], num_frames: int, fps: float | None,
                 size: tuple[int, int], *, crop: str = "random", decoder: str = "auto",
                 shuffle_buffer: int = 0, seed: int = 0, infinite: bool = True):
        super().__init__()
        self.urls = resolve_shards(shards)
        if not self.urls:
            raise ValueError(f"shards: no files match {shards!r}")
        if crop not in CROP_MODES:
            raise ValueError(f"crop: must be one of {CROP_MODES}, got {crop!r}")
        if decoder not in BACKENDS:
            raise ValueError(f"decoder: must be one of {BACKENDS}, got {decoder!r}")
        self.num_frames, self.fps, self.size = num_frames, fps, tuple(size)
        self.crop, self.decoder = crop, decoder
        self.shuffle_buffer, self.seed, self.infinite = shuffle_buffer, seed, infinite
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Reseed the training stream, e.g. when a run resumes at epoch `epoch`."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict]:
        rank, world_size, worker, num_workers = wds.utils.pytorch_worker_info()
        if self.infinite:
            # A fresh stream per __iter__ call (persistent workers keep this counter).
            epoch, self.epoch = self.epoch, self.epoch + 1
        else:
            epoch = 0  # validation: the same clips and frame starts every time
        # One independent stream per (seed, epoch, rank, worker): reproducible for a fixed
        # world size and worker count, never shared between readers.
        shard_rng, shuffle_rng, sample_rng = (
            np.random.default_rng([self.seed, epoch, rank, worker, stream]) for stream in range(3)
        )
        skips = _SkipLog()

        if self.infinite:
            urls = _resample(self.urls, shard_rng)
        else:
            urls = wds.split_by_worker(wds.split_by_node(iter(self.urls)))
        raw = self._read_samples(urls, skips)
        if self.infinite and self.shuffle_buffer > 1:
            seed = int(shuffle_rng.integers(2**63))
            raw = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=_PyRandom(seed))(raw)

        # Hold each decoded sample back until the next one is ready, so skips after the last
        # good sample of a finite pass still ride on a yielded sample.
        held = None
        for sample in raw:
            try:
                item = self._decode(sample, sample_rng)
            except SampleError as err:
                skips.skip(err.reason, sample["__key__"], sample["__url__"], err.detail)
                continue
            skips.in_a_row = 0
            if held is not None:
                yield _with_skips(held, skips.take())
            held = item
        if held is not None:
            yield _with_skips(held, skips.take())
        # A reader that yields nothing cannot report its skips; they are still in the log.

    def _read_samples(self, urls: Iterator[str], skips: _SkipLog) -> Iterator[dict]:
        """Raw samples {"__key__", "__url__", ext: bytes} from each shard in `urls`."""
        for url in urls:
            check_local(url)

            def on_tar_error(exn: Exception, url: str = url) -> bool:
                skips.skip("bad_tar", "?", url, f"{type(exn).__name__}: {str(exn.args[0])[:200] if exn.args else ''}")
                return True  # an unreadable shard or member is skipped, never fatal

            try:
                with open(url, "rb") as stream:
                    files = tar_file_expander([{"url": url, "stream": stream}], handler=on_tar_error)
                    yield from group_by_keys(_safe_members(files, skips), handler=on_tar_error)
            except OSError as exn:
                on_tar_error(exn)

    def _decode(self, sample: dict, rng: np.random.Generator) -> dict:
        """Raw sample -> item, or SampleError naming why it cannot be used."""
        if "mp4" not in sample:
            members = sorted(k for k in sample if not k.startswith("__"))
            raise SampleError("missing_video", f"no .mp4 member, has {members}")
        caption = sample.get("txt", b"")
        try:
            caption = caption.decode("utf-8").strip()
        except UnicodeDecodeError as exn:
            raise SampleError("bad_caption", f"caption is not utf-8: {exn}") from None
        if not caption:
            raise SampleError("empty_caption", "caption (.txt) is missing or empty")
        if "json" in sample:
            try:
                meta = json.loads(sample["json"].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exn:
                raise SampleError("bad_json", str(exn)[:200]) from None
            if not isinstance(meta, dict):
                raise SampleError("bad_json", f"metadata is a {type(meta).__name__}, not an object")
        clip = decode_clip(sample["mp4"], self.num_frames, self.fps, rng, backend=self.decoder)  # [T, h, w, 3]
        clip = resize_crop(clip, self.size, mode=self.crop, rng=rng)  # [T, H, W, 3]
        return {"clip": torch.from_numpy(np.ascontiguousarray(clip)), "caption": caption, "key": sample["__key__"]}


def _resample(urls: list[str], rng: np.random.Generator) -> Iterator[str]:
    """Shards drawn uniformly with replacement, forever."""
    while True:
        yield urls[int(rng.integers(len(urls)))]


class _PyRandom:
    """The `randint` interface webdataset's shuffle buffer calls, backed by a numpy Generator."""

    def __init__(self, seed: int):
        self._rng = np.random.default_rng(seed)

    def randint(self, low: int, high: int) -> int:  # inclusive, like random.randint
        return int(self._rng.integers(low, high + 1))


def _safe_members(files: Iterator[dict], skips: _SkipLog) -> Iterator[dict]:
    """Drop tar members whose names could escape a directory ('..', leading '/'), once per key."""
    last_bad = None
    for f in files:
        name = f.get("fname")
        if name is not None and (".." in name or name.startswith("/")):
            key = base_plus_ext(name)[0] or name
            if key != last_bad:
                skips.skip("unsafe_name", key, f.get("__url__", "?"), f"tar member name {name!r}")
                last_bad = key
            continue
        yield f


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


class VideoDataModule(L.LightningDataModule):
    """Training (infinite, shuffled, `cfg.crop`) and validation (one pass, centre crop, fixed
    seed) loaders over WebDataset video shards."""

    def __init__(self, cfg: VideoDataConfig | Mapping):
        super().__init__()
        # A mapping (e.g. Hydra's cfg.data) is checked field by field: unknown keys are a TypeError.
        self.cfg = cfg if isinstance(cfg, VideoDataConfig) else VideoDataConfig(**cfg)

    def setup(self, stage: str | None = None) -> None:
        self.cfg.validate()  # here, not in __init__: composing a config must not need the data

    def train_dataloader(self) -> DataLoader:
        cfg = self.cfg
        cfg.validate()
        dataset = VideoShardDataset(
            cfg.shards, cfg.num_frames, cfg.fps, cfg.size, crop=cfg.crop, decoder=cfg.decoder,
            shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed, infinite=True,
        )
        return self._loader(dataset)

    def val_dataloader(self) -> DataLoader | list:
        cfg = self.cfg
        if cfg.val_shards is None:
            return []  # Lightning skips validation for an empty list
        cfg.validate()
        dataset = VideoShardDataset(
            cfg.val_shards, cfg.num_frames, cfg.fps, cfg.size, crop="center", decoder=cfg.decoder,
            shuffle_buffer=0, seed=cfg.seed, infinite=False,
        )
        return self._loader(dataset)

    def _loader(self, dataset: VideoShardDataset) -> DataLoader:
        workers = self.cfg.num_workers
        return DataLoader(
            dataset, batch_size=self.cfg.batch_size, num_workers=workers, collate_fn=collate_clips,
            # Persistent workers keep the dataset's epoch counter, so each new epoch reshuffles.
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
        )
