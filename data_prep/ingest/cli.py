"""The command line: one flag per IngestConfig field (same name, dashes), plus the input form.
Run as `python -m data_prep.ingest`; the usage text is the package docstring."""

from __future__ import annotations

import argparse
import dataclasses
import sys

import data_prep.ingest as package
from data_prep.ingest.config import IngestConfig
from data_prep.ingest.manifest import print_report
from data_prep.ingest.sources import sources_from_folder, sources_from_list, sources_from_shards
from data_prep.ingest.units import ingest
from dit_video.data.config import resolve_shards


def main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    """Parse `argv` (default sys.argv[1:]), run the ingest, print the report; returns the report.
    `prog` names the program in the usage line (default: argparse's, from sys.argv[0])."""
    parser = argparse.ArgumentParser(prog=prog, description=package.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--folder", help="folder of videos with sidecar {stem}.txt captions")
    src.add_argument("--list", help="CSV or JSONL of path,caption[,start,end,license]")
    src.add_argument("--shards", nargs="+", help="video2dataset-style tar shards (globs/braces)")
    defaults = IngestConfig()
    for f in dataclasses.fields(IngestConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if f.name == "caption_blocklist":
            parser.add_argument(flag, nargs="*", default=[], help="words or quoted phrases that drop a caption (matched like the prompt filter)")
        elif f.name == "out":
            parser.add_argument(flag, required=True, help="output directory")
        else:
            kind = {"int": int, "float": float}.get(type(default).__name__, str)
            if f.name in ("max_size", "shard_bytes"):
                kind = int
            elif f.name in ("max_fps", "max_duration", "decode_timeout"):
                kind = float
            parser.add_argument(flag, type=kind, default=default, help=f"(default {default})")
    args = parser.parse_args(argv)
    cfg = IngestConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(IngestConfig)})
    if args.folder:
        sources = sources_from_folder(args.folder)
    elif args.list:
        sources = sources_from_list(args.list)
    else:
        sources = sources_from_shards(resolve_shards(args.shards, field="--shards"))
    report = ingest(sources, cfg, progress=sys.stderr.isatty())
    print_report(report)
    print(f"wrote {report['clips_written']} clips in {len(report['shards'])} shards to {cfg.out} "
          f"(dropped {report['dropped_total']}; see report.json)")
    return report

