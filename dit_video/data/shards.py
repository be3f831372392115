"""Writing WebDataset shards: the one path every clip (synthetic or real) takes onto disk.

Shard layout (standard WebDataset: members of one sample share the key before the first dot):
  {key}.mp4   H.264 video bytes (yuv420p)
  {key}.txt   caption, utf-8
  {key}.json  {"fps": float, "frames": int, "width": int, "height": int, "source": str, ...}
              (data_prep.ingest adds duration, codec, source_sha256, license, start,
              end, motion and the source's fps/size/codec)

Only bytes members are written (never pickles), and each shard is written under a temporary
name (`*.tar.partial`) and renamed when complete, so a crash never leaves a half-written
shard under a name that the reader's `*.tar` glob picks up.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

# Letters, digits, '_' and '-': no '/' (would make directories), no '.' (WebDataset splits the
# key from the extension at the first dot), hence no '..' either.
_KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,200}$")
# A fixed mtime makes shards byte-identical for identical inputs (handy for determinism checks).
_MTIME = 1_700_000_000


def encode_mp4(frames: np.ndarray, fps: float, crf: int = 18) -> bytes:
    """Encode uint8 frames [T, H, W, 3] (RGB) to H.264 mp4 bytes, in memory.

    yuv420p needs even H and W. crf 18 is visually lossless for the tiny flat-coloured demo
    clips (their hue survives the 2x chroma subsampling); every frame is an I- or P-frame (no
    B-frames) so decoders seek simply and the file stays small. Byte-identical for identical
    frames (one encoder thread, no threaded lookahead): see Mp4Encoder.
    """
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        got = (type(frames).__name__, getattr(frames, "dtype", None), getattr(frames, "shape", None))
        raise ValueError(f"encode_mp4: frames must be a uint8 numpy array [T, H, W, 3], got {got}")
    if frames.shape[0] == 0:
        raise ValueError("encode_mp4: frames is empty (T = 0)")
    encoder = Mp4Encoder(frames.shape[2], frames.shape[1], fps, crf)
    encoder.add(frames)
    return encoder.finish()


class Mp4Encoder:
    """encode_mp4 a few frames at a time: data_prep.ingest streams a long source through it, so no
    clip is ever held whole in memory. add(uint8 [t, H, W, 3]) any number of times, then finish()
    -> mp4 bytes (the same bytes encode_mp4 gives for all the frames at once)."""

    def __init__(self, width: int, height: int, fps: float, crf: int = 18):
        if height % 2 or width % 2:
            raise ValueError(
                f"encode_mp4: H and W must be even for yuv420p, got {height}x{width}; crop or resize first"
            )
        if not fps > 0:
            raise ValueError(f"encode_mp4: fps must be > 0, got {fps}")
        self.width, self.height, self.frames = width, height, 0
        self._buffer = io.BytesIO()
        self._container = av.open(self._buffer, mode="w", format="mp4")
        stream = self._container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        # One thread, no sliced or lookahead threads: threaded x264 can decide differently when the
        # machine is busy, and shards must be byte-identical for identical inputs. Clips are tiny,
        # so threads would only add start-up cost anyway.
        stream.codec_context.thread_count = 1
        stream.options = {"crf": str(crf), "preset": "fast", "threads": "1",
                          "x264-params": "bframes=0:threads=1:lookahead-threads=1:sliced-threads=0"}
        self._stream = stream

    def add(self, frames: np.ndarray) -> None:
        if frames.shape[1:] != (self.height, self.width, 3):
            raise ValueError(f"encode_mp4: frames are {frames.shape[1:]}, the clip is {(self.height, self.width, 3)}")
        yuv = rgb_to_yuv420p(frames)  # [t, H * 3 / 2, W]
        for t in range(len(frames)):
            frame = av.VideoFrame.from_ndarray(yuv[t], format="yuv420p")
            self._container.mux(self._stream.encode(frame))
        self.frames += len(frames)

    def finish(self) -> bytes:
        if self.frames == 0:
            self._container.close()
            raise ValueError("encode_mp4: frames is empty (T = 0)")
        self._container.mux(self._stream.encode())  # flush the encoder
        self._container.close()
        return self._buffer.getvalue()

    def close(self) -> None:
        """Give up on the clip (no bytes)."""
        self._container.close()


def rgb_to_yuv420p(frames: np.ndarray) -> np.ndarray:
    """uint8 RGB [T, H, W, 3] -> uint8 planar yuv420p [T, H * 3 / 2, W] (Y, then U, then V).

    BT.601 limited range (what decoders assume for untagged SD video), in 8-bit fixed point.
    Converting here in integers, rather than in swscale or in float, makes encoding
    byte-for-byte reproducible: those paths pick SIMD kernels by buffer alignment and round
    differently from run to run.
    """
    num_frames, height, width, _ = frames.shape
    rgb = frames.astype(np.int32)  # [T, H, W, 3]
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]  # [T, H, W] each
    y = ((66 * r + 129 * g + 25 * b + 128) >> 8) + 16  # [T, H, W]
    # Chroma is linear in RGB: sum each 2x2 block first, then divide by 4 * 256 with rounding.
    block = rgb.reshape(num_frames, height // 2, 2, width // 2, 2, 3).sum(axis=(2, 4))  # [T, H/2, W/2, 3]
    r4, g4, b4 = block[..., 0], block[..., 1], block[..., 2]
    u = ((-38 * r4 - 74 * g4 + 112 * b4 + 512) >> 10) + 128  # [T, H/2, W/2]
    v = ((112 * r4 - 94 * g4 - 18 * b4 + 512) >> 10) + 128  # [T, H/2, W/2]
    chroma = np.concatenate([u, v], axis=1).reshape(num_frames, height // 2, width)  # [T, H/2, W]
    return np.clip(np.concatenate([y, chroma], axis=1), 0, 255).astype(np.uint8)  # [T, H * 3 / 2, W]


def check_key(key: str) -> str:
    """Return `key` if it is a safe sample key, else raise ValueError naming the rule."""
    if not isinstance(key, str) or not _KEY_PATTERN.match(key):
        raise ValueError(
            f"sample key {key!r} is not safe: use 1-200 characters from [A-Za-z0-9_-] "
            "(no '/', no '.', since WebDataset splits the key at the first dot)"
        )
    return key


class ShardWriter:
    """Write samples into `{out_dir}/{prefix}-{index:06d}.tar`, rolling over every `max_count`
    samples (or before a shard would pass `max_bytes`).

        with ShardWriter("data/demo", prefix="train", max_count=256) as writer:
            writer.write(key, mp4_bytes, caption, fps=8, frames=17, width=32, height=32, source="synthetic")

    If the `with` block raises, the shard in progress is deleted; completed shards stay.
    """

    def __init__(self, out_dir: str | os.PathLike, prefix: str = "train", max_count: int = 256,
                 max_bytes: int | None = None):
        if max_count < 1:
            raise ValueError(f"ShardWriter: max_count must be >= 1, got {max_count}")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"ShardWriter: max_bytes must be >= 1 or None, got {max_bytes}")
        check_key(prefix)
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.shards: list[Path] = []  # completed shards, in order
        self.total = 0  # samples written over all shards
        self._tar: tarfile.TarFile | None = None
        self._tmp_path: Path | None = None
        self._final_path: Path | None = None
        self._count = 0
        self._bytes = 0
        self._keys: set[str] = set()
        self.last_meta: dict = {}
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()

    def write(self, key: str, mp4: bytes, caption: str, *, fps: float, frames: int, width: int,
              height: int, source: str, **extra) -> None:
        """Add one sample; the keyword arguments become its `.json` metadata (`extra`: any
        further JSON-able fields, e.g. duration, codec, source_sha256, license from data_prep.ingest)."""
        check_key(key)
        if key in self._keys:
            raise ValueError(f"ShardWriter: duplicate sample key {key!r}")
        if not isinstance(mp4, bytes | bytearray) or len(mp4) == 0:
            raise ValueError(f"ShardWriter: sample {key!r} has no mp4 bytes")
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"ShardWriter: sample {key!r} has an empty caption")
        meta = {"fps": float(fps), "frames": int(frames), "width": int(width), "height": int(height),
                "source": str(source)}
        clash = sorted(set(extra) & set(meta))
        if clash:
            raise ValueError(f"ShardWriter: extra metadata {clash} would overwrite the standard fields")
        meta.update(extra)
        members = {
            f"{key}.mp4": bytes(mp4),
            f"{key}.txt": caption.encode("utf-8"),
            f"{key}.json": json.dumps(meta, sort_keys=True).encode("utf-8"),
        }
        size = sum(512 + -(-len(data) // 512) * 512 for data in members.values())  # tar: header + padded data
        full = self._count >= self.max_count
        too_big = self.max_bytes is not None and self._count > 0 and self._bytes + size > self.max_bytes
        if self._tar is not None and (full or too_big):
            self._finish_shard()
        if self._tar is None:
            self._open_shard()
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = _MTIME
            info.mode = 0o444
            self._tar.addfile(info, io.BytesIO(data))
        self._keys.add(key)
        self.last_meta = meta  # the .json just written (data_prep copies it into the manifest)
        self._count += 1
        self._bytes += size
        self.total += 1

    def close(self) -> None:
        """Finish the shard in progress (if any) and rename it to its final name."""
        if self._tar is not None:
            self._finish_shard()

    def _open_shard(self) -> None:
        index = len(self.shards)
        self._final_path = self.out_dir / f"{self.prefix}-{index:06d}.tar"
        self._tmp_path = self._final_path.with_name(self._final_path.name + ".partial")
        self._tar = tarfile.open(self._tmp_path, mode="w", format=tarfile.PAX_FORMAT)
        self._count = 0
        self._bytes = 0

    def _finish_shard(self) -> None:
        self._tar.close()
        os.replace(self._tmp_path, self._final_path)  # atomic on POSIX: readers see all or nothing
        self.shards.append(self._final_path)
        self._tar = None

    def _abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tmp_path.unlink(missing_ok=True)
            self._tar = None
