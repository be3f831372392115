"""Evaluate a checkpoint: sample a prompt set, score it, write report.json + report.md.

    python -m dit_video.eval.evaluate ckpt=outputs/demo/dit [weights=both] [steps=20]
        [i3d_path=/weights/i3d_rgb.safetensors] [clip_path=/weights/clip-vit-b32] [out=DIR]

Metrics (each runs when what it needs is there, otherwise the report says why it was skipped):
  probe      caption faithfulness on the synthetic demo (colour/direction/shape read off the
             pixels; dit_video/metrics/probe.py) when every prompt is a demo caption
  camera     when every prompt names a camera motion (the camera demo): scene and motion accuracy
             of the generated clips, and of the run's real held-out clips as they are and
             through the run's VAE (its motion fidelity); dit_video/eval/camera.py
  fvd        Frechet Video Distance against real clips from `real_shards` (default: the run's
             validation shards) with the I3D weights at `i3d_path`
  clipscore  per-frame CLIPScore with the CLIP model at `clip_path`
The default prompt set covers every demo colour x direction (the demo's probe set), or the run's
in-training sample prompts when those name camera motions.
`weights=both` samples the EMA and the raw weights with the same seeds, side by side.
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

from dit_video.checkpoint.paths import resolve_checkpoint
from dit_video.data.browse import browse_shards
from dit_video.errors import CheckpointError, PromptRefused
from dit_video.eval.camera import CameraScorer, camera_table, read_clips, reconstruct, run_clip_shards
from dit_video.eval.throughput import throughput_markdown, throughput_summary
from dit_video.identity import sample_identity
from dit_video.media import write_samples
from dit_video.metrics.clipscore import CLIPScorer
from dit_video.metrics.frechet import frechet_distance_features
from dit_video.metrics.fvd import i3d_features, load_i3d
from dit_video.metrics.motion import motion_applies
from dit_video.metrics.probe import caption_faithfulness, probe_applies, probe_prompts
from dit_video.pipeline import Pipeline
from dit_video.provenance import check_prompts


@dataclass
class EvalConfig:
    ckpt: str = MISSING  # a DiT checkpoint or a run directory (uses checkpoints/last.ckpt)
    weights: str = "ema"  # ema | raw | both (EMA-vs-raw comparison with the same seeds)
    prompts: list[str] | None = None  # None = the demo probe set: every colour x direction
    seeds_per_prompt: int = 1  # samples per prompt (seeds 1000 * s + i)
    sampler: str = "euler"  # euler | heun | ddim | dpmpp_2m
    steps: int = 20
    cfg: float = 4.0  # classifier-free guidance scale
    shift: float = 1.0
    negative_prompt: str = ""
    batch_size: int = 16
    real_shards: str | None = None  # FVD reference clips; None = the run's data.val_shards
    num_real: int = 64  # reference clips read for FVD
    i3d_path: str | None = None  # local I3D weights (dit_video.metrics.fvd.load_i3d); None = skip FVD
    i3d_size: int = 224  # frames are resized to this square size for I3D
    clip_path: str | None = None  # local Hugging Face CLIP folder; None = skip CLIPScore
    probe: bool | None = None  # None = run when every prompt is a demo caption
    camera: bool | None = None  # None = run when every prompt names a camera motion
    num_held_out: int = 168  # real held-out clips scored (as they are and through the VAE) for `camera`
    out: str | None = None  # report folder; None = <run_dir>/eval/<checkpoint name>
    write_samples: bool = True  # also write the sampled mp4s (with provenance marks)
    num_threads: int | None = None
    extra: dict = field(default_factory=dict)  # free-form notes copied into the report


def _real_clips(shards, num: int, num_frames: int) -> np.ndarray:
    samples = browse_shards(shards, limit=num, num_frames=num_frames)
    clips = [s["clip"] for s in samples if s["clip"] is not None and len(s["clip"]) == num_frames]
    if len(clips) < 2:
        raise ValueError(f"real_shards: need >= 2 clips of {num_frames} frames for FVD, found {len(clips)} in {shards}")
    return np.stack(clips)


def prompt_set(cfg: EvalConfig, meta: dict) -> tuple[list[str], list[int]]:
    """(prompts, seeds): cfg.prompts, else the run's in-training sample prompts when they name camera
    motions (the camera demo), else the demo probe set; seeds_per_prompt each, seed 1000 * s + i."""
    run_prompts = list(meta["config"].get("eval", {}).get("samples", {}).get("prompts") or [])
    base = cfg.prompts or (run_prompts if motion_applies(run_prompts) else None)
    if not base:
        return probe_prompts(cfg.seeds_per_prompt)
    prompts = [p for p in base for _ in range(cfg.seeds_per_prompt)]
    seeds = [1000 * s + i for i in range(len(base)) for s in range(cfg.seeds_per_prompt)]
    return prompts, seeds


def evaluate(cfg: EvalConfig) -> dict:
    """Sample, score and write the report; returns the report dict."""

    if cfg.weights not in ("ema", "raw", "both"):
        raise ValueError(f"weights={cfg.weights!r}: use ema, raw or both")
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    if cfg.prompts:
        check_prompts(list(cfg.prompts), negative_prompt=cfg.negative_prompt)  # before any checkpoint is read
    ckpt = resolve_checkpoint(cfg.ckpt)
    weights_list = ["ema", "raw"] if cfg.weights == "both" else [cfg.weights]
    pipes = {weights_list[0]: Pipeline.from_checkpoint(ckpt, weights_list[0])}
    prompts, seeds = prompt_set(cfg, pipes[weights_list[0]].meta)
    check_prompts(prompts, negative_prompt=cfg.negative_prompt)
    out = Path(cfg.out) if cfg.out else ckpt.resolve().parent.parent / "eval" / ckpt.stem
    out.mkdir(parents=True, exist_ok=True)
    run_probe = probe_applies(prompts) if cfg.probe is None else cfg.probe
    run_camera = motion_applies(prompts) if cfg.camera is None else cfg.camera
    sampling = {"sampler": cfg.sampler, "steps": cfg.steps, "cfg": cfg.cfg, "shift": cfg.shift,
                "negative_prompt": cfg.negative_prompt}

    scorers = {}
    if cfg.clip_path:
        scorers["clip"] = CLIPScorer(cfg.clip_path)
    if cfg.i3d_path:
        scorers["i3d"] = load_i3d(cfg.i3d_path)

    report = {"checkpoint": str(ckpt), "config": asdict(cfg) | {"prompts": prompts}, "seeds": seeds,
              "sampling": sampling, "num_samples": len(prompts), "results": {}, "skipped": {}}
    real_features = None
    camera = _camera_rows(pipes[weights_list[0]], cfg, report) if run_camera else None
    for weights in weights_list:
        start = time.perf_counter()
        pipe = pipes.pop(weights, None) or Pipeline.from_checkpoint(ckpt, weights)
        report.setdefault("identity", sample_identity(ckpt, pipe.meta, cfg.weights))
        clips = pipe.generate(prompts, seeds, batch_size=cfg.batch_size, **sampling)  # [N, T, H, W, 3]
        result = {"sampling_seconds": time.perf_counter() - start}
        if run_probe:
            probe = caption_faithfulness(clips, prompts)
            result["probe"] = {k: v for k, v in probe.items() if k != "per_clip"}
            result["probe_per_clip"] = probe["per_clip"]
        else:
            report["skipped"]["probe"] = "prompts are not demo captions (colour, shape, direction)"
        if camera is not None:
            scores = camera["scorer"].score(clips, prompts)
            result["camera"] = {k: scores[k] for k in ("scene", "motion", "both", "num_clips") if k in scores}
            result["camera_per_clip"] = scores["per_clip"]
        if "clip" in scorers:
            scores = scorers["clip"].score(clips, prompts)
            result["clipscore"] = scores["clipscore"]
            result["clipscore_per_clip"] = scores["per_clip"]
        else:
            report["skipped"]["clipscore"] = "no clip_path (a local Hugging Face CLIP folder)"
        if "i3d" in scorers:
            if real_features is None:
                shards = cfg.real_shards or pipe.meta["config"]["data"]["val_shards"]
                real = _real_clips(shards, cfg.num_real, clips.shape[1])
                real_features = i3d_features(real, scorers["i3d"], size=cfg.i3d_size)
                report["fvd_reference"] = {"shards": str(shards), "num_clips": len(real), "size": cfg.i3d_size}
            fake_features = i3d_features(clips, scorers["i3d"], size=cfg.i3d_size)
            result["fvd"] = frechet_distance_features(real_features, fake_features)
        else:
            report["skipped"]["fvd"] = "no i3d_path (local I3D weights; see dit_video/metrics/fvd.py)"
        if cfg.write_samples:
            written = write_samples(clips, prompts, seeds, out / f"samples_{weights}", pipe.fps,
                                    sampling | {"weights": weights, "checkpoint": str(ckpt)},
                                    identity=sample_identity(ckpt, pipe.meta, weights))
            result["grid"] = written["grid"]
        report["results"][weights] = result
    report["extra"] = dict(cfg.extra)
    report["throughput"] = throughput_summary(ckpt.resolve().parent.parent / "metrics.csv")  # the run's, if next to it
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "report.md").write_text(markdown_report(report))
    report["out"] = str(out)
    return report


def _camera_rows(pipe: Pipeline, cfg: EvalConfig, report: dict) -> dict:
    """The scene references and the real/VAE rows of the camera table (report["camera_reference"])."""
    train_shards, held_out_shards = run_clip_shards(pipe.meta["config"]["data"])
    scorer = CameraScorer(train_shards)
    if held_out_shards:
        real, captions = read_clips(cfg.real_shards or held_out_shards, cfg.num_held_out)
        rows = camera_table(scorer, real, captions, reconstruct(pipe.vae, real), None, None)
        report["camera_reference"] = rows | {"shards": str(cfg.real_shards or held_out_shards)}
    else:
        report["skipped"]["camera_real"] = "the run names no held-out clips (data.val_shards or data.val_cache)"
    return {"scorer": scorer}


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def markdown_report(report: dict) -> str:
    """The report as Markdown: a metric table (one column per weights), settings, skipped metrics."""
    names = list(report["results"])
    rows = [("probe score (colour+direction)", lambda r: r.get("probe", {}).get("score")),
            ("probe colour", lambda r: r.get("probe", {}).get("colour")),
            ("probe direction", lambda r: r.get("probe", {}).get("direction")),
            ("probe shape", lambda r: r.get("probe", {}).get("shape")),
            ("camera: scene", lambda r: r.get("camera", {}).get("scene")),
            ("camera: motion", lambda r: r.get("camera", {}).get("motion")),
            ("camera: scene and motion", lambda r: r.get("camera", {}).get("both")),
            ("FVD", lambda r: r.get("fvd")),
            ("CLIPScore", lambda r: r.get("clipscore")),
            ("sampling seconds", lambda r: r.get("sampling_seconds"))]
    lines = [f"# Evaluation of `{report['checkpoint']}`", "",
             f"{report['num_samples']} samples; sampler {report['sampling']['sampler']}, "
             f"{report['sampling']['steps']} steps, CFG {report['sampling']['cfg']}, shift {report['sampling']['shift']}.",
             "", "| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, get in rows:
        values = [get(report["results"][n]) for n in names]
        if any(v is not None for v in values):
            lines.append(f"| {label} | " + " | ".join(_fmt(v) for v in values) + " |")
    if any("probe" in r for r in report["results"].values()):
        lines += ["", "Chance level of the probe: colour 20%, direction 25% (score 22.5%)."]
    if report.get("camera_reference"):
        ref = report["camera_reference"]
        lines += ["", f"Real held-out clips (`{ref['shards']}`), scored the same way:", "",
                  "| clips | scene | motion | scene and motion | clips |", "|---|---|---|---|---|"]
        for name, label in (("real", "real"), ("vae", "through the run's VAE")):
            r = ref[name]
            lines.append(f"| {label} | {_fmt(r.get('scene'))} | {_fmt(r['motion'])} | {_fmt(r.get('both'))} | "
                         f"{r['num_clips']} |")
        fidelity = ref["vae_motion_fidelity"]
        lines += ["", f"VAE motion fidelity {fidelity['motion_fidelity']:.3f} (reconstructions moving as their "
                      f"inputs do; motion error {fidelity['motion_error']:.3f} of the frame). "
                      "Chance: motion 1/7, scene 1/(number of scenes)."]
    if report.get("fvd_reference"):
        ref = report["fvd_reference"]
        lines += ["", f"FVD reference: {ref['num_clips']} clips from `{ref['shards']}` at {ref['size']}px."]
    lines += throughput_markdown(report.get("throughput", {}))
    if report["skipped"]:
        lines += ["", "Skipped:"] + [f"- {k}: {v}" for k, v in sorted(report["skipped"].items())]
    identity = report.get("identity", {})
    lines += ["", f"Checkpoint sha256 `{identity.get('checkpoint_sha256')}`, config sha256 "
                  f"`{identity.get('config_sha256')}`, git commit `{identity.get('git_commit')}`.", ""]
    return "\n".join(lines)


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
