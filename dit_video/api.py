"""A small public API for notebooks and scripts: runs, checkpoints, samples, metrics, shards.

    from dit_video import api
    run = api.Run("outputs/demo/dit")                    # a run directory (or api.Run.from_checkpoint)
    steps, loss = run.metric("train/loss")
    pipe = run.pipeline(weights="ema")                   # ready to sample, no Lightning
    clips = api.generate(pipe, ["a red square moving left"], seeds=[0], steps=20)
    api.show(clips)                                      # inline animation (marked as AI-generated)
    refs = run.references(num=4)                         # captions + real clips of the run's own data
    clips = {"ema": api.generate(pipe, refs.prompts, steps=20)}
    api.show_pairs(refs, clips)                          # each prompt: its real clip, then the generated ones
    report = api.score(clips, refs, {"ema": pipe})       # motion, held-out loss, ... where they apply
    for sample in api.browse_shards("data/demo/val-*.tar", limit=8): ...

Everything here is a thin layer over the modules that do the work (pipeline, media, metrics,
provenance, data.browse, eval); notebooks call this, never copy code, so a notebook scores a run
exactly as `python -m dit_video.eval.evaluate` does. Nothing of ours imports this module.
"""

from __future__ import annotations

import base64
import html
import json
import tempfile
from pathlib import Path

import numpy as np
import yaml

from dit_video.checkpoint.paths import resolve_checkpoint
from dit_video.data.browse import browse_shards, shard_stats
from dit_video.eval.camera import run_clip_shards
from dit_video.eval.heldout import HeldOut
from dit_video.eval.references import References, run_references
from dit_video.eval.report import metrics_markdown, side_by_side
from dit_video.eval.scores import Scorers, real_motion
from dit_video.identity import config_hash, environment_info, sample_identity, write_environment
from dit_video.media import write_gif
from dit_video.metrics.probe import caption_faithfulness
from dit_video.pipeline import Pipeline
from dit_video.plots import read_metrics
from dit_video.provenance import ProvenanceConfig, check_prompts, mark_clips

__all__ = [
    "Run", "resolve_checkpoint", "load_pipeline", "generate", "sample_identity", "config_hash", "show",
    "browse_shards", "shard_stats", "evaluate_clips", "environment_info", "write_environment",
    "References", "show_pairs", "score", "metrics_markdown",
]


# ----------------------------------------------------------------------------- checkpoints and runs


def load_pipeline(path: str | Path, weights: str = "ema") -> Pipeline:
    """A sampling pipeline from a checkpoint file or run directory; weights "ema" or "raw"."""
    return Pipeline.from_checkpoint(resolve_checkpoint(path), weights=weights)


def generate(pipe: Pipeline, prompts: list[str], seeds: list[int] | None = None, *,
             negative_prompt: str = "", prompt_filter: bool = True, **sampling) -> np.ndarray:
    """pipe.generate after the prompt filter (conf/blocklist.txt) has read the prompts and the
    negative prompt (the model reads it too, in the unconditional branch): uint8 [N, T, H, W, 3]."""
    if prompt_filter:
        check_prompts(list(prompts), negative_prompt=negative_prompt)
    return pipe.generate(list(prompts), seeds, negative_prompt=negative_prompt, **sampling)


class Run:
    """One run directory: config.yaml, metrics.csv, checkpoints/, samples/."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        if not self.dir.is_dir():
            raise FileNotFoundError(f"run directory '{self.dir}' does not exist")

    @classmethod
    def from_checkpoint(cls, ckpt: str | Path) -> Run:
        """The run a checkpoint (<run_dir>/checkpoints/*.ckpt) belongs to."""
        return cls(Path(ckpt).resolve().parent.parent)

    @property
    def checkpoint(self) -> Path:
        return resolve_checkpoint(self.dir)

    @property
    def config(self) -> dict:
        """The resolved config the run was started with."""
        return yaml.safe_load((self.dir / "config.yaml").read_text())

    @property
    def environment(self) -> dict:
        """environment.json: git commit, command line, versions (written when the run started)."""
        return json.loads((self.dir / "environment.json").read_text())

    def pipeline(self, weights: str = "ema") -> Pipeline:
        return load_pipeline(self.dir, weights)

    @property
    def shards(self) -> dict:
        """{"train": ..., "val": ...}: the clip shards the run trained and validated on (for a
        latent cache, the shards it was encoded from); None where it has none."""
        train, val = run_clip_shards(self.config["data"])
        return {"train": train, "val": val}

    def references(self, num: int = 8, seed: int = 0) -> References:
        """`num` captions of the run's validation clips (else a seeded sample of its training
        clips) with the real clip of each, read as its loader reads them (eval/references.py)."""
        return run_references(self.config["data"], num, seed)

    def metrics(self) -> dict[str, tuple[list[int], list[float]]]:
        """Every column of metrics.csv -> (steps, values), rows without a value skipped."""
        path = self.dir / "metrics.csv"
        if not path.is_file():
            raise FileNotFoundError(f"'{path}' does not exist (runs log with logger=csv)")

        return read_metrics(path)

    def metric(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one logged metric, e.g. "train/loss"."""
        metrics = self.metrics()
        if key not in metrics:
            raise KeyError(f"metric {key!r} not in {self.dir / 'metrics.csv'}; logged: {sorted(metrics)}")
        return metrics[key]

    def loss_vs_t(self, last: int = 5) -> tuple[list[float], list[float], list[str]]:
        """The loss-vs-t curve: (bucket centres t, mean loss over the last `last` logged values
        of each `train/loss_t{a}-{b}` column, column names), sorted by t."""
        rows = []
        for key, (_, values) in self.metrics().items():
            if key.startswith("train/loss_t"):
                lo, hi = (float(x) for x in key[len("train/loss_t"):].split("-"))
                rows.append(((lo + hi) / 2, float(np.mean(values[-last:])), key))
        rows.sort()
        return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]

    def plot_losses(self):
        """A matplotlib figure: training loss against step, and loss against diffusion time t."""
        import matplotlib.pyplot as plt

        fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.5))
        steps, loss = self.metric("train/loss")
        ax0.plot(steps, loss)
        ax0.set(xlabel="step", ylabel="train/loss", yscale="log", title="loss")
        t, loss_t, _ = self.loss_vs_t()
        ax1.plot(t, loss_t, marker="o")
        ax1.set(xlabel="t (0 = data, 1 = noise)", ylabel="loss", title="loss vs t")
        fig.tight_layout()
        return fig


# ----------------------------------------------------------------------------- showing clips


def _gif_html(clips: np.ndarray, fps: float, scale: int) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = write_gif(clips, Path(tmp) / "show.gif", fps, cell=clips.shape[3] * scale)
        data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/gif;base64,{data}" style="image-rendering: pixelated"/>'


def show(clips: np.ndarray, fps: float = 8.0, scale: int = 4, provenance: bool = True):
    """Inline animation (IPython HTML holding a GIF) of uint8 [N, T, H, W, 3] clips side by side,
    with the visible label and watermark unless provenance=False."""
    from IPython.display import HTML

    clips = np.asarray(clips)
    if provenance:
        clips = mark_clips(clips, ProvenanceConfig())
    return HTML(_gif_html(clips, fps, scale))


def show_pairs(refs: References, generated: dict[str, np.ndarray], fps: float = 8.0, scale: int = 4):
    """Each prompt with its clips in one row (IPython HTML): the real clip of the same caption
    (unmarked, when refs has one), then each generated set's clip (AI-generated marks), in the
    order of `generated` ({"ema": clips, "raw": clips}, uint8 [N, T, H, W, 3] each)."""
    from IPython.display import HTML

    columns = (["real"] if refs.clips is not None else []) + list(generated)
    rows = [f"<tr><th>#</th><th>prompt</th><th>{' | '.join(columns)}</th></tr>"]
    for i, prompt in enumerate(refs.prompts):
        row = side_by_side(refs.clips, generated, i)  # [K, T, H, W, 3]
        rows.append(f"<tr><td>{i}</td><td>{html.escape(prompt)}</td><td>{_gif_html(row, fps, scale)}</td></tr>")
    return HTML("<table>" + "".join(rows) + "</table>")


# ----------------------------------------------------------------------------- metrics


def evaluate_clips(clips: np.ndarray, captions: list[str], probe: bool = True) -> dict:
    """Metrics of generated clips that need no extra weights: the demo caption probe."""

    out = {}
    if probe:
        report = caption_faithfulness(clips, captions)
        out["probe"] = {k: v for k, v in report.items() if k != "per_clip"}
    return out


def score(clips: dict[str, np.ndarray], refs: References, pipes: dict[str, Pipeline]) -> dict:
    """Every metric that applies to generated `clips` ({"ema": uint8 [N, T, H, W, 3], ...}, sampled
    from refs.prompts) as `evaluate` computes them (eval/scores.py): the motion score against the
    real clips and the captions, the held-out loss of each pipeline in `pipes` (same keys), the demo
    probe only on demo captions. Returns {"results": {name: ...}, "skipped": {metric: reason}, ...};
    metrics_markdown(report) shows it."""
    config = next(iter(pipes.values())).meta["config"]
    scorers = Scorers(refs.prompts, camera_shards=run_clip_shards(config["data"])[0])
    held_out = HeldOut(config)
    report = {"results": {}, "skipped": {"held_out_loss": held_out.skipped} if held_out.skipped else {},
              "held_out_loss": held_out.describe(), "real_motion": real_motion(refs.clips, refs.prompts)}
    for name, generated in clips.items():
        result, skipped = scorers.score(generated, refs.prompts, refs.clips)
        report["results"][name] = result | {"held_out_loss": held_out.loss(pipes[name])}
        report["skipped"] |= skipped
    return report
