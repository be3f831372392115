"""Before launching: what an experiment costs. Params, tokens, FLOPs and memory per GPU.

    python -m dit_video.preflight +experiment=dit_256 [--bucket 65x256x256 ...] [--text-dim 4096]

Composes the experiment exactly as train.py does (conf/ + Hydra overrides), builds the DiTConfig
with `dit_video.build.build_dit_config`, counts parameters on the meta device (no memory), and
prints per bucket (frames x H x W of the clips; default: the data config's size):
tokens per sample, training FLOPs per step (dit_video.model.flops), and estimated memory per GPU
for DDP / ZeRO-2 / ZeRO-3 / FSDP, with and without per-block activation checkpointing.

The memory model (simple on purpose; real runs add allocator slack and temporary buffers, so keep
~20% headroom):
- training state, mixed precision with float32 master weights (Lightning bf16-mixed, DeepSpeed
  bf16 with fp32 master): weights 4 B/param, gradients 4 B/param, AdamW exp_avg + exp_avg_sq
  8 B/param, EMA copy 4 B/param (the DiT module keeps one).
  DDP replicates all of it. ZeRO-2 shards gradients and optimizer state over the W ranks.
  ZeRO-3 and FSDP shard everything (weights, grads, optimizer, EMA) and add the working set of
  gathered weights: two blocks (the current one and the prefetched next) in float32 for ZeRO-3,
  in bf16 for FSDP2 with a bf16 param_dtype, plus that block's unsharded gradient.
- activations: what autograd saves per block per token, measured with saved-tensor hooks on this
  block design (torch 2.13, with the fused norm/RoPE Functions of model/fused.py): ~103 B x D under
  fp32, ~57 B x D under bf16 autocast (bf16 GEMM inputs, fp32 residual stream), both at mlp_ratio 4 and scaled by
  (D + F) / 5D for other ratios. Attention saves O(N) (flash kernels keep the output and the
  log-sum-exp, never the N x N matrix). With checkpointing per block only each block's float32
  input stays (4 B x D per token per block), plus one block's activations during its recompute.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from dit_video.build import build_dit_config
from dit_video.data.balance import CostModel
from dit_video.data.buckets import make_buckets
from dit_video.model import DiT
from dit_video.model.flops import dit_flops

CONF = Path(__file__).resolve().parents[1] / "conf"
# The text encoders the configs name (conf/text_encoder/*.yaml give name and max_length, not width).
# Widths of the text encoders conf/text_encoder/ names (the weights are not read for an estimate).
TEXT_DIMS = {
    "t5-v1_1-xxl": 4096, "umt5-xxl": 4096, "all-minilm-l6-v2": 384, "clip-vit-large-patch14": 768,
    "llava-llama-3-8b": 4096, "t5-v1_1-xxl+clip-vit-large-patch14": 4096,
}
# Saved activation bytes per token per block, in units of hidden_size, at mlp_ratio 4 (module docstring).
ACT_BYTES_PER_D = {"fp32": 103.0, "bf16": 57.0}
STRATEGIES = ("DDP", "ZeRO-2", "ZeRO-3", "FSDP")
GiB = 1024**3


@dataclass
class MemoryEstimate:
    """Bytes per GPU: persistent training state and the activation peak."""

    params: float  # weights (fp32 master), plus gathered working set for ZeRO-3/FSDP
    grads: float  # gradients
    optimizer: float  # AdamW moments
    ema: float  # EMA copy of the weights
    activations: float  # saved activations of one micro-batch

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.ema + self.activations


def activation_bytes(cfg, tokens: int, batch: int, precision: str, checkpointing: bool) -> float:
    """Saved-activation bytes of one micro-batch of `batch` samples with `tokens` video tokens each."""
    D, F = cfg.hidden_size, int(cfg.hidden_size * cfg.mlp_ratio)
    per_block = ACT_BYTES_PER_D[precision] * (D + F) / (5 * D) * D * tokens * batch
    if checkpointing:
        return cfg.depth * 4 * D * tokens * batch + per_block
    return cfg.depth * per_block


def memory_per_gpu(
    cfg, n_params: int, block_params: int, world: int, strategy: str, act: float
) -> MemoryEstimate:
    """The memory model of the module docstring for one strategy on `world` ranks."""
    P = float(n_params)
    if strategy == "DDP":
        return MemoryEstimate(4 * P, 4 * P, 8 * P, 4 * P, act)
    if strategy == "ZeRO-2":
        return MemoryEstimate(4 * P, 4 * P / world, 8 * P / world, 4 * P, act)
    gathered = 2 * block_params * (4 if strategy == "ZeRO-3" else 2)  # two unsharded blocks
    unsharded_grad = block_params * 4
    return MemoryEstimate(4 * P / world + gathered, 4 * P / world + unsharded_grad, 8 * P / world, 4 * P / world, act)


def parse_bucket(text: str) -> tuple[int, int, int]:
    try:
        frames, height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--bucket {text!r}: write FRAMESxHEIGHTxWIDTH, e.g. 33x256x256") from None
    return frames, height, width


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Params, tokens, FLOPs and memory per GPU of an experiment.")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. +experiment=dit_256")
    parser.add_argument("--bucket", action="append", default=[], help="FRAMESxHxW of clips (repeatable)")
    parser.add_argument("--text-dim", type=int, default=None, help="text encoder width (default: by name)")
    args = parser.parse_args(argv)

    from hydra import compose, initialize_config_dir


    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=list(args.overrides))
    if cfg.task != "dit":
        raise SystemExit(f"task={cfg.task!r}: preflight estimates DiT runs (task=dit)")
    text_name = str(cfg.text_encoder.name)
    text_dim = args.text_dim or TEXT_DIMS.get(text_name)
    if text_dim is None:
        raise SystemExit(f"text_encoder.name={text_name!r} has no known width; pass --text-dim")
    if "encoders" in cfg.text_encoder:  # concatenated encoders: the sequence parts' tokens add up
        text_len = sum(int(p.max_length) for p in cfg.text_encoder.encoders if p.get("sequence", True))
    else:
        text_len = int(cfg.text_encoder.max_length)
    dit_cfg = build_dit_config(cfg.model, in_channels=int(cfg.vae.latent_channels), text_dim=text_dim)
    dit_cfg.validate()
    with torch.device("meta"):
        model = DiT(dit_cfg)
    n_params = sum(p.numel() for p in model.parameters())
    block_params = sum(p.numel() for p in model.blocks[0].parameters())

    batch = int(cfg.data.batch_size)
    world = int(cfg.trainer.get("devices", 1) if isinstance(cfg.trainer.get("devices", 1), int) else 1)
    world *= int(cfg.trainer.get("num_nodes", 1))
    precision = "bf16" if "bf16" in str(cfg.trainer.get("precision", "32")) else "fp32"
    tf, sf = int(cfg.vae.temporal_factor), int(cfg.vae.spatial_factor)
    buckets = [parse_bucket(b) for b in args.bucket] or [(int(cfg.data.num_frames), *map(int, cfg.data.size))]

    print(f"run {cfg.name}: model {cfg.model.preset}, {n_params / 1e6:.1f}M parameters "
          f"({block_params / 1e6:.2f}M per block x {dit_cfg.depth})")
    print(f"  {world} GPU(s), {batch} samples per GPU, {precision} activations, "
          f"{text_len} text tokens of width {text_dim}")
    for frames, height, width in buckets:
        latent = (1 + (frames - 1) // tf, height // sf, width // sf)
        dit_cfg.validate(latent)
        tokens = math.prod(dit_cfg.grid(latent))
        fc = dit_flops(dit_cfg, latent, text_len)
        step_flops = fc.training * batch * world
        print(f"\nbucket {frames}x{height}x{width} -> latents {latent} -> {tokens} tokens per sample")
        print(f"  training FLOPs: {fc.training / 1e12:.2f} TFLOP per sample, {step_flops / 1e15:.3f} PFLOP "
              f"per step ({batch} x {world} samples); attention {100 * fc.attention / fc.forward:.0f}% of forward")
        print(f"  {'memory per GPU (GiB)':<24} {'params':>7} {'grads':>7} {'optim':>7} {'ema':>7} "
              f"{'activ.':>7} {'total':>7}")
        for ckpt in (False, True):
            act = activation_bytes(dit_cfg, tokens, batch, precision, ckpt)
            for strategy in STRATEGIES:
                m = memory_per_gpu(dit_cfg, n_params, block_params, world, strategy, act)
                label = f"{strategy}{' + ckpt' if ckpt else ''}"
                print(f"  {label:<24} {m.params / GiB:7.2f} {m.grads / GiB:7.2f} {m.optimizer / GiB:7.2f} "
                      f"{m.ema / GiB:7.2f} {m.activations / GiB:7.2f} {m.total / GiB:7.2f}")

    print_clip_costs(cfg, dit_cfg, text_len, tf, sf, buckets)


def print_clip_costs(cfg, dit_cfg, text_len: int, tf: int, sf: int, shapes: list[tuple[int, int, int]]) -> None:
    """The cost model data.balance plans with (dit_video/data/balance.py): per clip shape, linear and
    attention training FLOPs; per bucket of data.buckets, a batch's cost against the others'."""
    cost = CostModel(dit_cfg, lambda t, h, w: (1 + (t - 1) // tf, h // sf, w // sf), text_len)
    print("\nclip cost (data.balance plans with it): TFLOP per training sample")
    for frames, height, width in shapes:
        c = cost(frames, height, width)
        print(f"  {frames}x{height}x{width}: {c.tokens} tokens, linear {c.linear / 1e12:.2f} + attention "
              f"{c.attention / 1e12:.2f} = {c.flops / 1e12:.2f}")
    if cfg.data.get("buckets"):
        buckets = make_buckets(OmegaConf.to_container(cfg.data.buckets, resolve=True), cfg.data.get("bucket_budget"))
        batch = [b.batch_size * cost(b.num_frames, b.height, b.width).flops for b in buckets]
        print(f"  data.buckets: a batch's cost and its ratio to the mean (steps that mix them leave ranks idle; "
              f"data.balance={cfg.data.get('balance', True)}: true groups batches of like cost)")
        for b, flops in zip(buckets, batch, strict=True):
            print(f"    {b.num_frames}x{b.height}x{b.width} x{b.batch_size}: {flops / 1e12:.1f} TFLOP, "
                  f"{flops / (sum(batch) / len(batch)):.2f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
