"""Evaluation while training: samples, held-out loss against t, throughput/MFU and memory.

Three Lightning callbacks, configured by conf/eval/*.yaml (`eval=` on the command line) and
added by `dit_video.run.build_trainer` through `build_eval_callbacks` (each in its own module):

  InTrainingSamples  (samples.py) every N steps sample a fixed prompt set with fixed seeds. The prompts are
                     split across ranks (prompt i on rank i mod world_size: every rank works,
                     none waits on rank 0, each prompt is sampled exactly once) and gathered;
                     rank 0 writes them to <run_dir>/samples/step-NNNNNNN/ (provenance-marked),
                     logs them to wandb/TensorBoard, and logs the demo caption probe score.
  ValidationLoss     (val_loss.py) every N steps the loss on held-out shards with fixed noise, overall and per
                     t bucket (`val/loss`, `val/loss_t0-0.1`, ...), reduced over ranks.
  Throughput         (throughput.py) samples/s, video tokens/s, achieved TFLOP/s per device and MFU, from the
                     DiT's exact FLOP count (dit_video.model.flops) and the device's peak: the
                     A100/H100/H200 dense bf16 table, or on CPU a GEMM rate measured at start;
                     plus peak memory (CUDA allocator or process RSS).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from omegaconf import OmegaConf

from dit_video.build import dataclass_from
from dit_video.eval.samples import InTrainingSamples, SamplesConfig
from dit_video.eval.throughput import Throughput, ThroughputConfig
from dit_video.eval.val_loss import ValidationLoss, ValLossConfig


def build_eval_callbacks(cfg, run_dir: Path) -> list[L.Callback]:
    """The callbacks `cfg.eval` asks for (DiT runs only; none if the config has no `eval` group)."""
    if cfg.get("task") != "dit" or cfg.get("eval") is None:
        return []
    node = OmegaConf.to_container(cfg.eval, resolve=True)
    samples = dataclass_from(SamplesConfig, node.get("samples") or {}, "eval.samples")
    val = dataclass_from(ValLossConfig, node.get("val_loss") or {}, "eval.val_loss")
    throughput = dataclass_from(ThroughputConfig, node.get("throughput") or {}, "eval.throughput")
    out = []
    if samples.every_n_steps > 0:
        out.append(InTrainingSamples(samples, Path(run_dir)))
    if val.every_n_steps > 0:
        out.append(ValidationLoss(val))
    if throughput.enabled:
        out.append(Throughput(throughput))
    return out
