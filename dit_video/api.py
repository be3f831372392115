"""A small public API for notebooks and scripts: runs, checkpoints, samples, metrics, shards.

    from dit_video import api
    run = api.Run("outputs/demo/dit")                    # a run directory (or api.Run.from_checkpoint)
    steps, loss = run.metric("train/loss")
    pipe = run.pipeline(weights="ema")                   # ready to sample, no Lightning
    clips = api.generate(pipe, ["a red square moving left"], seeds=[0], steps=20)
    api.show(clips)                                      # inline animation (marked as AI-generated)
    for sample in api.browse_shards("data/demo/val-*.tar", limit=8): ...

Everything here is a thin layer over the modules that do the work (pipeline, media, eval,
provenance); notebooks call this, never copy code.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from dit_video.data.browse import browse_shards, shard_stats
from dit_video.pipeline import CheckpointError, Pipeline

__all__ = [
    "Run", "resolve_checkpoint", "load_pipeline", "generate", "sample_identity", "config_hash", "show",
    "browse_shards", "shard_stats", "evaluate_clips", "environment_info", "write_environment",
]


# ----------------------------------------------------------------------------- checkpoints and runs


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file or DCP folder (FSDP2), or a run directory -> its checkpoints/last.ckpt."""
    path = Path(path)
    if path.is_dir() and not (path / ".metadata").is_file():
        last = path / "checkpoints" / "last.ckpt"
        if not last.exists():  # a file, or a link to a DCP folder
            raise CheckpointError(f"run directory '{path}' has no checkpoints/last.ckpt (is it a DiT run?)")
        return last
    return path


def load_pipeline(path: str | Path, weights: str = "ema") -> Pipeline:
    """A sampling pipeline from a checkpoint file or run directory; weights "ema" or "raw"."""
    return Pipeline.from_checkpoint(resolve_checkpoint(path), weights=weights)


def config_hash(config: dict) -> str:
    """sha256 of a config as canonical JSON (sorted keys): equal configs, equal hashes."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def sample_identity(ckpt: str | Path, meta: dict, weights: str) -> dict:
    """Who made a sample: model, checkpoint file + sha256, training-config hash, weights, commit."""
    from dit_video.checkpoint import checkpoint_sha256

    d = meta["dit_config"]
    return {
        "model": f"DiT depth={d['depth']} hidden={d['hidden_size']} patch={list(d['patch_size'])}",
        "checkpoint": str(ckpt),
        "checkpoint_sha256": checkpoint_sha256(ckpt),
        "config_sha256": config_hash(meta["config"]),
        "weights": weights,
        "git_commit": meta.get("git_commit"),
    }


def generate(pipe: Pipeline, prompts: list[str], seeds: list[int] | None = None, *,
             prompt_filter: bool = True, **sampling) -> np.ndarray:
    """pipe.generate after the prompt filter (conf/blocklist.txt): uint8 [N, T, H, W, 3]."""
    if prompt_filter:
        from dit_video.provenance import check_prompts

        check_prompts(list(prompts))
    return pipe.generate(list(prompts), seeds, **sampling)


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
        import yaml

        return yaml.safe_load((self.dir / "config.yaml").read_text())

    @property
    def environment(self) -> dict:
        """environment.json: git commit, command line, versions (written when the run started)."""
        return json.loads((self.dir / "environment.json").read_text())

    def pipeline(self, weights: str = "ema") -> Pipeline:
        return load_pipeline(self.dir, weights)

    def metrics(self) -> dict[str, tuple[list[int], list[float]]]:
        """Every column of metrics.csv -> (steps, values), rows without a value skipped."""
        path = self.dir / "metrics.csv"
        if not path.is_file():
            raise FileNotFoundError(f"'{path}' does not exist (runs log with logger=csv)")
        from dit_video.plots import read_metrics

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


# ----------------------------------------------------------------------------- run environment


def environment_info() -> dict:
    """What produced a run: git commit (and whether the tree was dirty), command line, Python,
    platform, CPU/GPU, thread count and the versions of every installed distribution."""
    import platform
    import subprocess
    import sys
    from importlib import metadata

    import torch

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, check=False,
                                 cwd=Path(__file__).resolve().parent)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "argv": list(sys.argv),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "packages": dict(sorted((d.metadata["Name"], d.version) for d in metadata.distributions()
                                if d.metadata["Name"])),
    }


def write_environment(run_dir: str | Path) -> Path:
    """<run_dir>/environment.json from `environment_info()`."""
    path = Path(run_dir) / "environment.json"
    path.write_text(json.dumps(environment_info(), indent=1))
    return path


# ----------------------------------------------------------------------------- showing clips


def show(clips: np.ndarray, fps: float = 8.0, scale: int = 4, provenance: bool = True):
    """Inline animation (IPython HTML holding a GIF) of uint8 [N, T, H, W, 3] clips side by side,
    with the visible label and watermark unless provenance=False."""
    from IPython.display import HTML

    from dit_video.media import write_gif
    from dit_video.provenance import ProvenanceConfig, mark_clips

    clips = np.asarray(clips)
    if provenance:
        clips = mark_clips(clips, ProvenanceConfig())
    with tempfile.TemporaryDirectory() as tmp:
        path = write_gif(clips, Path(tmp) / "show.gif", fps, cell=clips.shape[3] * scale)
        data = base64.b64encode(path.read_bytes()).decode()
    return HTML(f'<img src="data:image/gif;base64,{data}" style="image-rendering: pixelated"/>')


# ----------------------------------------------------------------------------- metrics


def evaluate_clips(clips: np.ndarray, captions: list[str], probe: bool = True) -> dict:
    """Metrics of generated clips that need no extra weights: the demo caption probe."""
    from dit_video.eval.probe import caption_faithfulness

    out = {}
    if probe:
        report = caption_faithfulness(clips, captions)
        out["probe"] = {k: v for k, v in report.items() if k != "per_clip"}
    return out
