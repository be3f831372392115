"""Evaluate a checkpoint on the run's own data: sample its captions, score, write report.json + report.md.

    python -m dit_video.eval.evaluate ckpt=outputs/demo/dit [weights=both] [steps=20]
        [compare=[400,800]] [num_prompts=16] [prompts=[...] | prompt_file=FILE]
        [i3d_path=/weights/i3d_rgb.safetensors] [clip_path=/weights/clip-vit-b32] [out=DIR]

Prompts (eval/references.py): by default `num_prompts` captions of the run's validation clips
(data.val_shards, or the shards a data.val_cache was encoded from), or without them a seeded
sample of its training captions (`prompt_seed`, recorded in the report), each with the real clip
of the same sample. `prompts=` / `prompt_file=` sample your own prompts instead (no real clips).

Metrics (eval/scores.py), each where it applies, otherwise listed under "Skipped" with the reason:
  motion     camera motion of each generated clip vs the real clip of the same caption, and vs
             the caption where it names a motion (dit_video/metrics/motion.py; no weights)
  held-out   the loss per t bucket on the run's validation batches, fixed t and noise, as the
             run's val/loss (eval/heldout.py)
  probe      the synthetic demo's caption probe, only when every prompt is a demo caption
  camera     scene and motion of the camera demo, when every prompt names a camera motion, with
             the run's real held-out clips as they are and through its VAE (eval/camera.py)
  fvd        Frechet Video Distance against real clips from `real_shards` (default: the run's
             validation clips), with the I3D weights at `i3d_path`
  clipscore  per-frame CLIPScore with the CLIP model at `clip_path`
`weights=both` samples the EMA and the raw weights; `compare=` adds checkpoints (step numbers of
the same run, checkpoint paths, or `all`), every one with the same prompts and seeds: one column
per checkpoint and weights, so a researcher sees whether later is better.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dit_video.checkpoint.paths import STEP_NAME, checkpoint_name, complete_checkpoints, resolve_checkpoint
from dit_video.errors import CheckpointError, PromptRefused
from dit_video.eval.camera import CameraScorer, camera_table, read_clips, reconstruct, run_clip_shards
from dit_video.eval.heldout import HeldOut
from dit_video.eval.references import References, given_references, run_references
from dit_video.eval.report import markdown_report, write_pairs
from dit_video.eval.scores import Scorers, real_motion
from dit_video.eval.throughput import throughput_summary
from dit_video.identity import sample_identity
from dit_video.media import write_samples
from dit_video.pipeline import Pipeline
from dit_video.provenance import check_prompts

__all__ = ["EvalConfig", "evaluate", "main", "markdown_report", "prompt_set", "checkpoint_list"]


@dataclass
class EvalConfig:
    ckpt: str = MISSING  # a DiT checkpoint or a run directory (uses checkpoints/last.ckpt)
    compare: list[str] = field(default_factory=list)  # more checkpoints: steps of ckpt's run (400), paths, or [all]
    weights: str = "ema"  # ema | raw | both (EMA-vs-raw comparison with the same seeds)
    prompts: list[str] | None = None  # your own prompts; None = captions from the run's data
    prompt_file: str | None = None  # your own prompts, one a line ('#' lines skipped)
    num_prompts: int = 16  # captions taken from the run's data (validation clips, else training clips)
    prompt_seed: int = 0  # which captions: a seeded sample of the split
    seeds_per_prompt: int = 1  # samples per prompt (seeds 1000 * s + i)
    sampler: str = "euler"  # euler | heun | ddim | dpmpp_2m
    steps: int = 20
    cfg: float = 4.0  # classifier-free guidance scale
    shift: float | None = None  # time shift of the sampling grid; None = the objective.shift the run trained with
    negative_prompt: str = ""
    batch_size: int = 16
    held_out: bool = True  # the held-out loss per t bucket on the run's validation batches
    held_out_batches: int | None = None  # validation batches scored; None = the run's eval.val_loss.max_batches
    real_shards: str | None = None  # FVD reference clips; None = the run's validation clips
    num_real: int = 64  # reference clips read for FVD
    i3d_path: str | None = None  # local I3D weights (dit_video.metrics.fvd.load_i3d); None = skip FVD
    i3d_size: int = 224  # frames are resized to this square size for I3D
    clip_path: str | None = None  # local Hugging Face CLIP folder; None = skip CLIPScore
    probe: bool | None = None  # None = run when every prompt is a demo caption
    camera: bool | None = None  # None = run when every prompt names a camera motion
    num_held_out: int = 168  # real held-out clips scored (as they are and through the VAE) for `camera`
    out: str | None = None  # report folder; None = <run_dir>/eval/<checkpoint name(s)>
    write_samples: bool = True  # also write the sampled mp4s (with provenance marks) and pairs/*.gif
    num_threads: int | None = None
    extra: dict = field(default_factory=dict)  # free-form notes copied into the report


def checkpoint_list(ckpt: str, compare: list) -> list[Path]:
    """`ckpt` and the `compare` checkpoints (step numbers of ckpt's run, paths, or "all" = every
    step checkpoint of the run), each once, ordered by training step."""
    first = resolve_checkpoint(ckpt)
    ckpt_dir = first.resolve().parent
    found = [first]
    for entry in (str(e) for e in compare):
        if entry == "all":
            found += complete_checkpoints(ckpt_dir)
        elif entry.isdigit():
            path = ckpt_dir / checkpoint_name(int(entry))
            if not path.exists():
                have = [p.name for p in complete_checkpoints(ckpt_dir)]
                raise CheckpointError(f"compare: no checkpoint of step {entry} in '{ckpt_dir}' (there are {have})")
            found.append(path)
        else:
            found.append(resolve_checkpoint(entry))
    unique = list({p.resolve(): p for p in reversed(found)}.values())[::-1]  # first mention wins

    def step(p: Path) -> float:
        match = STEP_NAME.match(p.resolve().name)
        return int(match.group(1)) if match else float("inf")

    return sorted(unique, key=step)


def prompt_set(refs: References, seeds_per_prompt: int) -> tuple[list[str], list[int], np.ndarray | None]:
    """(prompts, seeds, real clips) with seeds_per_prompt samples per prompt, seed 1000 * s + i."""
    n, k = len(refs.prompts), seeds_per_prompt
    prompts = [p for p in refs.prompts for _ in range(k)]
    seeds = [1000 * s + i for i in range(n) for s in range(k)]
    real = None if refs.clips is None else np.repeat(refs.clips, k, axis=0)  # [N * k, T, H, W, 3]
    return prompts, seeds, real


def evaluate(cfg: EvalConfig) -> dict:
    """Sample, score and write the report; returns the report dict."""
    if cfg.weights not in ("ema", "raw", "both"):
        raise ValueError(f"weights={cfg.weights!r}: use ema, raw or both")
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    given = given_references(cfg.prompts, cfg.prompt_file)
    if given is not None:
        check_prompts(given.prompts, negative_prompt=cfg.negative_prompt)  # before any checkpoint is read
    ckpts = checkpoint_list(cfg.ckpt, cfg.compare)
    weights_list = ["ema", "raw"] if cfg.weights == "both" else [cfg.weights]
    columns = {(f"{c.resolve().stem}/{w}" if len(ckpts) > 1 else w): (c, w) for c in ckpts for w in weights_list}
    first = Pipeline.from_checkpoint(ckpts[0], weights_list[0])
    config = first.meta["config"]
    refs = given or run_references(config["data"], cfg.num_prompts, cfg.prompt_seed)
    prompts, seeds, real = prompt_set(refs, cfg.seeds_per_prompt)
    check_prompts(prompts, negative_prompt=cfg.negative_prompt)
    out = Path(cfg.out) if cfg.out else _default_out(ckpts)
    out.mkdir(parents=True, exist_ok=True)
    shift = float(first.objective.cfg.shift) if cfg.shift is None else cfg.shift  # as sample.py: what it trained with
    sampling = {"sampler": cfg.sampler, "steps": cfg.steps, "cfg": cfg.cfg, "shift": shift,
                "negative_prompt": cfg.negative_prompt}
    train_shards, val_shards = run_clip_shards(config["data"])
    scorers = Scorers(prompts, probe=cfg.probe, camera=cfg.camera, camera_shards=train_shards,
                      clip_path=cfg.clip_path, i3d_path=cfg.i3d_path, i3d_size=cfg.i3d_size,
                      fvd_shards=cfg.real_shards or val_shards, num_real=cfg.num_real)
    report = {"checkpoint": str(ckpts[0]), "checkpoints": [str(c) for c in ckpts],
              "config": asdict(cfg) | {"prompts": prompts}, "prompts": prompts, "seeds": seeds,
              "references": refs.source, "references_description": refs.describe(), "sampling": sampling,
              "num_samples": len(prompts), "results": {}, "skipped": {}}
    if scorers.camera is not None:
        _camera_rows(first, scorers.camera, cfg, report)
    held_out = HeldOut(config, cfg.held_out_batches, enabled=cfg.held_out)
    report["held_out_loss"] = held_out.describe()
    if held_out.skipped:
        report["skipped"]["held_out_loss"] = held_out.skipped
    generated = {}
    for label, (ckpt, weights) in columns.items():
        start = time.perf_counter()
        pipe = first if first is not None else Pipeline.from_checkpoint(ckpt, weights)
        first = None  # the next column loads its own; this one is freed after scoring
        identity = sample_identity(ckpt, pipe.meta, weights)
        report.setdefault("identity", sample_identity(ckpt, pipe.meta, cfg.weights))
        clips = pipe.generate(prompts, seeds, batch_size=cfg.batch_size, **sampling)  # [N, T, H, W, 3]
        result = {"checkpoint": str(ckpt), "weights": weights, "sampling_seconds": time.perf_counter() - start}
        scores, skipped = scorers.score(clips, prompts, real)
        result |= scores
        report["skipped"] |= skipped
        result["held_out_loss"] = held_out.loss(pipe)
        if cfg.write_samples:
            written = write_samples(clips, prompts, seeds, out / f"samples_{label.replace('/', '_')}", pipe.fps,
                                    sampling | {"weights": weights, "checkpoint": str(ckpt)}, identity=identity)
            result["grid"] = written["grid"]
            generated[label] = clips
        report["results"][label] = result
        fps = pipe.fps
        del pipe
    if generated:
        report["pairs"] = write_pairs(out, real, generated, fps)
    report["real_motion"] = real_motion(real, prompts)
    report["fvd_reference"] = scorers.fvd_reference
    report["extra"] = dict(cfg.extra)
    report["throughput"] = throughput_summary(ckpts[0].resolve().parent.parent / "metrics.csv")  # the run's, if next to it
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "report.md").write_text(markdown_report(report))
    report["out"] = str(out)
    return report


def _default_out(ckpts: list[Path]) -> Path:
    """<run_dir>/eval/<checkpoint name>, or <first>..<last> when checkpoints are compared."""
    run_dir = ckpts[0].resolve().parent.parent
    names = [c.resolve().stem for c in ckpts]
    return run_dir / "eval" / (names[0] if len(names) == 1 else f"{names[0]}..{names[-1]}")


def _camera_rows(pipe: Pipeline, scorer: CameraScorer, cfg: EvalConfig, report: dict) -> None:
    """The real/VAE rows of the camera table (report["camera_reference"]) from the run's held-out clips."""
    _, held_out_shards = run_clip_shards(pipe.meta["config"]["data"])
    if held_out_shards:
        real, captions = read_clips(cfg.real_shards or held_out_shards, cfg.num_held_out)
        rows = camera_table(scorer, real, captions, reconstruct(pipe.vae, real), None, None)
        report["camera_reference"] = rows | {"shards": str(cfg.real_shards or held_out_shards)}
    else:
        report["skipped"]["camera_real"] = "the run names no held-out clips (data.val_shards or data.val_cache)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(EvalConfig), OmegaConf.from_dotlist(argv))
        cfg = EvalConfig(**OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True))
        report = evaluate(cfg)
    except Exception as err:  # config and input errors: one line, no traceback
        if not isinstance(err, (OmegaConfBaseException, CheckpointError, PromptRefused, ValueError,
                                FileNotFoundError)):
            raise
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    print(Path(report["out"]) / "report.md")
    print((Path(report["out"]) / "report.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
