"""Before launching: what an experiment costs. Params, tokens, FLOPs and memory per GPU.

    python -m dit_video.preflight +experiment=dit_256 [--bucket 65x256x256 ...] [--text-dim 4096]

Composes the experiment exactly as train.py does (conf/ + Hydra overrides), builds the DiTConfig
with `dit_video.build.build_dit_config`, counts parameters on the meta device (no memory) for the
DiT, the frozen VAE and the frozen text encoder(s), and prints per bucket (frames x H x W of the
clips; default: the data config's size): tokens per sample, training FLOPs per step
(dit_video.model.flops), and estimated memory per GPU for DDP / ZeRO-2 / ZeRO-3 / FSDP, with and
without per-block activation checkpointing.

The memory model (simple on purpose; real runs add allocator slack and temporary buffers, so keep
~20% headroom):
- training state, mixed precision with float32 master weights (Lightning bf16-mixed, DeepSpeed
  bf16 with fp32 master): weights 4 B/param, gradients 4 B/param, AdamW exp_avg + exp_avg_sq
  8 B/param, EMA copy 4 B/param (the DiT module keeps one).
  DDP replicates all of it. ZeRO-2 shards gradients and optimizer state over the W ranks.
  ZeRO-3 and FSDP shard everything (weights, grads, optimizer, EMA) and add the working set of
  gathered weights: two blocks (the current one and the prefetched next) in float32 for ZeRO-3,
  in bf16 for FSDP2 with a bf16 param_dtype, plus that block's unsharded gradient.
- DDP gradient buckets: torch DDP reduces gradients through flat bucket buffers of its own (Lightning
  leaves gradient_as_bucket_view off): a second float32 copy of every trainable gradient, 4 B/param.
- autocast weight cache (DDP under bf16-mixed): autocast keeps the bf16 copy of every float32
  weight a matmul or conv reads until the step's autocast region ends: 2 B per Linear/Conv
  parameter. FSDP2 all-gathers bf16 weights and DeepSpeed runs a bf16 module: nothing to cache.
- frozen encoders, whole on every rank whatever the strategy (they are outside the module tree):
  the text encoder(s) in their configured dtype (T5-XXL: 4.8B params, ~8.9 GiB in bf16) and the
  VAE in float32. Their architecture comes from config.json / vae.json when the weights are there,
  else from the known architectures below (the weights are never read).
- VAE encode peak (data=clips; the frozen VAE encodes every batch on the GPU before the DiT runs,
  so the peak is the larger of the two phases): 3 x the largest feature map of the encoder in
  float32 (a conv's input, its causally padded copy and its output), per tile/chunk with vae.tiling.
  Only for our causal VAE; pretrained diffusers VAEs are not estimated.
- activations: what autograd saves per block per token, measured with saved-tensor hooks on this
  block design (torch 2.13, with the fused norm/RoPE Functions of model/fused.py): ~103 B x D under
  fp32, ~57 B x D under bf16 autocast (bf16 GEMM inputs, fp32 residual stream), both at mlp_ratio 4 and scaled by
  (D + F) / 5D for other ratios. Attention saves O(N) (flash kernels keep the output and the
  log-sum-exp, never the N x N matrix). With checkpointing per block only each block's float32
  input stays (4 B x D per token per block), plus one block's activations during its recompute.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from dit_video.build import build_dit_config, dataclass_from
from dit_video.data.balance import CostModel
from dit_video.data.buckets import make_buckets
from dit_video.encoders.causal_vae import CausalVAE, CausalVAEConfig
from dit_video.encoders.text import detect_kind, model_class
from dit_video.lora import LoRAConfig
from dit_video.model import DiT
from dit_video.model.flops import dit_flops

CONF = Path(__file__).resolve().parents[1] / "conf"
# Widths of the text encoders conf/text_encoder/ names (the weights are not read for an estimate).
TEXT_DIMS = {
    "t5-v1_1-xxl": 4096, "umt5-xxl": 4096, "all-minilm-l6-v2": 384, "clip-vit-large-patch14": 768,
    "llava-llama-3-8b": 4096, "t5-v1_1-xxl+clip-vit-large-patch14": 4096,
}
# Architectures (Hugging Face config class, fields) of the text encoders conf/text_encoder/ names,
# from their published config.json files: used when text_encoder.path holds no config.json yet.
TEXT_ARCHITECTURES = {
    "t5-v1_1-xxl": ("T5Config", dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                     num_heads=64, feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
    "umt5-xxl": ("UMT5Config", dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                    num_heads=64, feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
    "clip-vit-large-patch14": ("CLIPTextConfig", dict(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                                      num_hidden_layers=12, num_attention_heads=12,
                                                      max_position_embeddings=77, projection_dim=768)),
    "llava-llama-3-8b": ("LlamaConfig", dict(vocab_size=128320, hidden_size=4096, intermediate_size=14336,
                                             num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8)),
}
_ARCH_KIND = {"T5Config": "t5", "UMT5Config": "umt5", "CLIPTextConfig": "clip", "LlamaConfig": "llm"}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Saved activation bytes per token per block, in units of hidden_size, at mlp_ratio 4 (module docstring).
ACT_BYTES_PER_D = {"fp32": 103.0, "bf16": 57.0}
VAE_ENCODE_COPIES = 3  # live copies of the largest feature map during the encode: input, padded input, output
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
    buckets: float = 0.0  # DDP's gradient bucket buffers
    autocast_cache: float = 0.0  # bf16 copies of the weights autocast keeps during the step
    frozen: float = 0.0  # frozen text encoder(s) and VAE weights
    vae_encode: float = 0.0  # the VAE encode's transient peak (before the DiT runs)

    @property
    def total(self) -> float:
        state = self.params + self.grads + self.optimizer + self.ema + self.buckets + self.frozen
        return state + max(self.activations + self.autocast_cache, self.vae_encode)


def activation_bytes(cfg, tokens: int, batch: int, precision: str, checkpointing: bool) -> float:
    """Saved-activation bytes of one micro-batch of `batch` samples with `tokens` video tokens each."""
    D, F = cfg.hidden_size, int(cfg.hidden_size * cfg.mlp_ratio)
    per_block = ACT_BYTES_PER_D[precision] * (D + F) / (5 * D) * D * tokens * batch
    if checkpointing:
        return cfg.depth * 4 * D * tokens * batch + per_block
    return cfg.depth * per_block


def memory_per_gpu(
    cfg, n_params: int, block_params: int, world: int, strategy: str, act: float, matmul_params: int = 0,
    precision: str = "bf16", frozen: float = 0.0, vae_encode: float = 0.0,
) -> MemoryEstimate:
    """The memory model of the module docstring for one strategy on `world` ranks (all parameters
    of the DiT are trained; matmul_params: those in its Linear/Conv layers)."""
    P = float(n_params)
    common = dict(frozen=frozen, vae_encode=vae_encode)
    if strategy == "DDP":
        cache = 2 * matmul_params if precision == "bf16" else 0
        return MemoryEstimate(4 * P, 4 * P, 8 * P, 4 * P, act, buckets=4 * P, autocast_cache=cache, **common)
    if strategy == "ZeRO-2":
        return MemoryEstimate(4 * P, 4 * P / world, 8 * P / world, 4 * P, act, **common)
    gathered = 2 * block_params * (4 if strategy == "ZeRO-3" else 2)  # two unsharded blocks
    unsharded_grad = block_params * 4
    return MemoryEstimate(4 * P / world + gathered, 4 * P / world + unsharded_grad, 8 * P / world, 4 * P / world, act,
                          **common)


def matmul_parameters(model: nn.Module) -> int:
    """Parameters of the Linear and Conv layers: the weights autocast casts to bf16 (and caches)."""
    layers = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return sum(p.numel() for m in model.modules() if isinstance(m, layers) for p in m.parameters(recurse=False))


def text_encoder_parts(node: dict) -> list[dict]:
    """The encoders a text_encoder config names (one, or each part of a concatenated one)."""
    return [dict(p) for p in node["encoders"]] if "encoders" in node else [dict(node)]


def text_encoder_params(part: dict) -> int:
    """Parameters of one frozen text encoder, built on the meta device from its config.json (when
    text_encoder.path has one) or from TEXT_ARCHITECTURES (the weights are never read)."""
    import transformers  # heavy: only when estimating

    path = Path(str(part.get("path")))
    if (path / "config.json").is_file():
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
        kind = part.get("kind", "auto")
        kind = detect_kind(path) if kind == "auto" else kind
    elif part.get("name") in TEXT_ARCHITECTURES:
        class_name, fields = TEXT_ARCHITECTURES[part["name"]]
        config, kind = getattr(transformers, class_name)(**fields), _ARCH_KIND[class_name]
    else:
        raise SystemExit(f"text_encoder.name={part.get('name')!r}: no config.json at {path} and no known "
                         f"architecture ({', '.join(TEXT_ARCHITECTURES)}); point text_encoder.path at the model")
    cls = model_class(kind, part.get("clip_pooled", "pooler"))
    with torch.device("meta"):
        model = cls.from_config(config) if cls is transformers.AutoModel else cls(config)
    return sum(p.numel() for p in model.parameters())


def text_encoder_bytes(node: dict) -> float:
    """Bytes of the frozen text encoder(s) on each GPU, in their configured dtype."""
    return float(sum(text_encoder_params(p) * DTYPE_BYTES[str(p.get("dtype", "float32"))]
                     for p in text_encoder_parts(node)))


def causal_vae_config(vae_node: dict) -> CausalVAEConfig | None:
    """The causal VAE's architecture: vae.path/vae.json when it exists, else the vae: fields;
    None for a pretrained (diffusers) VAE, which preflight does not estimate."""
    if vae_node.get("kind", "causal") != "causal":
        return None
    meta = Path(str(vae_node.get("path"))) / "vae.json"
    if meta.is_file():
        return CausalVAEConfig.from_dict(json.loads(meta.read_text())["config"], source=str(meta))
    fields = {k: v for k, v in vae_node.items() if k in CausalVAEConfig.__dataclass_fields__}
    return CausalVAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}).validate()


def vae_encode_bytes(vae: CausalVAEConfig, frames: int, height: int, width: int, batch: int,
                     tiling: dict | None = None) -> float:
    """The VAE encode's transient peak: VAE_ENCODE_COPIES x the largest encoder feature map, float32.
    Level i has width base_channels * channel_mult[i] at the resolution left by the downsamples
    before it (spatial /2 at the first log2(spatial_factor / patch_size) levels, temporal (T-1)/2 + 1
    at the first log2(temporal_factor)); level 0 is at (T, H/patch_size, W/patch_size)."""
    tiling = tiling or {}
    if tiling.get("tile_size"):
        height, width = min(height, tiling["tile_size"]), min(width, tiling["tile_size"])
    if tiling.get("chunk_frames"):
        frames = min(frames, tiling["chunk_frames"])
    t, h, w = frames, height // vae.patch_size, width // vae.patch_size
    largest = 0
    for i, mult in enumerate(vae.channel_mult):
        largest = max(largest, vae.base_channels * mult * t * h * w)
        if i < vae.num_spatial_downsamples:
            h, w = h // 2, w // 2
        if i < vae.num_temporal_downsamples:
            t = (t - 1) // 2 + 1
    return float(VAE_ENCODE_COPIES * 4 * largest * batch)


# Fine-tuning from converted weights (init_from): the GPU counts shown. Full fine-tuning trains every
# weight, so its rows are the FSDP + ckpt model above at each count; LoRA rows (`lora_memory`) train the
# adapters of the run's `lora:` (conf/lora/wan.yaml when the run has none) on the frozen base.
FINETUNE_GPUS = (1, 8)


def lora_parameters(model: nn.Module, lora: LoRAConfig) -> int:
    """Adapter parameters apply_lora adds to `model`: r x (in + out) per targeted Linear."""
    return sum(lora.rank * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and any(name == t or name.endswith("." + t) for t in lora.target_modules))


def lora_memory(n_params: int, block_params: int, adapters: int, block_adapters: int, world: int, act: float,
                frozen: float = 0.0, vae_encode: float = 0.0) -> MemoryEstimate:
    """FSDP2 + activation checkpointing with LoRA: the frozen base sharded in float32 with two blocks gathered
    in bf16, and no gradients, moments or EMA for it (ours keeps an EMA of the adapters only); the adapters
    cost what full fine-tuning costs per weight. Activations as full fine-tuning: backward still runs
    through every frozen layer to reach the adapters below it."""
    P, A = float(n_params), float(adapters)
    return MemoryEstimate(4 * P / world + 2 * 2 * block_params + 4 * A / world, 4 * A / world + 4 * block_adapters,
                          8 * A / world, 4 * A / world, act, frozen=frozen, vae_encode=vae_encode)


def finetune_rows(cfg, n_params: int, block_params: int, act: float, matmul_params: int = 0,
                  precision: str = "bf16", frozen: float = 0.0, vae_encode: float = 0.0,
                  lora: tuple[str, int, int] | None = None) -> list[tuple[str, MemoryEstimate]]:
    """(label, memory per GPU) for full fine-tuning and, given lora = (name, adapter params, adapter params
    per block), LoRA fine-tuning, with FSDP2 + activation checkpointing on FINETUNE_GPUS."""
    def gpus(world: int) -> str:
        return f"{world} GPU{'s' if world > 1 else ''}"

    rows = [(f"full, {gpus(world)}", memory_per_gpu(cfg, n_params, block_params, world, "FSDP", act, matmul_params,
                                                     precision, frozen, vae_encode)) for world in FINETUNE_GPUS]
    if lora is not None:
        name, adapters, block_adapters = lora
        rows += [(f"{name}, {gpus(world)}", lora_memory(n_params, block_params, adapters, block_adapters, world, act,
                                                         frozen, vae_encode)) for world in FINETUNE_GPUS]
    return rows


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
    matmul_params = matmul_parameters(model)
    lora = dataclass_from(LoRAConfig, cfg.lora if cfg.lora is not None else OmegaConf.load(CONF / "lora" / "wan.yaml"),
                          "lora").validate()
    adapters = lora_parameters(model, lora)
    lora_rows = (f"LoRA r{lora.rank}", adapters, lora_parameters(model.blocks[0], lora))
    lora_note = f"rank {lora.rank}, {adapters / 1e6:.1f}M adapter parameters"

    vae_node = OmegaConf.to_container(cfg.vae, resolve=True)
    vae_cfg = causal_vae_config(vae_node)
    if vae_cfg is not None:
        with torch.device("meta"):
            vae_params = sum(p.numel() for p in CausalVAE(vae_cfg).parameters())
    text_bytes = text_encoder_bytes(OmegaConf.to_container(cfg.text_encoder, resolve=True))
    frozen = text_bytes + (4 * vae_params if vae_cfg is not None else 0)
    encodes = cfg.data.get("kind", "clips") == "clips"  # a latent cache runs no VAE during training

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
    print(f"  frozen on every GPU: text encoder {text_name} {text_bytes / GiB:.2f} GiB, VAE "
          + (f"{vae_params / 1e6:.1f}M params {4 * vae_params / GiB:.2f} GiB" if vae_cfg is not None
             else f"vae.kind={vae_node.get('kind')} not estimated"))
    for frames, height, width in buckets:
        latent = (1 + (frames - 1) // tf, height // sf, width // sf)
        dit_cfg.validate(latent)
        tokens = math.prod(dit_cfg.grid(latent))
        fc = dit_flops(dit_cfg, latent, text_len)
        step_flops = fc.training * batch * world
        vae_peak = vae_encode_bytes(vae_cfg, frames, height, width, batch, vae_node.get("tiling")) \
            if vae_cfg is not None and encodes else 0.0
        print(f"\nbucket {frames}x{height}x{width} -> latents {latent} -> {tokens} tokens per sample")
        print(f"  training FLOPs: {fc.training / 1e12:.2f} TFLOP per sample, {step_flops / 1e15:.3f} PFLOP "
              f"per step ({batch} x {world} samples); attention {100 * fc.attention / fc.forward:.0f}% of forward")
        print(f"  {'memory per GPU (GiB)':<17} {'params':>7} {'grads':>7} {'optim':>7} {'ema':>7} {'bucket':>7} "
              f"{'frozen':>7} {'activ.':>7} {'cast':>7} {'vae-enc':>7} {'total':>7}")
        for ckpt in (False, True):
            act = activation_bytes(dit_cfg, tokens, batch, precision, ckpt)
            for strategy in STRATEGIES:
                m = memory_per_gpu(dit_cfg, n_params, block_params, world, strategy, act, matmul_params, precision,
                                   frozen, vae_peak)
                label = f"{strategy}{' + ckpt' if ckpt else ''}"
                print(f"  {label:<17} " + " ".join(f"{v / GiB:7.2f}" for v in (
                    m.params, m.grads, m.optimizer, m.ema, m.buckets, m.frozen, m.activations, m.autocast_cache,
                    m.vae_encode, m.total)))
        if cfg.init_from:  # fine-tuning converted weights: the counts people have (one GPU, one node)
            print(f"  fine-tuning init_from, FSDP2 + ckpt ({batch} sample(s) per GPU; LoRA: {lora_note})")
            act = activation_bytes(dit_cfg, tokens, batch, precision, True)
            for label, m in finetune_rows(dit_cfg, n_params, block_params, act, matmul_params, precision, frozen,
                                          vae_peak, lora_rows):
                print(f"  {label:<17} " + " ".join(f"{v / GiB:7.2f}" for v in (
                    m.params, m.grads, m.optimizer, m.ema, m.buckets, m.frozen, m.activations, m.autocast_cache,
                    m.vae_encode, m.total)))

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
