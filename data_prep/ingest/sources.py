"""Where videos come from: a folder, a CSV/JSONL list or video2dataset shards -> source dicts,
and the bytes, caption and sidecar metadata one source points at.

A source is a plain dict (it crosses process boundaries): "id" (the shard-safe key stem),
"source" (what the manifest records) and either "path" or "shard" + "members" + "video_ext"; optional
"caption", "sidecar_json", "start", "end", "license"; or "error" + "detail" for a row that
could not be read, so it is counted in the report instead of failing the run.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from pathlib import Path

from data_prep.ingest.filters import Drop
from dit_video.data.index import VIDEO_EXTS, MemberReader, SampleRef, build_index


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
    skipped = []
    for ref in index.samples:
        ext = next((e for e in VIDEO_EXTS if e in ref.members), None)
        if ext is None:  # an image sample: ingest makes clips of videos only
            skipped.append({"id": f"image{len(skipped):06d}", "error": "missing_video",
                            "detail": f"{ref.key} has no video member ({sorted(ref.members)})"})
            continue
        shard = index.shards[ref.shard]
        src = {"id": _safe_id(ref.key.replace("/", "_"), f"{shard}|{ref.key}"), "shard": shard,
               "members": {e: list(v) for e, v in ref.members.items()}, "video_ext": ext,
               "source": f"{shard}#{ref.key}"}
        out.append(src)
    skipped += [{"id": f"index{i:06d}", "error": reason, "detail": "found while indexing the input shards"}
                for reason, n in index.skipped_by_reason.items() for i in range(n)]
    return out + skipped


def load_source(src: dict) -> tuple[bytes, str | None, dict]:
    """(video bytes, caption or None, extra metadata) of a source."""
    if "error" in src:
        raise Drop(src["error"], str(src.get("detail", "")))
    meta: dict = {}
    caption = src.get("caption")
    if "shard" in src:
        ref = SampleRef(0, src["id"], {e: tuple(v) for e, v in src["members"].items()})
        reader = MemberReader([src["shard"]])
        try:
            raw = reader.read(ref)
        except EOFError as exn:
            raise Drop("shard_changed", f"{exn}; was the shard rewritten after it was indexed?") from None
        except OSError as exn:
            raise Drop("bad_tar", f"{src['shard']}: {exn}") from None
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
        # ValueError: also an integer literal past Python's digit limit; RecursionError: deep nesting
        except (ValueError, RecursionError) as exn:
            raise Drop("bad_json", f"{type(exn).__name__}: {str(exn)[:200]}") from None
        if not isinstance(meta, dict):
            raise Drop("bad_json", f"metadata is a {type(meta).__name__}, not an object")
    if len(data) == 0:
        raise Drop("decode_error", "zero-byte video")
    return data, caption, meta
