"""The end-to-end CPU demo behind `make demo`: shards -> VAE -> DiT -> samples -> score.

Each stage is the same command a researcher would type; they are printed as they run.
    python -m dit_video.demo --out outputs/demo
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from dit_video.media import write_samples
from dit_video.metrics.probe import caption_faithfulness, probe_prompts
from dit_video.pipeline import Pipeline

MARKER = ".dit_video_demo"  # only folders carrying this marker are ever cleared by the demo


def run(cmd: list[str]) -> float:
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/demo", help="folder for the VAE, DiT and sample outputs")
    p.add_argument("--data", default="data/demo", help="folder of the demo shards (made if missing)")
    p.add_argument("--seeds-per-prompt", type=int, default=2, help="samples per probe prompt")
    p.add_argument("--steps", type=int, default=30, help="sampling steps")
    p.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for the DiT stage")
    args = p.parse_args(argv)

    out, data = Path(args.out), Path(args.data)
    if out.exists():
        if not (out / MARKER).exists():
            sys.exit(f"error: --out {out} exists and is not a demo folder; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).touch()
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


if __name__ == "__main__":
    raise SystemExit(main())
