"""Probing and decoding one source video (PyAV): container facts, then every kept frame once,
at the output rate and size, with the 32x32 thumbnails that scene cuts and motion are measured on."""

from __future__ import annotations

import io

import av
import numpy as np

from data_prep.ingest.config import IngestConfig
from data_prep.ingest.filters import Drop

THUMB = 32  # thumbnails for scene cuts and motion: 32x32 RGB, values 0-255


def probe(data: bytes) -> dict:
    """Container-level facts about a video: fps, frames, width, height, duration (s), codec."""
    try:
        with av.open(io.BytesIO(data)) as container:
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
    if info["fps"] <= 0 or info["width"] <= 0 or info["height"] <= 0:
        raise Drop("decode_error", f"stream reports fps={info['fps']} size={info['width']}x{info['height']}")
    return info


def _target_size(width: int, height: int, max_size: int | None) -> tuple[int, int]:
    """(w, h) after capping the short side at max_size, rounded down to even (yuv420p)."""
    scale = 1.0 if max_size is None else min(1.0, max_size / min(width, height))
    return max(2, int(width * scale) // 2 * 2), max(2, int(height * scale) // 2 * 2)


def decode_frames(data: bytes, info: dict, cfg: IngestConfig, start: float | None, end: float | None):
    """Decode once -> (frames uint8 [T, h, w, 3] or None if not kept, thumbs float32 [T, 32, 32, 3],
    times [T] seconds, output fps). Frames above max_fps are dropped by timestamp."""
    out_fps = info["fps"] if cfg.max_fps is None else min(info["fps"], cfg.max_fps)
    width, height = _target_size(info["width"], info["height"], cfg.max_size)
    frames, thumbs, times = [], [], []
    next_time = None
    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                t = float(frame.time) if frame.time is not None else i / info["fps"]
                if start is not None and t < start - 1e-6:
                    continue
                if end is not None and t >= end - 1e-6:
                    break
                if next_time is not None and t < next_time - 0.5 / info["fps"]:
                    continue  # above the target rate
                next_time = (t if next_time is None else next_time) + 1.0 / out_fps
                thumbs.append(frame.to_ndarray(format="rgb24", width=THUMB, height=THUMB))
                frames.append(frame.to_ndarray(format="rgb24", width=width, height=height, interpolation="AREA"))
                times.append(t)
    except Exception as exn:  # a truncated stream: keep the frames decoded so far, if any
        if not frames:
            raise Drop("decode_error", f"{type(exn).__name__}: {str(exn)[:200]}") from None
    if not frames:
        raise Drop("decode_error" if start is None else "empty_window", "no frames decoded")
    return np.stack(frames), np.stack(thumbs).astype(np.float32), np.array(times), out_fps

