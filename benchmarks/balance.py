"""Rank balance of the epoch plan on a realistic clip mix: today's order vs data.balance.

    python benchmarks/balance.py [--clips 120000] [--seed 0] [--worlds 8 64 512]

Plans one epoch of a synthetic manifest (no video is decoded: only each sample's metadata, which
is all the plan reads) at world sizes 8, 64 and 512, in two settings:
  dit_256  conf/data/webvid_256_buckets.yaml (33/17-frame and 1-frame buckets at ~256^2, fps 16)
  720p     a 720p-like bucket set (below: 121/81/49 frames at 720p in three aspects, 480p, images)
each with bucket batches and with token-budget packs (data.packing; max_tokens: the dit_256 bucket
batch, 4 x 2304 tokens, and two of the longest 720p clips, 2 x 111600: with room for one, the many
81-frame clips (75600 tokens) leave more room than the set's short clips can fill, >= 6% empty for
any packer). Model: conf/model/dit_1b.yaml with 16 latent channels, a 4096-d text encoder with 226
tokens (T5-XXL), a causal 4x8x8 VAE and (1, 2, 2) patches; clip costs are its training FLOPs
(dit_video.data.balance.CostModel).

The manifest (--clips samples, fixed by --seed), a long-tailed mix like open video sets
(WebVid, Panda-70M, OpenVid, InternVid: mostly 16:9 clips of a few seconds, a long tail of long
clips, a share of portrait phone video, images for joint training):
  images 10%, videos 90%
  video duration  lognormal, median 6 s, sigma 1.0 (log space), clipped to [0.3, 300] s
                  (mean ~10 s; ~19% shorter than 2.5 s, ~5% longer than 30 s)
  video fps       24 (35%), 25 (20%), 30 (40%), 60 (5%)
  video aspect    16:9 (60%), 9:16 (15%), 4:3 (10%), 1:1 (7%), 21:9 (5%), 3:4 (3%)
  video short side 2160 (5%), 1080 (35%), 720 (30%), 480 (18%), 360 (12%) pixels
  image aspect    4:3 (30%), 3:2 (25%), 16:9 (15%), 1:1 (15%), 2:3 (10%), 9:16 (5%)
  image short side lognormal, median 900 px, sigma 0.5, clipped to [256, 4000]
A sample goes to its bucket by dit_video.data.buckets.assign_bucket (as the loader does); one that
fits none (too short, too small) is not planned.

Per (setting, batching, world size), for today's plan and the balanced one side by side, over one
epoch (seed 0, epoch 0):
  today      order.py's order of order.epoch_batches (buckets) or packing.pack_epoch packs (fit:
             first, open_packs 8: the defaults)
  balanced   balance.balanced_order (data.balance: true) of the same bucket batches ("buckets"), of
             the same packs ("packs"), or of packing.pack_epoch_decreasing packs ("packs/dec":
             data.packing.fit: decreasing, which also fills packs fuller)
  imbalance  max over ranks of the step's cost / mean over ranks - 1, averaged over steps
  idle       share of rank time spent waiting for the slowest rank: 1 - sum(mean) / sum(max)
  pad        token slots of the batches computed without a clip / all slots (a pack short of
             max_tokens; bucket batches are full): what a padded, fixed-shape batch throws away
  moved      share of trained samples whose (step, rank) differs from today's plan
The metrics are counts, so machine load does not change them. The last line reads
`balanced imbalance <x> pad <y>` for the 64-rank dit_256 bucket case.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dit_video.build import build_dit_config  # noqa: E402
from dit_video.data.balance import CostModel, balanced_order, cost_table, unit_costs  # noqa: E402
from dit_video.data.buckets import Bucket, assign_bucket, make_buckets  # noqa: E402
from dit_video.data.order import epoch_batches  # noqa: E402
from dit_video.data.packing import pack_epoch, pack_epoch_decreasing  # noqa: E402

FPS = 16.0  # both settings sample clips at 16 fps (webvid_256.yaml; Wan trains at 16 fps)
TEXT_LEN, TEXT_DIM, LATENT_CHANNELS = 226, 4096, 16
BUCKETS_720P = [  # 4k+1 frames (4x causal VAE), sides divisible by 16 (8x VAE, 2x2 patches)
    {"num_frames": 121, "size": [720, 1280]}, {"num_frames": 121, "size": [1280, 720]},
    {"num_frames": 81, "size": [720, 1280]}, {"num_frames": 81, "size": [1280, 720]},
    {"num_frames": 81, "size": [960, 960]}, {"num_frames": 49, "size": [720, 1280]},
    {"num_frames": 121, "size": [480, 848]}, {"num_frames": 49, "size": [480, 848]},
    {"num_frames": 1, "size": [720, 1280]}, {"num_frames": 1, "size": [960, 960]},
    {"num_frames": 1, "size": [1280, 720]},
]
BUDGET_720P = 121 * 720 * 1280  # one 121-frame 720p clip per batch


def latent_shape(num_frames: int, height: int, width: int) -> tuple[int, int, int]:
    return 1 + (num_frames - 1) // 4, height // 8, width // 8  # causal 4x8x8 VAE


def manifest(n: int, seed: int) -> dict[str, np.ndarray]:
    """The synthetic mix of the module docstring: width, height, frames, fps, is_image per sample."""
    rng = np.random.default_rng(seed)
    is_image = rng.random(n) < 0.10
    duration = np.clip(np.exp(rng.normal(np.log(6.0), 1.0, n)), 0.3, 300.0)
    fps = rng.choice([24.0, 25.0, 30.0, 60.0], n, p=[0.35, 0.20, 0.40, 0.05])
    video_aspect = rng.choice([16 / 9, 9 / 16, 4 / 3, 1.0, 21 / 9, 3 / 4], n, p=[0.60, 0.15, 0.10, 0.07, 0.05, 0.03])
    video_short = rng.choice([2160, 1080, 720, 480, 360], n, p=[0.05, 0.35, 0.30, 0.18, 0.12])
    image_aspect = rng.choice([4 / 3, 3 / 2, 16 / 9, 1.0, 2 / 3, 9 / 16], n, p=[0.30, 0.25, 0.15, 0.15, 0.10, 0.05])
    image_short = np.clip(np.exp(rng.normal(np.log(900.0), 0.5, n)), 256, 4000).astype(int)
    aspect = np.where(is_image, image_aspect, video_aspect)
    short = np.where(is_image, image_short, video_short)
    # aspect = width / height: the short side is the height for landscape, the width for portrait
    height = np.where(aspect >= 1, short, np.round(short / aspect)).astype(int)
    width = np.where(aspect >= 1, np.round(short * aspect), short).astype(int)
    frames = np.where(is_image, 1, np.maximum(1, np.round(duration * fps))).astype(int)
    return {"width": width, "height": height, "frames": frames, "fps": fps, "is_image": is_image}


def assign(buckets: list[Bucket], m: dict[str, np.ndarray]) -> np.ndarray:
    """Bucket per sample (-1 = none fits), as the loader assigns them from each sample's metadata."""
    keys = np.stack([m["width"], m["height"], m["frames"], m["fps"], m["is_image"]], axis=1)
    unique, inverse = np.unique(keys, axis=0, return_inverse=True)  # many samples share their metadata
    table = np.array([assign_bucket(buckets, int(w), int(h), int(t), float(f), FPS, bool(i)) for w, h, t, f, i in unique])
    return table[inverse.reshape(-1)]


def step_metrics(units, steps: np.ndarray) -> tuple[float, float, float]:
    """(imbalance, idle, pad) of a plan: steps [S, W] unit indices."""
    flops = units.flops[steps]  # [S, W]
    mean, peak = flops.mean(axis=1), flops.max(axis=1)  # [S]
    imbalance = float(np.mean(peak / mean - 1.0))
    idle = float(1.0 - mean.sum() / peak.sum())
    pad = float(1.0 - units.tokens[steps].sum() / units.slots[steps].sum())
    return imbalance, idle, pad


def placement(plan: list[np.ndarray], steps: np.ndarray, num_samples: int) -> np.ndarray:
    """int64 [N]: step * W + rank that trains each sample, -1 for samples the epoch does not train."""
    where = np.full(num_samples, -1, dtype=np.int64)
    units = steps.reshape(-1)  # [S * W]
    members = [plan[g] for g in units]
    where[np.concatenate(members)] = np.repeat(np.arange(len(units)), [len(m) for m in members])
    return where


def moved(today: np.ndarray, balanced: np.ndarray) -> float:
    """Share of the samples the balanced plan trains that today's plan trains elsewhere (or not at all)."""
    trained = balanced >= 0
    return float(np.mean(today[trained] != balanced[trained]))


def settings(root: Path) -> dict[str, tuple[list[Bucket], int]]:
    """name -> (buckets, packing max_tokens)."""
    node = OmegaConf.load(root / "conf" / "data" / "webvid_256_buckets.yaml")
    b256 = make_buckets(OmegaConf.to_container(node.buckets), int(node.bucket_budget))
    b720 = make_buckets(BUCKETS_720P, BUDGET_720P)
    return {"dit_256": (b256, 4 * 2304), "720p": (b720, 2 * 31 * 45 * 80)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=120_000, help="samples in the synthetic manifest (>= 100k)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worlds", type=int, nargs="+", default=[8, 64, 512])
    args = parser.parse_args(argv)
    start = time.perf_counter()

    model = build_dit_config(OmegaConf.load(ROOT / "conf" / "model" / "dit_1b.yaml"), LATENT_CHANNELS, TEXT_DIM)
    cost = CostModel(model, latent_shape, TEXT_LEN)
    m = manifest(args.clips, args.seed)
    print(f"{args.clips} samples ({int(m['is_image'].sum())} images); model dit_1b ({model.hidden_size} wide, "
          f"depth {model.depth}), {TEXT_LEN} text tokens, VAE 4x8x8, patch {tuple(model.patch_size)}")
    header = (f"{'setting':<8} {'batches':<9} {'W':>4} | {'steps':>5} {'imbalance':>9} {'idle':>6} {'pad':>6} | "
              f"{'steps':>5} {'imbalance':>9} {'idle':>6} {'pad':>6} {'moved':>6}")
    results = {}
    for name, (buckets, max_tokens) in settings(ROOT).items():
        bucket_of = assign(buckets, m)
        counts = np.bincount(bucket_of[bucket_of >= 0], minlength=len(buckets))
        table = cost_table(cost, buckets)
        print(f"\n{name}: {int((bucket_of >= 0).sum())} samples planned, {int((bucket_of < 0).sum())} fit no bucket")
        for b, count in zip(buckets, counts, strict=True):
            c = table[(b.num_frames, b.height, b.width)]
            print(f"  {b.num_frames:>4}x{b.height}x{b.width:<5} batch {b.batch_size:>4}  {count:>6} samples  "
                  f"{c.tokens:>6} tokens/clip  {c.flops / 1e12:8.2f} TFLOP/clip ({100 * c.attention / c.flops:4.1f}% "
                  f"attention)  {b.batch_size * c.flops / 1e12:8.1f} TFLOP/batch")
        tokens = [table[(b.num_frames, b.height, b.width)].tokens for b in buckets]
        batches = epoch_batches(bucket_of, [b.batch_size for b in buckets], args.seed, 0)
        packs = pack_epoch(bucket_of, tokens, max_tokens, 8, args.seed, 0)
        plans = {  # (today's units, the balanced plan's units, pack slots)
            "buckets": (batches, batches, None),
            "packs": (packs, packs, max_tokens),
            "packs/dec": (packs, pack_epoch_decreasing(bucket_of, tokens, max_tokens, args.seed, 0), max_tokens),
        }
        print(f"{'':<23}| {'today':<31}| {'balanced':<38}")
        print(header)
        for kind, (plan_today, plan_balanced, slots) in plans.items():
            units = {}
            for which, plan in (("today", plan_today), ("balanced", plan_balanced)):
                shapes = [None] * len(plan) if slots else [buckets[int(bucket_of[g[0]])] for g in plan]
                units[which] = unit_costs(plan, shapes, bucket_of, buckets, table, slots)
            for world in args.worlds:
                n = len(plan_today) - len(plan_today) % world
                today = np.arange(n).reshape(-1, world)  # [S, W] step s, rank r reads unit s W + r
                balanced = balanced_order(units["balanced"].flops, world).reshape(-1, world)  # [S, W]
                row_today = step_metrics(units["today"], today)
                row_balanced = step_metrics(units["balanced"], balanced)
                share = moved(placement(plan_today, today, len(bucket_of)),
                              placement(plan_balanced, balanced, len(bucket_of)))
                results[(name, kind, world)] = row_balanced
                print(f"{name:<8} {kind:<9} {world:>4} | {len(today):>5} {row_today[0]:9.3f} {row_today[1]:6.3f} "
                      f"{row_today[2]:6.3f} | {len(balanced):>5} {row_balanced[0]:9.3f} {row_balanced[1]:6.3f} "
                      f"{row_balanced[2]:6.3f} {share:6.3f}")
    print(f"\n({time.perf_counter() - start:.1f} s)")
    imbalance, _, pad = results[("dit_256", "buckets", 64)]
    print(f"balanced imbalance {imbalance:.4f} pad {pad:.4f}")


if __name__ == "__main__":
    main()
