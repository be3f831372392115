"""What the clip loader is configured with: VideoDataConfig (filled from `conf/data/*.yaml`,
checked by `validate`) and the shard specs it names (resolve_shards: braces and globs -> sorted
local files; check_local refuses URLs, so no `pipe:` shell command is ever run).
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import braceexpand

from dit_video.data.buckets import Bucket, make_buckets
from dit_video.data.decode import BACKENDS, torchcodec_problem
from dit_video.data.packing import PackingConfig
from dit_video.data.synthetic import DEMO_FRAMES, DEMO_SIZE

# "pipe:", "http://", "s3://", "file:" ...: a URL scheme at the start of the string.
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
CROP_MODES = ("center", "random")


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
    packing: PackingConfig | dict | None = None  # token-budget packed training batches {enabled, max_tokens, open_packs, fit} (data/packing.py); None = off
    balance: bool = True  # group batches of about the same DiT cost into each step, so no rank waits for another (data/balance.py); same order with one bucket or one process

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
            unknown = set(packing) - {"enabled", "max_tokens", "open_packs", "fit"}
            if unknown:
                raise ValueError(f"data.packing: unknown field(s) {sorted(unknown)}; use enabled, max_tokens, open_packs, fit")
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
                if tuple(self.size) == (DEMO_SIZE, DEMO_SIZE) and self.num_frames == DEMO_FRAMES:
                    fix = f"run 'python -m data_prep.make_demo --out {out}' to create the demo set"
                else:  # the synthetic set is 32x32x17: for any other size, the user's own videos
                    fix = (f"make shards of your videos with 'python -m data_prep.ingest --folder <videos> --out {out} "
                           f"--max-size {max(self.size)}' (docs/data.md)")
                raise ValueError(f"data.{field}: no files match {spec!r} — {fix}, or point it at your shards")
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
        if not isinstance(self.balance, bool):
            raise ValueError(f"data.balance: must be true or false, got {self.balance!r}")
        self.packing.validate()
        if self.packing.enabled and self.image_ratio > 0:
            raise ValueError("data.packing.enabled packs 1-frame buckets with clips already; set data.image_ratio=0")
        self.bucket_table()  # raises naming the bad bucket
