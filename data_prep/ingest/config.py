"""IngestConfig: every option of an ingest run, its default, and its validation."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

STATE_DIR = ".ingest"  # OUT/.ingest/unit-XXXXX.json: one finished unit each (what resume reads)
MANIFEST_FORMATS = ("auto", "jsonl", "parquet", "both")


@dataclass
class IngestConfig:
    """Every option of an ingest run; written into report.json."""

    out: str = "data/ingest"  # output directory
    prefix: str = "train"  # shard name prefix
    shard_size: int = 256  # clips per shard
    shard_bytes: int | None = None  # also roll a shard over before it passes this many bytes
    unit_size: int = 16  # sources per unit of work (the grain of parallelism and of resume)
    workers: int = 1  # worker processes
    license: str | None = None  # licence recorded for sources that do not name one
    split: str = "none"  # "none" | "fixed" | "scene" | "scene+fixed"
    clip_seconds: float = 4.0  # length of fixed pieces (the last, shorter piece is kept if long enough)
    scene_detector: str = "builtin"  # "builtin" (thumbnail difference) | "pyscenedetect" (optional extra)
    scene_threshold: float = 30.0  # builtin: cut where the mean |thumbnail difference| (0-255) peaks above this
    min_scene_frames: int = 8  # builtin: no two cuts closer than this many frames
    # Sizes and time a 24 GiB machine survives with every worker on a hostile or huge source (a source
    # is decoded a frame at a time, so memory does not grow with its length; these bound the rest):
    max_size: int | None = 1080  # downscale so the short side is at most this many pixels (None = keep)
    max_source_pixels: int = 4096 * 4096  # sources with larger frames are dropped at probe time (too_large)
    max_frames: int = 100_000  # output frames read per source (~1 h at 30 fps); the rest is not decoded
    decode_timeout: float = 1800.0  # seconds per source (decode + encode); its process is killed (decode_timeout)
    max_fps: float | None = None  # drop frames above this rate (None = keep)
    reencode: str = "auto"  # "auto" (only when something changed or the source is not H.264 mp4) | "always"
    crf: int = 18  # x264 quality of re-encoded clips
    min_duration: float = 0.0  # seconds; shorter clips are dropped (too_short)
    max_duration: float | None = None  # seconds; longer clips are dropped (too_long)
    min_resolution: int = 0  # pixels; sources with a shorter short side are dropped (low_resolution)
    min_aspect: float = 0.0  # width / height; sources outside [min_aspect, max_aspect] are dropped (bad_aspect)
    max_aspect: float = math.inf
    min_motion: float = 0.0  # mean |frame difference| of 32x32 thumbnails (0-255); below: low_motion
    min_caption_words: int = 1  # fewer words: caption_too_short
    max_caption_chars: int = 1000  # more characters: caption_too_long
    caption_blocklist: list[str] = field(default_factory=list)  # words or phrases that drop a caption (dit_video.prompt_filter)
    manifest_format: str = "auto"  # "jsonl", "parquet", "both", or "auto" (jsonl, plus parquet if pyarrow is installed)

    def validate(self) -> None:
        if self.split not in ("none", "fixed", "scene", "scene+fixed"):
            raise ValueError(f"--split: use none, fixed, scene or scene+fixed, got {self.split!r}")
        if self.scene_detector not in ("builtin", "pyscenedetect"):
            raise ValueError(f"--scene-detector: use builtin or pyscenedetect, got {self.scene_detector!r}")
        if self.scene_detector == "pyscenedetect" and "scene" in self.split:
            try:
                import scenedetect  # noqa: F401
            except ImportError:
                raise ValueError("--scene-detector pyscenedetect needs `pip install scenedetect[opencv-headless]`; "
                                 "or use the builtin detector") from None
        if self.reencode not in ("auto", "always"):
            raise ValueError(f"--reencode: use auto or always, got {self.reencode!r}")
        if self.clip_seconds <= 0 or self.shard_size < 1 or self.unit_size < 1 or self.workers < 1:
            raise ValueError("--clip-seconds, --shard-size, --unit-size and --workers must be positive")
        if self.max_size is not None and self.max_size < 2:
            raise ValueError(f"--max-size must be >= 2 pixels, got {self.max_size}")
        if self.max_source_pixels < 4 or self.max_frames < 1 or not self.decode_timeout > 0:
            raise ValueError("--max-source-pixels, --max-frames and --decode-timeout must be positive")
        if self.manifest_format not in MANIFEST_FORMATS:
            raise ValueError(f"--manifest-format: use one of {', '.join(MANIFEST_FORMATS)}, got {self.manifest_format!r}")
        if self.manifest_format in ("parquet", "both") and not have_pyarrow():
            raise ValueError(f"--manifest-format {self.manifest_format} needs pyarrow: pip install 'dit-video[parquet]' "
                             "(or use --manifest-format jsonl)")


def have_pyarrow() -> bool:
    """Whether manifest.parquet can be written (pyarrow is an optional extra)."""
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return False
    return True
