"""mp4 bytes -> clip: frame sampling at a target fps, three decoder backends, resize and crop.

decode_frames is the plain whole-video PyAV decode (no sampling, no resize) for browsing shards
and for reading written samples back (provenance.detect, tests).

Backends: decord (fast random access; its wheel bundles FFmpeg 4.1) and PyAV (always present,
the reference). "auto" prefers decord and falls back to PyAV when decord is missing or cannot
open the bytes. The decord reader is created from a BytesIO inside the calling process: a
reader made in the parent and inherited by DataLoader workers deadlocks (decord #294).
"torchcodec" (PyTorch's decoder, chosen explicitly) loads the system's FFmpeg 4-8 shared
libraries and must be built for the installed torch: on CPU torch 2.13 that is torchcodec
0.11-0.13 (PyPI's 0.14+ wheels link CUDA 13 and libtorch_cuda). `torchcodec_problem()` says in
one line why it cannot run here; the data config refuses `data.decoder=torchcodec` with it.
"""

from __future__ import annotations

import functools
import io
import math
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F

from dit_video.data.isolate import CallDied, CallTimedOut, IsolatedCall
from dit_video.errors import SampleError

try:
    import decord
except ImportError:  # decord has wheels for x86-64 Linux only
    decord = None

BACKENDS = ("auto", "decord", "pyav", "torchcodec")
# Largest frame the loader decodes: 8192 x 8192 (4.3x a 4K UHD frame; 200 MB as RGB). A header
# claiming more is refused before the decoder allocates anything (a 30000 x 30000 claim is 2.7 GB
# a frame, and a decoder keeps several).
MAX_PIXELS = 8192 * 8192
# Containers the loader opens (FFmpeg demuxer names for VIDEO_EXTS): anything else in a video
# member (a playlist naming other files, a raw stream, an image format) is refused unread.
DEMUXERS = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi"
# AVFormatContext option, and AVCodecContext option for the decoders that probing opens.
_LIMITS = {"format_whitelist": DEMUXERS, "max_pixels": str(MAX_PIXELS)}
# Address space a decode process may add (isolate.IsolatedCall): a clip of 8192 x 8192 frames is
# ~200 MB a frame; this leaves room for a 17-frame clip and the decoder, and no more.
DECODE_MEMORY = 4 << 30


def frame_indices(num_source: int, source_fps: float, num_frames: int, fps: float | None,
                  rng: np.random.Generator) -> np.ndarray:
    """int64 [T] source frame indices: `num_frames` frames spaced source_fps / fps apart
    (consecutive if fps is None) from a start drawn uniformly with `rng`.

    A target fps above the source fps repeats frames rather than failing, so a 24 fps config
    still reads a 15 fps video. Raises SampleError("too_short") if the span does not fit.
    """
    stride = 1.0 if fps is None else source_fps / fps
    offsets = np.round(np.arange(num_frames) * stride).astype(np.int64)  # [T]
    max_start = num_source - 1 - int(offsets[-1])
    if max_start < 0:
        need = f"{int(offsets[-1]) + 1} frames" + ("" if fps is None else f" at {source_fps:g} fps")
        raise SampleError("too_short", f"video has {num_source} frames, clip needs {need}")
    start = int(rng.integers(0, max_start + 1))
    return start + offsets


def open_video(data: bytes):
    """(container, first video stream) of video bytes, opened with the loader's limits: only the
    DEMUXERS, and every decoder (probing included) refuses frames above MAX_PIXELS, so a header
    claiming a huge frame costs nothing. SampleError("too_large" / "decode_error") otherwise;
    close the container when done."""
    container = av.open(io.BytesIO(data), mode="r", options=_LIMITS)
    try:
        if not container.streams.video:
            raise SampleError("decode_error", "no video stream in the container")
        stream = container.streams.video[0]
        # 0 x 0: probing could not decode a frame within the limit (or at all)
        check_pixels(stream.codec_context.width, stream.codec_context.height, "video")
        stream.codec_context.options = {"max_pixels": _LIMITS["max_pixels"]}  # a later, larger frame too
    except BaseException:
        container.close()
        raise
    return container, stream


def _decode_decord(data: bytes, num_frames: int, fps: float | None, rng: np.random.Generator) -> np.ndarray:
    # num_threads=1: DataLoader workers already give one decode per core.
    reader = decord.VideoReader(io.BytesIO(data), num_threads=1)
    indices = frame_indices(len(reader), reader.get_avg_fps(), num_frames, fps, rng)
    return reader.get_batch(indices.tolist()).asnumpy()  # [T, H, W, 3]


def _decode_pyav(data: bytes, num_frames: int, fps: float | None, rng: np.random.Generator) -> np.ndarray:
    container, stream = open_video(data)
    with container:
        source_fps = float(stream.average_rate or stream.guessed_rate or 0)
        if source_fps <= 0:
            raise SampleError("decode_error", "video stream has no frame rate")
        count = stream.frames  # mp4 records the frame count in its index
        if count > 0:
            return _decode_indices(container, stream, frame_indices(count, source_fps, num_frames, fps, rng), count)
        # webm and mkv may not: count the packets (demuxing only, no decoding) and decode again,
        # rather than decode every frame of a possibly long video into a list.
        count = sum(1 for packet in container.demux(stream) if packet.size)
    indices = frame_indices(count, source_fps, num_frames, fps, rng)
    container, stream = open_video(data)
    with container:
        return _decode_indices(container, stream, indices, count)


def _decode_indices(container, stream, indices: np.ndarray, count: int) -> np.ndarray:
    """Frames `indices` (sorted) of `stream`: decoding stops at the last, only the wanted are kept."""
    stream.codec_context.thread_count = 1  # as for decord: one decode per worker process
    wanted = set(indices.tolist())
    by_index, i = {}, -1
    for i, frame in enumerate(container.decode(stream)):
        if i in wanted:
            by_index[i] = frame.to_ndarray(format="rgb24")
        if i >= indices[-1]:
            break
    if len(by_index) < len(wanted):
        raise SampleError("decode_error", f"stream ended at frame {i}, the container says {count} frames")
    return np.stack([by_index[i] for i in indices.tolist()])  # [T, H, W, 3]


def _decode_torchcodec(data: bytes, num_frames: int, fps: float | None, rng: np.random.Generator) -> np.ndarray:
    from torchcodec.decoders import VideoDecoder

    # One FFmpeg thread, as for the other backends: DataLoader workers already give one decode per core.
    decoder = VideoDecoder(data, dimension_order="NHWC", num_ffmpeg_threads=1)
    source_fps = decoder.metadata.average_fps
    if not source_fps or source_fps <= 0:
        raise SampleError("decode_error", "video stream has no frame rate")
    indices = frame_indices(len(decoder), float(source_fps), num_frames, fps, rng)
    return decoder.get_frames_at(indices.tolist()).data.numpy()  # [T, H, W, 3]


@functools.cache
def torchcodec_problem() -> str | None:
    """None if the torchcodec backend can decode in this process, else one line: why not, and the fix."""
    try:
        from torchcodec.decoders import VideoDecoder  # noqa: F401
    except ImportError:
        return ("torchcodec is not installed; pip install 'torchcodec>=0.11,<0.14' (CPU builds for torch "
                f"{torch.__version__.split('+')[0]}) and FFmpeg 4-8 shared libraries, or use decoder auto/pyav")
    except Exception as exc:  # its native libraries did not load (RuntimeError listing every FFmpeg tried)
        reason = _first_line(exc).split(". Likely causes")[0]
        return (f"torchcodec is installed but cannot load ({reason}): it needs FFmpeg 4-8 shared "
                "libraries on the loader path (apt install ffmpeg / conda install ffmpeg) and a build matching "
                f"torch {torch.__version__} (CPU torch: torchcodec 0.11-0.13; PyPI 0.14+ needs CUDA 13); "
                "or use decoder auto/pyav")
    return None


def decode_clip(data: bytes, num_frames: int, fps: float | None, rng: np.random.Generator,
                backend: str = "auto") -> np.ndarray:
    """Decode `num_frames` frames sampled at `fps` from mp4 bytes -> uint8 [T, H, W, 3].

    Raises SampleError("decode_error" | "too_short" | "too_large", detail) for bad, short or
    oversized videos and nothing else for bad data; a wrong `backend` name is a ValueError (a
    config bug, not data). Memory stays bounded: frames above MAX_PIXELS are refused from the
    header, and only the sampled frames are kept, whatever the video's length.
    """
    if backend not in BACKENDS:
        raise ValueError(f"decoder {backend!r} is not one of {BACKENDS}")
    if backend == "decord" and decord is None:
        raise ValueError("decoder 'decord' is not installed here; use decoder 'auto' or 'pyav'")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if backend == "torchcodec" and torchcodec_problem():
        raise ValueError(f"decoder 'torchcodec': {torchcodec_problem()}")

    if backend != "pyav":
        # decord and torchcodec probe with FFmpeg's defaults (a 12000 x 12000 header costs decord
        # 1.5 GB before it fails): look at the bytes with the limits first.
        try:
            open_video(data)[0].close()
        except SampleError:
            raise
        except Exception as exc:
            raise SampleError("decode_error", f"probe: {type(exc).__name__}: {_first_line(exc)}") from None
    if backend == "torchcodec":
        try:
            return _decode_torchcodec(data, num_frames, fps, rng)
        except SampleError:
            raise
        except Exception as exc:  # RuntimeError / ValueError from FFmpeg for bad bytes
            raise SampleError("decode_error", f"torchcodec: {type(exc).__name__}: {_first_line(exc)}") from None
    if backend in ("auto", "decord") and decord is not None:
        state = rng.bit_generator.state  # so a PyAV retry draws the same start as decord would have
        try:
            return _decode_decord(data, num_frames, fps, rng)
        except SampleError:
            raise  # too short is a property of the video, not of the backend
        except Exception as exc:  # decord raises DECORDError, RuntimeError, ... for bad bytes
            if backend == "decord":
                raise SampleError("decode_error", f"decord: {type(exc).__name__}: {_first_line(exc)}") from None
            rng.bit_generator.state = state
    try:
        return _decode_pyav(data, num_frames, fps, rng)
    except SampleError:
        raise
    except Exception as exc:  # av.error.InvalidDataError, EOFError, ValueError, ...
        raise SampleError("decode_error", f"pyav: {type(exc).__name__}: {_first_line(exc)}") from None


def _first_line(exc: Exception, limit: int = 200) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:limit] if text else ""


def resize_crop(frames: np.ndarray | torch.Tensor, size: tuple[int, int], mode: str = "center",
                rng: np.random.Generator | None = None) -> np.ndarray | torch.Tensor:
    """uint8 [T, H, W, 3] -> uint8 [T, h, w, 3] for size = (h, w); same array type as the input.

    Scales so the frame just covers (h, w) (preserving aspect ratio; bilinear with antialias
    so downscaling does not alias), then crops the centre or, with mode="random", a crop
    placed with `rng`. A frame already of size (h, w) is returned untouched.
    """
    if mode not in ("center", "random"):
        raise ValueError(f"crop mode {mode!r} is not 'center' or 'random'")
    if mode == "random" and rng is None:
        raise ValueError("crop mode 'random' needs an rng")
    out_h, out_w = size
    is_numpy = isinstance(frames, np.ndarray)
    clip = torch.from_numpy(frames) if is_numpy else frames
    _, in_h, in_w, _ = clip.shape
    if (in_h, in_w) == (out_h, out_w):
        return frames

    scale = max(out_h / in_h, out_w / in_w)
    # ceil so rounding never leaves the scaled frame a pixel short of the crop.
    new_h, new_w = max(out_h, math.ceil(in_h * scale - 1e-6)), max(out_w, math.ceil(in_w * scale - 1e-6))
    if (new_h, new_w) != (in_h, in_w):
        x = clip.permute(0, 3, 1, 2).float()  # [T, 3, H, W]
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
        clip = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)  # [T, new_h, new_w, 3]
    if mode == "center":
        top, left = (new_h - out_h) // 2, (new_w - out_w) // 2
    else:
        top, left = int(rng.integers(0, new_h - out_h + 1)), int(rng.integers(0, new_w - out_w + 1))
    clip = clip[:, top:top + out_h, left:left + out_w].contiguous()  # [T, h, w, 3]
    return clip.numpy() if is_numpy else clip


def decode_image(data: bytes) -> np.ndarray:
    """jpg/png/webp bytes -> uint8 [1, H, W, 3] (an image is a one-frame clip).

    Only JPEG, PNG and WebP are opened (whatever the member is called: Pillow's other formats
    include some that run external programs), and the header's size is checked against
    MAX_PIXELS before any pixel is decoded: SampleError("too_large") / ("decode_error")."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data), formats=("JPEG", "PNG", "WEBP")) as image:
            check_pixels(*image.size, "image")
            return np.array(image.convert("RGB"))[None]  # [1, H, W, 3] (a writable copy)
    except Image.DecompressionBombError as exc:  # the header claims more than Pillow's own limit
        raise SampleError("too_large", f"image: {_first_line(exc)}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise SampleError("decode_error", f"image: {type(exc).__name__}: {_first_line(exc)}") from None


def check_pixels(width: int, height: int, what: str) -> None:
    """SampleError("too_large") if a width x height frame is beyond MAX_PIXELS (or not a size)."""
    if not (0 < width and 0 < height and width * height <= MAX_PIXELS):
        raise SampleError("too_large", f"{what} claims {width}x{height} pixels; the limit is {MAX_PIXELS} "
                          "(decode.MAX_PIXELS)")


def decode_frames(video: str | Path | bytes, max_frames: int | None = None) -> np.ndarray:
    """All frames (or the first max_frames) of a video file or bytes: uint8 [T, H, W, 3]."""
    source = io.BytesIO(video) if isinstance(video, bytes) else str(video)
    frames = []
    with av.open(source) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
            if max_frames is not None and len(frames) >= max_frames:
                break
    if not frames:
        raise ValueError(f"detect: no video frames in {video if not isinstance(video, bytes) else 'the bytes'}")
    return np.stack(frames)  # [T, H, W, 3]


class TimedCall:
    """Decode in a child process (isolate.IsolatedCall) that is killed after `timeout` seconds.

    A decoder stuck inside FFmpeg cannot be interrupted from Python, and an abandoned thread would
    go on decoding and allocating; a killed process stops. The caller sees
    SampleError("decode_timeout") (a decoder that crashed or ran out of its DECODE_MEMORY:
    "decode_error") and moves on, so one bad file cannot stall training. timeout=None calls the
    function directly, in this process.
    """

    def __init__(self, timeout: float | None, memory: int | None = DECODE_MEMORY):
        if timeout is not None and not timeout > 0:
            raise ValueError(f"decode timeout must be > 0 seconds or None, got {timeout!r}")
        self.timeout = timeout
        self.memory = memory
        self._call = None if timeout is None else IsolatedCall(timeout, memory)

    def __call__(self, fn, *args):
        if self._call is None:
            return fn(*args)
        try:
            return self._call(fn, *args)
        except CallTimedOut:
            raise SampleError("decode_timeout", f"decoding took longer than {self.timeout:g} s; "
                              "its process was killed") from None
        except CallDied as exc:
            raise SampleError("decode_error", f"the decode process died: {exc}") from None
        except MemoryError:
            raise SampleError("too_large", f"decoding needed more than {self.memory} more bytes") from None
