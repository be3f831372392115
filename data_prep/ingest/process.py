"""One source video -> its clips in the shard writer: read, filter, decode, split, filter, encode.

The steps are numbered as in the package docstring; every way out before a clip is written is
counted in `drops` under the reason report.json lists.

Probing, decoding and encoding run in a child process (dit_video.data.isolate) that is killed
after --decode-timeout seconds and may not grow by more than SOURCE_MEMORY: a source that hangs
the decoder or asks for more memory is a counted drop, and the work on it really stops. The
source is decoded twice, a frame at a time: first for thumbnails (scene cuts, motion, every
filter), then, for the clips that are kept, straight into their encoders.
"""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np

from data_prep.ingest.config import IngestConfig
from data_prep.ingest.decode import frames_in, probe, scan_source, target_size
from data_prep.ingest.filters import Drop, check_caption, check_size, motion_score
from data_prep.ingest.sources import load_source
from data_prep.ingest.split import pyscenedetect_cuts, scene_cuts, segments
from dit_video.data.isolate import CallDied, CallTimedOut, IsolatedCall
from dit_video.data.shards import Mp4Encoder, ShardWriter

# Address space the per-source process may add: a 4096 x 4096 source's decoder with its reference
# frames and threads, one output frame, the encoder and the encoded clips, with room to spare.
SOURCE_MEMORY = 6 << 30

_isolated: dict[tuple[float, int], IsolatedCall] = {}  # one child per (timeout, memory) in this process


def process_source(src: dict, cfg: IngestConfig, writer: ShardWriter, drops: Counter) -> list[dict]:
    """Ingest one source; returns its manifest rows (one per clip written), counts drops."""
    try:
        # 1.-2. read and filter the source (the caption first: it costs no decoding)
        data, caption, side_meta = load_source(src)
        caption = check_caption(caption, cfg)
        call = _isolated.setdefault((cfg.decode_timeout, SOURCE_MEMORY), IsolatedCall(cfg.decode_timeout, SOURCE_MEMORY))
        try:
            clips, clip_drops, info = call(make_clips, data, src.get("start"), src.get("end"), cfg)
        except CallTimedOut:
            raise Drop("decode_timeout", f"took longer than --decode-timeout {cfg.decode_timeout:g} s") from None
        except (CallDied, MemoryError) as exn:
            raise Drop("too_large", f"the decode needed more than {SOURCE_MEMORY >> 30} GiB ({exn})") from None
    except Drop as drop:
        drops[drop.reason] += 1
        return []
    drops.update(clip_drops)
    sha = hashlib.sha256(data).hexdigest()
    rows = []
    for n, clip in enumerate(clips):
        if clip is None:
            continue  # dropped by a clip filter (counted)
        mp4, meta, (frames, width, height, fps) = clip
        key = f"{src['id']}_{n:03d}"
        meta = {**meta, "source_sha256": sha, "source": side_meta.get("url") or src["source"],
                "license": src.get("license") or side_meta.get("license") or cfg.license}
        writer.write(key, mp4, caption, fps=fps, frames=frames, width=width, height=height,
                     source=meta.pop("source"), **meta)
        rows.append({"key": key, "shard": None, "caption": caption, **writer.last_meta})
    return rows


def make_clips(data: bytes, start: float | None, end: float | None, cfg: IngestConfig):
    """Steps 1 and 3-5 on the source bytes (in the child process): ([clip or None per piece],
    clip drops, probe info). A clip is (mp4 bytes, metadata, (frames, width, height, fps))."""
    # 1. probe: size and (when a whole source must fit --max-duration) length, before decoding
    info = probe(data, cfg)
    check_size(info, cfg)
    whole = cfg.split == "none" and start is None and end is None
    if whole and cfg.max_duration is not None and info["duration"] > cfg.max_duration + 1e-6:
        raise Drop("too_long", f"source is {info['duration']:.1f} s > --max-duration {cfg.max_duration}")
    # 3. first pass: thumbnails of every kept frame
    scan = scan_source(data, info, cfg, start, end)
    fps, times, thumbs = scan.fps, scan.times, scan.thumbs
    width, height = target_size(info["width"], info["height"], cfg.max_size)
    # 4. split
    cuts = []
    if "scene" in cfg.split:
        cuts = pyscenedetect_cuts(data, times) if cfg.scene_detector == "pyscenedetect" else scene_cuts(thumbs, cfg)
    pieces = segments(len(times), fps, cuts, cfg)
    # 5. filter each clip; the source bytes are the clip only if nothing about them would change and
    # they decoded completely (a truncated source is re-encoded from the frames that decode)
    untouched = (len(pieces) == 1 and start is None and end is None and cfg.reencode == "auto"
                 and info["codec"] == "h264" and "mp4" in info["container"] and (width, height) == (info["width"], info["height"])
                 and abs(fps - info["fps"]) < 1e-6 and scan.complete and not scan.capped
                 and info["frames"] in (0, len(times)))
    drops: Counter = Counter()
    kept: list[tuple[int, int, float] | None] = []
    for a, b in pieces:
        duration = (b - a) / fps
        motion = motion_score(thumbs[a:b])
        if duration < cfg.min_duration:
            drops["too_short"] += 1
        elif cfg.max_duration is not None and duration > cfg.max_duration:
            drops["too_long"] += 1
        elif motion < cfg.min_motion:
            drops["low_motion"] += 1
        else:
            kept.append((a, b, motion))
            continue
        kept.append(None)
    # 5. second pass, for the kept clips only: frames straight into their encoders
    encoded = {} if untouched else _encode(data, info, cfg, start, end, (width, height), fps,
                                           [k for k in kept if k is not None])
    clips = []
    for piece in kept:
        if piece is None:
            clips.append(None)
            continue
        a, b, motion = piece
        mp4 = data if untouched else encoded[a]
        meta = {
            "duration": round((b - a) / fps, 4), "codec": "h264" if not untouched else info["codec"],
            "start": round(float(times[a]), 4), "end": round(float(times[b - 1]) + 1.0 / fps, 4),
            "motion": round(motion, 3), "source_fps": info["fps"], "source_width": info["width"],
            "source_height": info["height"], "source_codec": info["codec"], "reencoded": not untouched,
        }
        clips.append((mp4, meta, (b - a, width, height, fps)))
    return clips, drops, info


def _encode(data: bytes, info: dict, cfg: IngestConfig, start, end, size: tuple[int, int], fps: float,
            pieces: list[tuple[int, int, float]]) -> dict[int, bytes]:
    """{first frame: mp4 bytes} of each (first, end) piece, decoding the source once more and never
    holding more than one frame of it."""
    if not pieces:
        return {}
    out, current, ends = {}, None, {a: b for a, b, _ in pieces}
    last = max(b for _, b, _ in pieces)
    for i, frame in enumerate(frames_in(data, info, cfg, start, end, size, last)):
        if current is None and i in ends:
            current = (i, Mp4Encoder(size[0], size[1], fps, cfg.crf))
        if current is not None:
            current[1].add(np.ascontiguousarray(frame)[None])  # [1, h, w, 3]
            if i + 1 == ends[current[0]]:
                out[current[0]] = current[1].finish()
                current = None
    if current is not None:  # the second pass decoded fewer frames than the first: never for the same bytes
        out[current[0]] = current[1].finish()
    missing = [a for a, _, _ in pieces if a not in out]
    if missing:
        raise Drop("decode_error", f"the second decode ended before frame {min(missing)}")
    return out
