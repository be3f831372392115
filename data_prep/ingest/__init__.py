"""Videos + captions -> dit-video shards, a manifest of every sample and a drop report.

    python -m data_prep.ingest --folder raw/ --out data/mine                    # a.mp4 + a.txt (+ a.json)
    python -m data_prep.ingest --list clips.csv --out data/mine                 # path,caption[,start,end,license]
    python -m data_prep.ingest --list clips.jsonl --out data/mine               # same fields, one object a line
    python -m data_prep.ingest --shards 'v2d/{00000..00009}.tar' --out data/mine  # video2dataset {key}.mp4/.txt/.json

Steps, per source video (see `IngestConfig` for every option and its default):
  1. probe (PyAV): fps, frames, size, duration, codec; sha256 of the source bytes; frames above
     --max-source-pixels (and, with --split none, a source longer than --max-duration) are
     dropped here, before anything is decoded
  2. filter the source: caption (missing, length, blocklist), resolution, aspect ratio
  3. decode a frame at a time (optionally a [start, end) window, at most --max-frames), dropping
     frames above --max-fps; 32x32 thumbnails give the scene cuts and the motion score
  4. split: at scene cuts (--split scene; built in, or PySceneDetect with
     --scene-detector pyscenedetect), into fixed --clip-seconds pieces (--split fixed), both
     (--split scene+fixed), or not at all (--split none)
  5. filter each clip: duration, motion; decode again, downscaling above --max-size, straight into
     an H.264 encoder per kept clip (or copy the source bytes when nothing changed and every frame
     decoded) and write it with its metadata into shards of --shard-size clips
Steps 1 and 3-5 run in a child process killed after --decode-timeout seconds (decode_timeout).
Every dropped source or clip is counted by reason in report.json, next to the thresholds used,
so a run can say exactly what it trained on and what it left out and why.

Output (OUT/): {prefix}-{unit:05d}-{k:06d}.tar shards; the manifest, one row per sample (shard, key
and its metadata) as manifest.jsonl and/or manifest.parquet (--manifest-format; read either with
`read_manifest`); report.json.
Work is cut into units of --unit-size sources, processed in parallel (--workers processes);
a finished unit leaves OUT/.ingest/unit-XXXXX.json, so an interrupted run continues where it
stopped when started again with the same arguments.
"""

# Where each step lives (one job a module, in the order a source goes through them):
#   config.py    IngestConfig (every option, validated), STATE_DIR, MANIFEST_FORMATS
#   sources.py   folder / list / shards -> source dicts; load_source: bytes, caption, sidecar
#   filters.py   Drop (a reason to leave something out), check_caption, check_size, motion_score
#   decode.py    probe, stream_frames / scan_source / frames_in (a frame at a time + 32x32 thumbnails)
#   split.py     scene_cuts, pyscenedetect_cuts, segments
#   process.py   process_source, make_clips: one source -> its clips in the shard writer (steps 1-5 above)
#   units.py     run_unit, ingest: units in parallel, resume from OUT/.ingest
#   manifest.py  finish (manifest + report.json), write_parquet, read_manifest, print_report
#   cli.py       main: the flags (one per IngestConfig field); __main__.py runs it

from data_prep.ingest.cli import main
from data_prep.ingest.config import MANIFEST_FORMATS, STATE_DIR, IngestConfig
from data_prep.ingest.decode import THUMB, frames_in, probe, scan_source, stream_frames
from data_prep.ingest.filters import Drop, check_caption, check_size, motion_score
from data_prep.ingest.manifest import finish, print_report, read_manifest, write_parquet
from data_prep.ingest.process import process_source
from data_prep.ingest.sources import load_source, sources_from_folder, sources_from_list, sources_from_shards
from data_prep.ingest.split import pyscenedetect_cuts, scene_cuts, segments
from data_prep.ingest.units import ingest, run_unit

__all__ = [
    "MANIFEST_FORMATS", "STATE_DIR", "THUMB", "Drop", "IngestConfig", "check_caption", "check_size",
    "finish", "frames_in", "ingest", "load_source", "main", "motion_score", "print_report", "probe",
    "process_source", "pyscenedetect_cuts", "read_manifest", "run_unit", "scan_source", "scene_cuts", "segments",
    "sources_from_folder", "sources_from_list", "sources_from_shards", "stream_frames", "write_parquet",
]
