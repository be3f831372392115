"""Probing and decoding one source video (PyAV), in a stream: container facts first (size and
duration are checked before anything is decoded), then the frames one at a time, at the output
rate and size, with the 32x32 thumbnails that scene cuts and motion are measured on.

Nothing holds a whole source: the first pass keeps only thumbnails (3 KB a frame), the second
hands each output frame to the clip encoder as it is decoded (process.py).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass

import av
import numpy as np

from data_prep.ingest.config import IngestConfig
from data_prep.ingest.filters import Drop
from dit_video.data.decode import DEMUXERS

THUMB = 32  # thumbnails for scene cuts and motion: 32x32 RGB, values 0-255


def _open(data: bytes, cfg: IngestConfig):
    """A container over `data` whose decoders (those probing opens included) refuse frames above
    cfg.max_source_pixels, and which opens only the demuxers of video files (no playlists)."""
    return av.open(io.BytesIO(data), options={"format_whitelist": DEMUXERS,
                                               "max_pixels": str(cfg.max_source_pixels)})


def probe(data: bytes, cfg: IngestConfig | None = None) -> dict:
    """Container-level facts about a video: fps, frames, width, height, duration (s), codec.
    Drop("too_large") for frames above cfg.max_source_pixels (found without decoding one)."""
    cfg = cfg or IngestConfig()
    try:
        with _open(data, cfg) as container:
            if not container.streams.video:
                raise Drop("decode_error", "no video stream")
            s = container.streams.video[0]
            fps = float(s.average_rate or s.guessed_rate or 0)
            duration = float(s.duration * s.time_base) if s.duration else (
                container.duration / 1e6 if container.duration else 0.0)
            info = {"fps": fps, "frames": int(s.frames), "width": int(s.codec_context.width),
                    "height": int(s.codec_context.height), "duration": duration,
                    "codec": s.codec_context.name, "container": container.format.name}
    except Drop:
        raise
    except Exception as exn:  # av.error.InvalidDataError and friends
        raise Drop("decode_error", f"{type(exn).__name__}: {str(exn)[:200]}") from None
    if info["width"] * info["height"] > cfg.max_source_pixels or (info["width"] == 0 and info["fps"] > 0):
        # 0 x 0: probing could not decode a frame within the limit
        raise Drop("too_large", f"frames of {info['width']}x{info['height']} (or none decodable within "
                   f"--max-source-pixels {cfg.max_source_pixels})")
    if info["fps"] <= 0 or info["width"] <= 0 or info["height"] <= 0:
        raise Drop("decode_error", f"stream reports fps={info['fps']} size={info['width']}x{info['height']}")
    return info


def target_size(width: int, height: int, max_size: int | None) -> tuple[int, int]:
    """(w, h) after capping the short side at max_size, rounded down to even (yuv420p)."""
    scale = 1.0 if max_size is None else min(1.0, max_size / min(width, height))
    return max(2, int(width * scale) // 2 * 2), max(2, int(height * scale) // 2 * 2)


@dataclass
class Scan:
    """What the first pass learns: per output frame its time and thumbnail, and whether the
    stream decoded to its end without an error (if not, its bytes are never copied as a clip)."""

    times: np.ndarray  # float64 [T] seconds
    thumbs: np.ndarray  # uint8 [T, 32, 32, 3]
    fps: float  # output frame rate
    complete: bool  # decoded to the end of the window with no error
    capped: bool  # stopped at cfg.max_frames


def stream_frames(data: bytes, info: dict, cfg: IngestConfig, start: float | None, end: float | None,
                  size: tuple[int, int] | None) -> Iterator[tuple[float, np.ndarray | None, np.ndarray]]:
    """(time s, frame uint8 [h, w, 3] at `size` = (w, h) or None if size is None, thumbnail
    uint8 [32, 32, 3]) for each kept frame, in order: frames above cfg.max_fps are dropped by
    timestamp, at most cfg.max_frames are given. A decode error ends the stream: raises
    Drop("decode_error") if it happens before the first frame, else stops (see `scan_source`)."""
    out_fps = info["fps"] if cfg.max_fps is None else min(info["fps"], cfg.max_fps)
    next_time, given = None, 0
    with _open(data, cfg) as container:
        stream = container.streams.video[0]
        stream.codec_context.options = {"max_pixels": str(cfg.max_source_pixels)}  # a later, larger frame too
        stream.thread_type = "AUTO"
        try:
            for i, frame in enumerate(container.decode(stream)):
                t = float(frame.time) if frame.time is not None else i / info["fps"]
                if start is not None and t < start - 1e-6:
                    continue
                if (end is not None and t >= end - 1e-6) or given >= cfg.max_frames:
                    return
                if next_time is not None and t < next_time - 0.5 / info["fps"]:
                    continue  # above the target rate
                next_time = (t if next_time is None else next_time) + 1.0 / out_fps
                thumb = frame.to_ndarray(format="rgb24", width=THUMB, height=THUMB)
                pixels = None if size is None else frame.to_ndarray(format="rgb24", width=size[0], height=size[1],
                                                                     interpolation="AREA")
                given += 1
                yield t, pixels, thumb
        except Exception as exn:  # a truncated or corrupt stream: the frames so far stand
            if given == 0:
                raise Drop("decode_error", f"{type(exn).__name__}: {str(exn)[:200]}") from None
            raise _Cut() from None


class _Cut(Exception):
    """The stream ended in an error after some frames had been given."""


def scan_source(data: bytes, info: dict, cfg: IngestConfig, start: float | None, end: float | None) -> Scan:
    """First pass: times and thumbnails of every kept frame (no full-size frame is kept)."""
    times, thumbs, complete = [], [], True
    try:
        for t, _, thumb in stream_frames(data, info, cfg, start, end, None):
            times.append(t)
            thumbs.append(thumb)
    except _Cut:
        complete = False
    if not times:
        raise Drop("decode_error" if start is None else "empty_window", "no frames decoded")
    out_fps = info["fps"] if cfg.max_fps is None else min(info["fps"], cfg.max_fps)
    capped = len(times) >= cfg.max_frames
    return Scan(np.array(times), np.stack(thumbs), out_fps, complete, capped)


def frames_in(data: bytes, info: dict, cfg: IngestConfig, start: float | None, end: float | None,
              size: tuple[int, int], count: int) -> Iterator[np.ndarray]:
    """Second pass: the first `count` output frames at `size`, one at a time (uint8 [h, w, 3])."""
    try:
        for n, (_, pixels, _) in enumerate(stream_frames(data, info, cfg, start, end, size)):
            if n >= count:
                return
            yield pixels
    except _Cut:
        return
