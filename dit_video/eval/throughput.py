"""Throughput while training: samples/s, video tokens/s, TFLOP/s per device, MFU, peak memory, and
how evenly the data plan loads the ranks (perf/rank_imbalance, perf/pad_fraction).

FLOPs come from the DiT's exact count (dit_video.model.flops); the peak is the A100/H100/H200
dense bf16 datasheet figure, or on CPU a GEMM rate measured at the start of the run. The rank
balance comes from the loader's plan (data/balance.py): every rank knows every rank's planned
cost for the step, so rank 0 logs it without a collective. throughput_summary reads these columns
back from a run's metrics.csv for the evaluate report.
"""

from __future__ import annotations

import logging
import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch

from dit_video.callbacks import log_scalars
from dit_video.model import DiTConfig
from dit_video.model.flops import dit_flops
from dit_video.plots import read_metrics

log = logging.getLogger("dit_video")

# Dense bf16 peak TFLOP/s per GPU (vendor datasheets; SXM parts; no 2:4 sparsity).
PEAK_TFLOPS_BF16 = {"A100": 312.0, "H100": 989.0, "H200": 989.0}


@dataclass
class ThroughputConfig:
    enabled: bool = True
    log_every_n_steps: int = 10  # average over this many steps per logged value
    peak_tflops: float | None = None  # override the per-device peak (TFLOP/s); None = table or measured


def measure_cpu_matmul_tflops(dtype: torch.dtype = torch.float32, n: int = 1024, reps: int = 4) -> float:
    """Achieved TFLOP/s of an n x n x n matmul on this CPU with the current thread count (best of reps)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    best = math.inf
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12


def peak_tflops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> tuple[float, str]:
    """(peak TFLOP/s per device, where the number comes from) for MFU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for gpu, tflops in PEAK_TFLOPS_BF16.items():
            if gpu in name:
                return tflops, f"{gpu} dense bf16 datasheet"
        return math.nan, f"unknown GPU {name!r}: set eval.throughput.peak_tflops"
    return measure_cpu_matmul_tflops(dtype), f"measured CPU {str(dtype).removeprefix('torch.')} GEMM"


def memory_gb(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"mem/max_allocated_gb": torch.cuda.max_memory_allocated(device) / 1e9}
    return {"mem/max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}  # KiB on Linux


class Throughput(L.Callback):
    """samples/s, tokens/s, TFLOP/s, MFU and peak memory, averaged over `log_every_n_steps` steps.

    Step time is wall time between consecutive batch ends (data loading included: what the run
    actually achieves). FLOPs are the DiT's training FLOPs from `dit_flops` (frozen VAE and
    text encoder excluded, recompute excluded), the convention MFU numbers use.
    perf/rank_imbalance (max over ranks of the step's planned cost / mean - 1) and perf/pad_fraction
    (token slots of the step's batches without a clip) are the loader's per-step plan figures
    (batch["rank_imbalance"], batch["pad_fraction"]), averaged over the same steps.
    """

    def __init__(self, cfg: ThroughputConfig):
        self.cfg = cfg
        self.flops_per_sample = self.tokens_per_sample = None  # at the run's nominal latent shape (logged once)
        self.peak = math.nan
        self.last = None
        self.window_time, self.window_samples, self.window_tokens, self.window_flops = 0.0, 0, 0, 0.0
        self._cost: dict[tuple[int, int, int], tuple[int, float]] = {}  # latent shape -> (tokens, FLOPs)
        self.window_plan: list[tuple[float, float]] = []  # (rank_imbalance, pad_fraction) of each step

    def on_fit_start(self, trainer, pl_module) -> None:
        self.dit_cfg = DiTConfig.from_dict(pl_module.meta["dit_config"])
        self.text_len = int(getattr(pl_module.text_encoder, "max_length", 0) or 0)
        self.tokens_per_sample, self.flops_per_sample = self.cost(tuple(pl_module.meta["latent_shape"]))
        precision = str(trainer.precision)
        dtype = torch.bfloat16 if "bf16" in precision else torch.float32
        if self.cfg.peak_tflops:
            self.peak, source = float(self.cfg.peak_tflops), "configured"
        else:
            self.peak, source = peak_tflops(pl_module.device, dtype)
        if trainer.is_global_zero:
            log.info("throughput: %.3g GFLOP per training sample, %d tokens; peak %.3g TFLOP/s per device (%s)",
                     self.flops_per_sample / 1e9, self.tokens_per_sample, self.peak, source)

    def cost(self, latent_shape: tuple[int, int, int]) -> tuple[int, float]:
        """(tokens, training FLOPs) of one sample with latents of this (T', H', W')."""
        if latent_shape not in self._cost:
            tokens = math.prod(self.dit_cfg.grid(latent_shape))
            self._cost[latent_shape] = (tokens, dit_flops(self.dit_cfg, latent_shape, self.text_len).training)
        return self._cost[latent_shape]

    def batch_cost(self, batch, pl_module) -> tuple[int, int, float]:
        """(samples, tokens, FLOPs) of this rank's batch at its real shapes: buckets, 1-frame image
        batches and packed batches cost what they cost, not the nominal clip's FLOPs."""
        if "latents" in batch:  # data=latents: [B, C, T', H', W']
            shapes = [tuple(batch["latents"].shape[2:])] * batch["latents"].shape[0]
        elif isinstance(batch["clip"], list):  # packed: clips [T, H, W, 3] of mixed shapes
            shapes = [tuple(pl_module.vae.latent_shape(*clip.shape[:3])) for clip in batch["clip"]]
        else:  # uint8 clips [B, T, H, W, 3], one shape
            shapes = [tuple(pl_module.vae.latent_shape(*batch["clip"].shape[1:4]))] * batch["clip"].shape[0]
        costs = [self.cost(shape) for shape in shapes]
        return len(shapes), sum(c[0] for c in costs), sum(c[1] for c in costs)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if "rank_imbalance" in batch:  # the plan's figures are not timings: the first step counts too
            self.window_plan.append((float(batch["rank_imbalance"]), float(batch["pad_fraction"])))
        if self.last is not None:  # the first step (compile, warm-up) is not timed
            samples, tokens, flops = self.batch_cost(batch, pl_module)
            # ranks of one sequence-parallel group share a batch: count it once per group
            sp = _group_size(getattr(pl_module, "sequence_group", None))
            replicas = trainer.world_size // sp
            self.window_time += now - self.last
            self.window_samples += samples * replicas
            self.window_tokens += tokens * replicas
            self.window_flops += flops * replicas
        self.last = now
        if trainer.global_step % self.cfg.log_every_n_steps != 0 or self.window_time == 0:
            return
        tflops = self.window_flops / self.window_time / trainer.world_size / 1e12  # per device
        metrics = {
            "perf/samples_per_sec": self.window_samples / self.window_time,
            "perf/tokens_per_sec": self.window_tokens / self.window_time,
            "perf/tflops_per_device": tflops,
            "perf/mfu": tflops / self.peak if self.peak > 0 else math.nan,
            **memory_gb(pl_module.device),
        }
        if self.window_plan:
            imbalance, pad = (sum(v) / len(self.window_plan) for v in zip(*self.window_plan, strict=True))
            metrics |= {"perf/rank_imbalance": imbalance, "perf/pad_fraction": pad}
        self.window_time, self.window_samples, self.window_tokens, self.window_flops = 0.0, 0, 0, 0.0
        self.window_plan = []
        log_scalars(trainer, metrics)


def _group_size(group) -> int:
    return 1 if group is None else torch.distributed.get_world_size(group)


# perf/ columns of metrics.csv shown by the evaluate report, with their labels.
SUMMARY_KEYS = {
    "perf/samples_per_sec": "samples/s",
    "perf/tflops_per_device": "TFLOP/s per device",
    "perf/mfu": "MFU",
    "perf/rank_imbalance": "rank imbalance (max rank cost / mean - 1)",
    "perf/pad_fraction": "pad fraction (batch slots without a clip)",
}


def throughput_summary(metrics_csv: Path) -> dict[str, dict[str, float]]:
    """{key: {"mean", "last", "count"}} of the SUMMARY_KEYS a run logged to its metrics.csv ({} when
    the file or the columns are missing)."""
    if not Path(metrics_csv).is_file():
        return {}
    metrics = read_metrics(Path(metrics_csv))
    out = {}
    for key in SUMMARY_KEYS:
        values = metrics.get(key, ([], []))[1]
        if values:
            out[key] = {"mean": sum(values) / len(values), "last": values[-1], "count": len(values)}
    return out


def throughput_markdown(summary: dict[str, dict[str, float]]) -> list[str]:
    """Markdown lines of a throughput_summary: one row per logged metric (none when empty)."""
    if not summary:
        return []
    lines = ["", "Training throughput (the run's metrics.csv):", "", "| metric | mean | last | logged |", "|---|---|---|---|"]
    for key, label in SUMMARY_KEYS.items():
        if key in summary:
            row = summary[key]
            lines.append(f"| {label} | {row['mean']:.4g} | {row['last']:.4g} | {row['count']} |")
    return lines
