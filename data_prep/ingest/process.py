"""One source video -> its clips in the shard writer: read, filter, decode, split, filter, encode.

The steps are numbered as in the package docstring; every way out before a clip is written is
counted in `drops` under the reason report.json lists.
"""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np

from data_prep.ingest.config import IngestConfig
from data_prep.ingest.decode import decode_frames, probe
from data_prep.ingest.filters import Drop, check_caption, check_size, motion_score
from data_prep.ingest.sources import load_source
from data_prep.ingest.split import pyscenedetect_cuts, scene_cuts, segments
from dit_video.data.shards import ShardWriter, encode_mp4


def process_source(src: dict, cfg: IngestConfig, writer: ShardWriter, drops: Counter) -> list[dict]:
    """Ingest one source; returns its manifest rows (one per clip written), counts drops."""
    try:
        # 1.-3. read, filter and probe the source (the caption first: it costs no decoding), decode it once
        data, caption, side_meta = load_source(src)
        caption = check_caption(caption, cfg)
        info = probe(data)
        check_size(info, cfg)
        frames, thumbs, times, fps = decode_frames(data, info, cfg, src.get("start"), src.get("end"))
    except Drop as drop:
        drops[drop.reason] += 1
        return []
    sha = hashlib.sha256(data).hexdigest()
    # 4. split
    cuts = []
    if "scene" in cfg.split:
        cuts = pyscenedetect_cuts(data, times) if cfg.scene_detector == "pyscenedetect" else scene_cuts(thumbs, cfg)
    pieces = segments(len(frames), fps, cuts, cfg)
    # the source bytes can be copied as the clip only if nothing about them would change
    untouched = (len(pieces) == 1 and src.get("start") is None and src.get("end") is None and cfg.reencode == "auto"
                 and info["codec"] == "h264" and "mp4" in info["container"] and frames.shape[1:3] == (info["height"], info["width"])
                 and abs(fps - info["fps"]) < 1e-6)
    # 5. filter each clip, encode and write it
    rows = []
    for n, (a, b) in enumerate(pieces):
        duration = (b - a) / fps
        if duration < cfg.min_duration:
            drops["too_short"] += 1
            continue
        if cfg.max_duration is not None and duration > cfg.max_duration:
            drops["too_long"] += 1
            continue
        motion = motion_score(thumbs[a:b])
        if motion < cfg.min_motion:
            drops["low_motion"] += 1
            continue
        mp4 = data if untouched else encode_mp4(np.ascontiguousarray(frames[a:b]), fps, crf=cfg.crf)
        key = f"{src['id']}_{n:03d}"
        meta = {
            "duration": round(duration, 4), "codec": "h264" if not untouched else info["codec"],
            "source_sha256": sha, "source": side_meta.get("url") or src["source"],
            "license": src.get("license") or side_meta.get("license") or cfg.license,
            "start": round(float(times[a]), 4), "end": round(float(times[b - 1]) + 1.0 / fps, 4),
            "motion": round(motion, 3), "source_fps": info["fps"], "source_width": info["width"],
            "source_height": info["height"], "source_codec": info["codec"], "reencoded": not untouched,
        }
        writer.write(key, mp4, caption, fps=fps, frames=b - a, width=frames.shape[2], height=frames.shape[1],
                     source=meta.pop("source"), **meta)
        rows.append({"key": key, "shard": None, "caption": caption, **writer.last_meta})
    return rows
