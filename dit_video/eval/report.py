"""The evaluation report as Markdown (report.md), and each prompt's clips side by side.

One metric table with a column per evaluated checkpoint and weights, the prompts with their real
and generated clips (pairs/NNN.gif: the real clip first, then one generated clip per column,
only the generated ones carrying the AI-generated marks), the reference figures, and every
skipped metric with the reason.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dit_video.eval.throughput import throughput_markdown
from dit_video.media import write_gif
from dit_video.provenance import ProvenanceConfig, mark_clips

MOTION_CHANCE = "chance 1/7"
_ROWS = [  # (label, result -> value): the metric table, in this order; a row nobody has is left out
    ("motion vs real clip (same label)", lambda r: r.get("motion", {}).get("vs_real")),
    ("motion error vs real clip (frame fraction)", lambda r: r.get("motion", {}).get("error_vs_real")),
    ("motion vs caption", lambda r: r.get("motion", {}).get("vs_caption")),
    ("probe score (colour+direction)", lambda r: r.get("probe", {}).get("score")),
    ("probe colour", lambda r: r.get("probe", {}).get("colour")),
    ("probe direction", lambda r: r.get("probe", {}).get("direction")),
    ("probe shape", lambda r: r.get("probe", {}).get("shape")),
    ("camera: scene", lambda r: r.get("camera", {}).get("scene")),
    ("camera: motion", lambda r: r.get("camera", {}).get("motion")),
    ("camera: scene and motion", lambda r: r.get("camera", {}).get("both")),
    ("FVD", lambda r: r.get("fvd")),
    ("CLIPScore", lambda r: r.get("clipscore")),
    ("held-out loss", lambda r: (r.get("held_out_loss") or {}).get("val/loss")),
]


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def _table(names: list[str], results: dict) -> list[str]:
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    buckets = sorted({k for r in results.values() for k in (r.get("held_out_loss") or {}) if k != "val/loss"},
                     key=lambda k: float(k[len("val/loss_t"):].split("-")[0]))
    rows = _ROWS + [(f"held-out loss, t {k[len('val/loss_t'):]}", lambda r, k=k: (r.get("held_out_loss") or {}).get(k))
                    for k in buckets]
    rows += [("sampling seconds", lambda r: r.get("sampling_seconds"))]
    for label, get in rows:
        values = [get(results[n]) for n in names]
        if any(v is not None for v in values):
            lines.append(f"| {label} | " + " | ".join(_fmt(v) for v in values) + " |")
    return lines


def _samples_table(report: dict, names: list[str]) -> list[str]:
    """Each prompt with its motion labels (caption, real, each column) and its pairs GIF."""
    prompts, seeds = report.get("prompts") or [], report.get("seeds") or []
    if not prompts:
        return []
    motion = {n: report["results"][n].get("motion", {}).get("per_clip") or [] for n in names}
    pairs = report.get("pairs") or []
    has_real = bool(report.get("references", {}).get("split"))
    head = "| # | prompt | seed | motion: caption | " + ("real | " if has_real else "") + " | ".join(names) + " | clips |"
    lines = ["", "Prompts" + (" (clips: real, then " + ", ".join(names) + ")" if has_real else "") + ":", "", head,
             "|---" * (head.count("|") - 1) + "|"]
    for i, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True)):
        rows = [motion[n][i] if i < len(motion[n]) else {} for n in names]
        first = rows[0] if rows else {}
        cells = [str(i), prompt.replace("|", "/"), str(seed), _fmt(first.get("caption"))]
        cells += [_fmt(first.get("real"))] if has_real else []
        cells += [_fmt(r.get("generated")) for r in rows]
        cells += [f"![{i}]({pairs[i]})" if i < len(pairs) else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def metrics_markdown(report: dict) -> str:
    """The metric table (one column per checkpoint and weights), what the figures are measured
    against, and the skipped metrics with their reasons: the part of the report a notebook shows."""
    return "\n".join(_metric_lines(report) + _skipped_lines(report)).strip() + "\n"


def _metric_lines(report: dict) -> list[str]:
    results = report["results"]
    lines = ["", *_table(list(results), results)]
    if any("probe" in r for r in results.values()):
        lines += ["", "Chance level of the probe: colour 20%, direction 25% (score 22.5%)."]
    if any("motion" in r for r in results.values()):
        line = f"Motion: the camera motion read off the pixels (dit_video/metrics/motion.py), {MOTION_CHANCE}."
        if report.get("real_motion"):
            real = report["real_motion"]
            line += f" The real clips move as their captions say in {real['vs_caption']:.3f} of {real['num_named']}."
        lines += ["", line]
    if report.get("held_out_loss"):
        h = report["held_out_loss"]
        lines += ["", f"Held-out loss: {h['num_batches']} validation batch{'es' if h['num_batches'] > 1 else ''} of "
                      f"the run, t and noise seeded with {h['seed']}, as the run's val/loss."]
    return lines


def _skipped_lines(report: dict) -> list[str]:
    skipped = report.get("skipped") or {}
    return ["", "Skipped:"] + [f"- {k}: {v}" for k, v in sorted(skipped.items())] if skipped else []


def markdown_report(report: dict) -> str:
    """The report as Markdown: where the prompts came from, the metrics, the prompts with their
    clips, reference figures, skipped metrics, the checkpoint's identity."""
    names = list(report["results"])
    s = report["sampling"]
    compared = report.get("checkpoints") or []
    subject = Path(compared[0]).resolve().parent.parent if len(compared) > 1 else report["checkpoint"]  # the run
    lines = [f"# Evaluation of `{subject}`", "",
             f"{report['num_samples']} samples; sampler {s['sampler']}, {s['steps']} steps, CFG {s['cfg']}, "
             f"shift {s['shift']}."]
    if report.get("references"):
        lines += ["", f"Prompts: {report['references_description']}."]
    if len(compared) > 1:
        lines += ["", "Checkpoints compared (same prompts and seeds): "
                  + ", ".join(f"`{Path(c).resolve().name}`" for c in compared) + "."]
    lines += _metric_lines(report)
    lines += _camera_lines(report.get("camera_reference"))
    if report.get("fvd_reference"):
        ref = report["fvd_reference"]
        lines += ["", f"FVD reference: {ref['num_clips']} clips from `{ref['shards']}` at {ref['size']}px."]
    lines += _samples_table(report, names)
    lines += throughput_markdown(report.get("throughput", {}))
    lines += _skipped_lines(report)
    identity = report.get("identity", {})
    lines += ["", f"Checkpoint sha256 `{identity.get('checkpoint_sha256')}`, config sha256 "
                  f"`{identity.get('config_sha256')}`, git commit `{identity.get('git_commit')}`.", ""]
    return "\n".join(lines)


def _camera_lines(ref: dict | None) -> list[str]:
    """The camera demo's real and VAE rows (eval/camera.py), when evaluate computed them."""
    if not ref:
        return []
    lines = ["", f"Real held-out clips (`{ref['shards']}`), scored the same way:", "",
             "| clips | scene | motion | scene and motion | clips |", "|---|---|---|---|---|"]
    for name, label in (("real", "real"), ("vae", "through the run's VAE")):
        r = ref[name]
        lines.append(f"| {label} | {_fmt(r.get('scene'))} | {_fmt(r['motion'])} | {_fmt(r.get('both'))} | "
                     f"{r['num_clips']} |")
    fidelity = ref["vae_motion_fidelity"]
    return lines + ["", f"VAE motion fidelity {fidelity['motion_fidelity']:.3f} (reconstructions moving as their "
                        f"inputs do; motion error {fidelity['motion_error']:.3f} of the frame). "
                        "Chance: motion 1/7, scene 1/(number of scenes)."]


def side_by_side(real: np.ndarray | None, generated: dict[str, np.ndarray], i: int,
                 provenance: ProvenanceConfig | None = None) -> np.ndarray:
    """Sample i's clips as one row, uint8 [K, T, H, W, 3]: the real clip (if any, unmarked), then
    each column's generated clip with the AI-generated marks."""
    marked = [mark_clips(clips[i:i + 1], provenance or ProvenanceConfig())[0] for clips in generated.values()]
    return np.stack(([real[i]] if real is not None else []) + marked)


def write_pairs(out: Path, real: np.ndarray | None, generated: dict[str, np.ndarray], fps: float) -> list[str]:
    """pairs/NNN.gif per sample (side_by_side); returns the paths relative to `out`."""
    (out / "pairs").mkdir(parents=True, exist_ok=True)
    n = len(next(iter(generated.values())))
    return [str(write_gif(side_by_side(real, generated, i), out / "pairs" / f"{i:03d}.gif", fps).relative_to(out))
            for i in range(n)]
