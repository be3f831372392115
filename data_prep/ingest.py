"""Videos + captions -> dit-video shards, a manifest of every sample and a drop report.

    python -m data_prep.ingest --folder raw/ --out data/mine                    # a.mp4 + a.txt (+ a.json)
    python -m data_prep.ingest --list clips.csv --out data/mine                 # path,caption[,start,end,license]
    python -m data_prep.ingest --list clips.jsonl --out data/mine               # same fields, one object a line
    python -m data_prep.ingest --shards 'v2d/{00000..00009}.tar' --out data/mine  # video2dataset {key}.mp4/.txt/.json

Steps, per source video (see `IngestConfig` for every option and its default):
  1. probe (PyAV): fps, frames, size, duration, codec; sha256 of the source bytes
  2. filter the source: caption (missing, length, blocklist), resolution, aspect ratio
  3. decode once (optionally a [start, end) window), dropping frames above --max-fps and
     downscaling above --max-size; 32x32 thumbnails give the scene cuts and the motion score
  4. split: at scene cuts (--split scene; built in, or PySceneDetect with
     --scene-detector pyscenedetect), into fixed --clip-seconds pieces (--split fixed), both
     (--split scene+fixed), or not at all (--split none)
  5. filter each clip: duration, motion; re-encode it to H.264 (or copy the source bytes when
     nothing changed) and write it with its metadata into shards of --shard-size clips
Every dropped source or clip is counted by reason in report.json, next to the thresholds used,
so a run can say exactly what it trained on and what it left out and why.

Output (OUT/): {prefix}-{unit:05d}-{k:06d}.tar shards; the manifest, one row per sample (shard, key
and its metadata) as manifest.jsonl and/or manifest.parquet (--manifest-format; read either with
`read_manifest`); report.json.
Work is cut into units of --unit-size sources, processed in parallel (--workers processes);
a finished unit leaves OUT/.ingest/unit-XXXXX.json, so an interrupted run continues where it
stopped when started again with the same arguments.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np

from dit_video.data.index import VIDEO_EXTS, MemberReader, build_index
from dit_video.data.shards import ShardWriter, encode_mp4

STATE_DIR = ".ingest"
MANIFEST_FORMATS = ("auto", "jsonl", "parquet", "both")
THUMB = 32  # thumbnails for scene cuts and motion: 32x32 RGB, values 0-255


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
    max_size: int | None = None  # downscale so the short side is at most this many pixels (None = keep)
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
    caption_blocklist: list[str] = field(default_factory=list)  # words (case-insensitive) that drop a caption
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
        if self.manifest_format not in MANIFEST_FORMATS:
            raise ValueError(f"--manifest-format: use one of {', '.join(MANIFEST_FORMATS)}, got {self.manifest_format!r}")
        if self.manifest_format in ("parquet", "both") and not _have_pyarrow():
            raise ValueError(f"--manifest-format {self.manifest_format} needs pyarrow: pip install 'dit-video[parquet]' "
                             "(or use --manifest-format jsonl)")


# ---------------------------------------------------------------------------------- sources


def _safe_id(name: str, unique: str) -> str:
    """A shard-safe key stem: the readable name, plus a short hash of what makes it unique."""
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", name)[:60] or "video"
    return f"{stem}-{hashlib.sha1(unique.encode()).hexdigest()[:8]}"


def sources_from_folder(folder: str) -> list[dict]:
    """Videos under `folder` (recursively) with captions from {stem}.txt and optional {stem}.json."""
    out = []
    for path in sorted(Path(folder).rglob("*")):
        if path.suffix.lower().lstrip(".") not in VIDEO_EXTS or not path.is_file():
            continue
        src = {"id": _safe_id(path.stem, str(path)), "path": str(path), "source": str(path)}
        txt, meta = path.with_suffix(".txt"), path.with_suffix(".json")
        if txt.is_file():
            src["caption"] = txt.read_text(encoding="utf-8", errors="replace")
        if meta.is_file():
            src["sidecar_json"] = meta.read_text(encoding="utf-8", errors="replace")
        out.append(src)
    return out


def sources_from_list(list_path: str) -> list[dict]:
    """Rows of a CSV (header: path,caption[,start,end,license]) or JSONL file with the same fields.
    Relative paths are relative to the list file. Unreadable rows become {"error": ...} sources."""
    base = Path(list_path).parent
    rows: list[dict | str] = []
    if list_path.endswith((".jsonl", ".json")):
        for line in Path(list_path).read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    row = json.loads(line)
                    rows.append(row if isinstance(row, dict) else f"not an object: {line[:80]}")
                except json.JSONDecodeError as exn:
                    rows.append(f"bad JSON: {exn}")
    else:
        with open(list_path, newline="", encoding="utf-8") as f:
            rows.extend(csv.DictReader(f))
    out = []
    for i, row in enumerate(rows):
        if isinstance(row, str) or not row.get("path"):
            out.append({"id": f"row{i:06d}", "error": "bad_row", "detail": row if isinstance(row, str) else "no path"})
            continue
        path = Path(row["path"]) if os.path.isabs(row["path"]) else base / row["path"]
        src = {"id": _safe_id(path.stem, f"{path}|{i}"), "path": str(path), "source": row.get("url") or str(path)}
        if row.get("caption"):
            src["caption"] = str(row["caption"])
        for name in ("start", "end"):
            if row.get(name) not in (None, ""):
                try:
                    src[name] = float(row[name])
                except ValueError:
                    src.update(error="bad_row", detail=f"{name}={row[name]!r} is not a number")
        if row.get("license"):
            src["license"] = str(row["license"])
        out.append(src)
    return out


def sources_from_shards(shards: list[str]) -> list[dict]:
    """Samples of video2dataset-style shards ({key}.mp4/.txt/.json), read later by offset."""
    index = build_index(shards)
    out = []
    for ref in index.samples:
        ext = next((e for e in VIDEO_EXTS if e in ref.members), None)
        if ext is None:
            continue
        shard = index.shards[ref.shard]
        src = {"id": _safe_id(ref.key.replace("/", "_"), f"{shard}|{ref.key}"), "shard": shard,
               "members": {e: list(v) for e, v in ref.members.items()}, "video_ext": ext,
               "source": f"{shard}#{ref.key}"}
        out.append(src)
    skipped = [{"id": f"index{i:06d}", "error": reason, "detail": "found while indexing the input shards"}
               for reason, n in index.skipped_by_reason.items() for i in range(n)]
    return out + skipped


# ---------------------------------------------------------------------------------- one source


class Drop(Exception):
    """A source or clip is left out; `reason` is the label it is counted under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _load_source(src: dict) -> tuple[bytes, str | None, dict]:
    """(video bytes, caption or None, extra metadata) of a source."""
    if "error" in src:
        raise Drop(src["error"], str(src.get("detail", "")))
    meta: dict = {}
    caption = src.get("caption")
    if "shard" in src:
        from dit_video.data.index import SampleRef

        ref = SampleRef(0, src["id"], {e: tuple(v) for e, v in src["members"].items()})
        reader = MemberReader([src["shard"]])
        try:
            raw = reader.read(ref)
        finally:
            reader.close()
        data = raw[src["video_ext"]]
        if "txt" in raw:
            caption = raw["txt"].decode("utf-8", errors="replace")
        sidecar = raw.get("json")
    else:
        try:
            data = Path(src["path"]).read_bytes()
        except OSError as exn:
            raise Drop("missing_file", f"{src['path']}: {exn.strerror}") from None
        sidecar = src.get("sidecar_json")
        sidecar = sidecar.encode() if isinstance(sidecar, str) else sidecar
    if sidecar is not None:
        try:
            meta = json.loads(sidecar.decode("utf-8") if isinstance(sidecar, bytes) else sidecar)
        except (UnicodeDecodeError, json.JSONDecodeError) as exn:
            raise Drop("bad_json", str(exn)[:200]) from None
        if not isinstance(meta, dict):
            raise Drop("bad_json", f"metadata is a {type(meta).__name__}, not an object")
    if len(data) == 0:
        raise Drop("decode_error", "zero-byte video")
    return data, caption, meta


def check_caption(caption: str | None, cfg: IngestConfig) -> str:
    if caption is None or not caption.strip():
        raise Drop("missing_caption")
    caption = " ".join(caption.split())
    if len(caption.split()) < cfg.min_caption_words:
        raise Drop("caption_too_short", f"{len(caption.split())} words < {cfg.min_caption_words}")
    if len(caption) > cfg.max_caption_chars:
        raise Drop("caption_too_long", f"{len(caption)} characters > {cfg.max_caption_chars}")
    words = {w.strip(".,;:!?\"'()").lower() for w in caption.split()}
    blocked = sorted(words & {b.lower() for b in cfg.caption_blocklist})
    if blocked:
        raise Drop("caption_blocklist", f"contains {blocked}")
    return caption


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


def scene_cuts(thumbs: np.ndarray, cfg: IngestConfig) -> list[int]:
    """Frame indices where a new scene starts (builtin detector).

    A cut is a peak of the mean |thumbnail difference| above the threshold that is the largest
    within min_scene_frames on either side, so fast motion just before a hard cut cannot claim
    the cut's place (a greedy first-above-threshold rule would)."""
    diffs = np.abs(np.diff(thumbs, axis=0)).mean(axis=(1, 2, 3))  # [T - 1]; diffs[i - 1]: frame i vs i - 1
    m = cfg.min_scene_frames
    cuts: list[int] = []
    for i in np.argsort(-diffs, kind="stable"):  # strongest first
        frame = int(i) + 1
        if diffs[i] <= cfg.scene_threshold:
            break
        if all(abs(frame - c) >= m for c in cuts):
            cuts.append(frame)
    return sorted(cuts)


def pyscenedetect_cuts(data: bytes, times: np.ndarray) -> list[int]:
    """Scene starts from PySceneDetect's ContentDetector, mapped onto our (fps-reduced) frames."""
    import tempfile

    from scenedetect import ContentDetector, detect

    with tempfile.NamedTemporaryFile(suffix=".mp4") as f:
        f.write(data)
        f.flush()
        scenes = detect(f.name, ContentDetector())
    starts = [s.seconds if hasattr(s, "seconds") else s.get_seconds() for s, _ in scenes[1:]]  # 0.7 renamed it
    return sorted({int(np.searchsorted(times, t)) for t in starts} - {0, len(times)})


def segments(num: int, fps: float, cuts: list[int], cfg: IngestConfig) -> list[tuple[int, int]]:
    """[(first, end)) frame ranges: scenes (cut at `cuts`), each cut into fixed pieces if asked."""
    bounds = [0, *cuts, num] if "scene" in cfg.split else [0, num]
    out = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        if "fixed" in cfg.split:
            step = max(1, int(round(cfg.clip_seconds * fps)))
            out.extend((s, min(s + step, b)) for s in range(a, b, step))
        else:
            out.append((a, b))
    return out


def motion_score(thumbs: np.ndarray) -> float:
    """Mean |difference| of consecutive 32x32 thumbnails (0-255): ~0 for a still, > 2 for motion."""
    return float(np.abs(np.diff(thumbs, axis=0)).mean()) if len(thumbs) > 1 else 0.0


def process_source(src: dict, cfg: IngestConfig, writer: ShardWriter, drops: Counter) -> list[dict]:
    """Ingest one source; returns its manifest rows (one per clip written), counts drops."""
    try:
        data, caption, side_meta = _load_source(src)
        caption = check_caption(caption, cfg)
        info = probe(data)
        short = min(info["width"], info["height"])
        if short < cfg.min_resolution:
            raise Drop("low_resolution", f"short side {short} < {cfg.min_resolution}")
        aspect = info["width"] / info["height"]
        if not cfg.min_aspect <= aspect <= cfg.max_aspect:
            raise Drop("bad_aspect", f"aspect {aspect:.3f} outside [{cfg.min_aspect}, {cfg.max_aspect}]")
        frames, thumbs, times, fps = decode_frames(data, info, cfg, src.get("start"), src.get("end"))
    except Drop as drop:
        drops[drop.reason] += 1
        return []
    sha = hashlib.sha256(data).hexdigest()
    cuts = []
    if "scene" in cfg.split:
        cuts = pyscenedetect_cuts(data, times) if cfg.scene_detector == "pyscenedetect" else scene_cuts(thumbs, cfg)
    pieces = segments(len(frames), fps, cuts, cfg)
    untouched = (len(pieces) == 1 and src.get("start") is None and src.get("end") is None and cfg.reencode == "auto"
                 and info["codec"] == "h264" and "mp4" in info["container"] and frames.shape[1:3] == (info["height"], info["width"])
                 and abs(fps - info["fps"]) < 1e-6)
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


# ---------------------------------------------------------------------------------- units


def run_unit(unit: int, sources: list[dict], cfg: IngestConfig) -> dict:
    """Ingest one unit of sources into its own shards; returns (and saves) its state."""
    out = Path(cfg.out)
    drops: Counter = Counter()
    rows = []
    with ShardWriter(out, prefix=f"{cfg.prefix}-{unit:05d}", max_count=cfg.shard_size,
                     max_bytes=cfg.shard_bytes) as writer:
        for src in sources:
            new = process_source(src, cfg, writer, drops)
            for row in new:
                row["shard"] = f"{cfg.prefix}-{unit:05d}-{len(writer.shards):06d}.tar"
            rows.extend(new)
    state = {"unit": unit, "sources": len(sources), "rows": rows, "dropped_by_reason": dict(drops),
             "shards": [p.name for p in writer.shards]}
    path = out / STATE_DIR / f"unit-{unit:05d}.json"
    tmp = path.with_suffix(".json.partial")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)  # the unit counts as done only once its state is complete
    return state


def ingest(sources: list[dict], cfg: IngestConfig, progress: bool = False) -> dict:
    """Run (or continue) an ingest; writes the manifest and report; returns the report."""
    cfg.validate()
    out = Path(cfg.out)
    (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    units = [sources[i:i + cfg.unit_size] for i in range(0, len(sources), cfg.unit_size)]
    done = {int(p.stem.split("-")[1]) for p in (out / STATE_DIR).glob("unit-*.json")}
    todo = [u for u in range(len(units)) if u not in done]
    start = time.perf_counter()
    bar = _progress(progress, len(units), len(done))
    with bar:
        task = bar.add_task("ingest", total=len(units), completed=len(done)) if bar else None
        if cfg.workers == 1 or len(todo) <= 1:
            for u in todo:
                run_unit(u, units[u], cfg)
                if bar:
                    bar.advance(task)
        else:
            with ProcessPoolExecutor(max_workers=cfg.workers) as pool:
                futures = [pool.submit(run_unit, u, units[u], cfg) for u in todo]
                for fut in as_completed(futures):
                    fut.result()
                    if bar:
                        bar.advance(task)
    return finish(cfg, len(units), len(done), time.perf_counter() - start)


class _NoBar:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False

    def __bool__(self):
        return False


def _progress(enabled: bool, total: int, done: int):
    if not enabled:
        return _NoBar()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())


def finish(cfg: IngestConfig, num_units: int, resumed_units: int, seconds: float) -> dict:
    """Merge unit states into manifest.jsonl (+ .parquet) and report.json."""
    out = Path(cfg.out)
    states = [json.loads((out / STATE_DIR / f"unit-{u:05d}.json").read_text()) for u in range(num_units)]
    rows = [row for s in states for row in s["rows"]]
    drops: Counter = Counter()
    for s in states:
        drops.update(s["dropped_by_reason"])
    fmt = cfg.manifest_format
    if fmt == "auto":
        fmt = "both" if _have_pyarrow() else "jsonl"
    written = []
    if fmt in ("jsonl", "both"):
        _write_atomic(out / "manifest.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        written.append("manifest.jsonl")
    if fmt in ("parquet", "both"):
        write_parquet(rows, out / "manifest.parquet")
        written.append("manifest.parquet")
    report = {
        "sources": sum(s["sources"] for s in states),
        "clips_written": len(rows),
        "dropped_by_reason": dict(sorted(drops.items())),
        "dropped_total": sum(drops.values()),
        "shards": sorted(name for s in states for name in s["shards"]),
        "units": num_units, "units_resumed": resumed_units, "seconds": round(seconds, 2),
        "manifest": written,
        "config": dataclasses.asdict(cfg),
    }
    report["config"]["max_aspect"] = None if math.isinf(cfg.max_aspect) else cfg.max_aspect  # JSON has no inf
    _write_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
    return report


def _have_pyarrow() -> bool:
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return False
    return True


def write_parquet(rows: list[dict], path: Path) -> None:
    """manifest.parquet (pyarrow): one row per sample, one column per field (absent fields are null)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = path.with_name(path.name + ".partial")
    pq.write_table(pa.Table.from_pylist(rows), str(tmp))
    os.replace(tmp, path)  # like the JSONL: a reader never sees half a manifest


def read_manifest(path: str | Path) -> list[dict]:
    """Rows of a manifest.jsonl or manifest.parquet (by suffix). Parquet stores every column for
    every row, so fields a row did not have come back as None."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(str(path)).to_pylist()
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"ingest: {report['clips_written']} clips from {report['sources']} sources")
    table.add_column("dropped because")
    table.add_column("count", justify="right")
    for reason, n in report["dropped_by_reason"].items():
        table.add_row(reason, str(n))
    Console(stderr=True).print(table)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--folder", help="folder of videos with sidecar {stem}.txt captions")
    src.add_argument("--list", help="CSV or JSONL of path,caption[,start,end,license]")
    src.add_argument("--shards", nargs="+", help="video2dataset-style tar shards (globs/braces)")
    defaults = IngestConfig()
    for f in dataclasses.fields(IngestConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if f.name == "caption_blocklist":
            parser.add_argument(flag, nargs="*", default=[], help="words that drop a caption")
        elif f.name == "out":
            parser.add_argument(flag, required=True, help="output directory")
        else:
            kind = {"int": int, "float": float}.get(type(default).__name__, str)
            if f.name in ("max_size", "shard_bytes"):
                kind = int
            elif f.name in ("max_fps", "max_duration"):
                kind = float
            parser.add_argument(flag, type=kind, default=default, help=f"(default {default})")
    args = parser.parse_args(argv)
    cfg = IngestConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(IngestConfig)})
    if args.folder:
        sources = sources_from_folder(args.folder)
    elif args.list:
        sources = sources_from_list(args.list)
    else:
        from dit_video.data.config import resolve_shards

        sources = sources_from_shards(resolve_shards(args.shards, field="--shards"))
    report = ingest(sources, cfg, progress=sys.stderr.isatty())
    print_report(report)
    print(f"wrote {report['clips_written']} clips in {len(report['shards'])} shards to {cfg.out} "
          f"(dropped {report['dropped_total']}; see report.json)")
    return report


if __name__ == "__main__":
    main()
