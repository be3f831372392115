"""The end-to-end CPU demos behind `make demo` and `make demo-camera`: shards -> VAE -> DiT -> samples -> score.

Each stage is the same command a researcher would type; they are printed as they run.
    python -m dit_video.demo --out outputs/demo                               # coloured shapes
    python -m dit_video.demo --kind camera --out outputs/demo-camera          # real textures, camera motion

The camera demo caches the VAE latents once (data_prep.encode_latents) so the DiT never runs the
VAE, and ends with the table of dit_video/eval/camera.py: scene and camera-motion accuracy of the
real held-out clips, of the same clips through the trained VAE, and of clips generated from their
captions, with the wall time of every stage (also written to <out>/camera_table.json).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from dit_video.eval.camera import format_table, measure_camera
from dit_video.media import write_samples
from dit_video.metrics.probe import caption_faithfulness, probe_prompts
from dit_video.pipeline import Pipeline

MARKER = ".dit_video_demo"  # only folders carrying this marker are ever cleared by the demo
DEFAULTS = {  # per kind: data folder, output folder, sampling steps, CFG scale (None: the run's eval.samples)
    "shapes": {"data": "data/demo", "out": "outputs/demo", "steps": 30, "cfg": 5.0},
    "camera": {"data": "data/camera", "out": "outputs/demo-camera", "steps": None, "cfg": None},
}


def run(cmd: list[str]) -> float:
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start


def run_capture(cmd: list[str]) -> tuple[float, str]:
    """run(), also returning what the command printed (passed through to our stdout)."""
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    start = time.perf_counter()
    done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    print(done.stdout, end="", flush=True)
    return time.perf_counter() - start, done.stdout


def fresh_folder(out: Path) -> None:
    if out.exists():
        if not (out / MARKER).exists():
            sys.exit(f"error: --out {out} exists and is not a demo folder; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).touch()


def shapes_demo(args, out: Path, data: Path) -> int:
    py, times = sys.executable, {}
    start = time.perf_counter()

    if not any(data.glob("train-*.tar")):
        times["data"] = run([py, "-m", "data_prep.make_demo", "--out", str(data)])
    shards = [f"data.shards={data}/train-*.tar", f"data.val_shards={data}/val-*.tar"]
    times["vae"] = run([py, "train.py", "+experiment=vae_demo", f"hydra.run.dir={out}/vae", *shards])
    times["dit"] = run([py, "train.py", "+experiment=demo", f"hydra.run.dir={out}/dit", f"vae.path={out}/vae",
                        *shards, *args.overrides])


    t0 = time.perf_counter()
    ckpt = out / "dit" / "checkpoints" / "last.ckpt"
    pipe = Pipeline.from_checkpoint(ckpt)
    prompts, seeds = probe_prompts(args.seeds_per_prompt)
    clips = pipe.generate(prompts, seeds, steps=args.steps, cfg=args.cfg)
    settings = {"sampler": "euler", "steps": args.steps, "cfg": args.cfg, "checkpoint": str(ckpt)}
    written = write_samples(clips, prompts, seeds, out / "samples", pipe.fps, settings)
    report = caption_faithfulness(clips, prompts)
    times["sample"] = time.perf_counter() - t0
    summary = {k: v for k, v in report.items() if k != "per_clip"}
    (out / "samples" / "probe.json").write_text(json.dumps(report, indent=2, default=str))

    total = time.perf_counter() - start
    print("\n" + "=" * 72)
    print("dit-video demo finished in {:.1f} min ({})".format(
        total / 60, ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items())))
    print(f"  samples (mp4):   {out / 'samples'}/*.mp4  ({len(written['videos'])} clips)")
    print(f"  frame grid:      {written['grid']}")
    print(f"  loss curves:     {out / 'vae' / 'loss_curve.png'}, {out / 'dit' / 'loss_curve.png'}")
    print(f"  checkpoint:      {ckpt}")
    print("  caption probe:   colour {:.0%}, direction {:.0%}, shape {:.0%}  ->  score {:.0%} "
          "(chance: colour {:.0%}, direction 25%)".format(
              summary.get("colour", 0), summary.get("direction", 0), summary.get("shape", float("nan")),
              summary["score"], summary.get("chance_colour", 0)))
    print("=" * 72)
    return 0


def encode_cache(py: str, shards: str, root: Path, vae: Path) -> tuple[float, str]:
    """data_prep.encode_latents into its own root (the train and val caches would share a folder
    name: it is keyed by encoders and clip shape); returns (seconds, the cache folder it printed)."""
    seconds, printed = run_capture([py, "-m", "data_prep.encode_latents", "--shards", shards, "--out", str(root),
                                    "--vae", str(vae)])
    found = re.search(r"data\.cache=(\S+)", printed)
    if not found:
        sys.exit(f"error: data_prep.encode_latents printed no cache folder for {shards}")
    return seconds, found.group(1)


def camera_demo(args, out: Path, data: Path) -> int:
    """make_demo --kind camera -> vae_camera -> encode_latents (train, val) -> camera DiT -> table."""
    py, times = sys.executable, {}
    start = time.perf_counter()
    if not any(data.glob("train-*.tar")):
        times["data"] = run([py, "-m", "data_prep.make_demo", "--kind", "camera", "--out", str(data)])
    train_glob, val_glob = f"{data}/train-*.tar", f"{data}/val-*.tar"
    times["vae"] = run([py, "train.py", "+experiment=vae_camera", f"hydra.run.dir={out}/vae",
                        f"data.shards={train_glob}", f"data.val_shards={val_glob}", *args.vae_overrides])
    t_train, train_cache = encode_cache(py, train_glob, out / "latents" / "train", out / "vae")
    t_val, val_cache = encode_cache(py, val_glob, out / "latents" / "val", out / "vae")
    times["latents"] = t_train + t_val
    times["dit"] = run([py, "train.py", "+experiment=camera", f"hydra.run.dir={out}/dit", f"vae.path={out}/vae",
                        f"data.cache={train_cache}", f"data.val_cache={val_cache}", *args.overrides])

    # Sample every (scene, motion) caption seeds_per_prompt times (sampler settings: the run's
    # eval.samples unless given), then score real held-out clips, their VAE reconstructions and the
    # samples with one scorer.
    ckpt = out / "dit" / "checkpoints" / "last.ckpt"
    measured = measure_camera(ckpt, train_glob, val_glob, args.seeds_per_prompt, args.steps, args.cfg, args.shift)
    rows, settings = measured["rows"], measured["settings"]
    written = write_samples(measured["generated"], measured["prompts"], measured["seeds"], out / "samples",
                            measured["fps"], settings)
    times |= measured["seconds"]
    total = time.perf_counter() - start
    result = {"rows": rows, "seconds": times | {"total": total}, "settings": settings,
              "num_generated": len(measured["prompts"]), "seeds_per_prompt": args.seeds_per_prompt,
              "held_out": val_glob, "references": train_glob}
    (out / "camera_table.json").write_text(json.dumps(result, indent=2))

    print("\n" + "=" * 72)
    print("dit-video camera demo finished in {:.1f} min ({})".format(
        total / 60, ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items())))
    print(f"  samples (mp4):   {out / 'samples'}/*.mp4  ({len(written['videos'])} clips)")
    print(f"  frame grid:      {written['grid']}")
    print(f"  checkpoint:      {ckpt}")
    print(f"  table:           {out / 'camera_table.json'}\n")
    print(format_table(rows))
    print("=" * 72)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=tuple(DEFAULTS), default="shapes", help="shapes (make demo) or camera (make demo-camera)")
    p.add_argument("--out", default=None, help="folder for the VAE, DiT and sample outputs (default per kind)")
    p.add_argument("--data", default=None, help="folder of the demo shards, made if missing (default per kind)")
    p.add_argument("--seeds-per-prompt", type=int, default=2, help="samples per probe prompt")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (camera demo: default the run's eval.samples)")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (likewise)")
    p.add_argument("--shift", type=float, default=None, help="sampling time shift (camera demo; likewise)")
    p.add_argument("--vae-override", action="append", default=[], dest="vae_overrides", metavar="FIELD=VALUE",
                   help="an extra Hydra override for the VAE stage (camera demo; repeat for several)")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for the DiT stage")
    args = p.parse_args(argv)
    defaults = DEFAULTS[args.kind]
    args.steps = defaults["steps"] if args.steps is None else args.steps
    args.cfg = defaults["cfg"] if args.cfg is None else args.cfg
    out, data = Path(args.out or defaults["out"]), Path(args.data or defaults["data"])
    fresh_folder(out)
    return camera_demo(args, out, data) if args.kind == "camera" else shapes_demo(args, out, data)


if __name__ == "__main__":
    raise SystemExit(main())
