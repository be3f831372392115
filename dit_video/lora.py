"""LoRA fine-tuning of a built DiT through peft, from the outside (the model code never sees it).

`apply_lora(dit, cfg)` injects peft's LoRA layers into the Linear layers named by
`lora.target_modules` and freezes everything else: the DiT's frozen weights (`base`) stay bitwise
what `init_from=` loaded, and only the adapters (`*.lora_A.default.weight` [r, in] and
`*.lora_B.default.weight` [out, r]) train, are optimised and are checkpointed. A LoRA'd Linear
computes W x + b + (alpha / r) * B A x (peft's `lora.Linear`, rsLoRA off), so merging is
W' = W + (alpha / r) * B A (`merge_lora`, exact up to float rounding).

The adapters leave in two forms:
  merged        `merge_lora`: a plain DiT state dict, what sampling and `export --format diffusers` use;
  diffusers     `diffusers_lora_state`: `transformer.blocks.{i}.attn1.to_q.lora_A.weight` ... as
                `WanPipeline.load_lora_weights` reads them (diffusers' own PEFT format). Our fused
                projections split row-wise (qkv -> to_q/to_k/to_v, kv -> to_k/to_v): each part keeps
                the shared A and its rows of B, which is exactly the same update; RoPE'd q/k rows take
                the converter's pair permutation (convert/wan.py). diffusers assumes alpha = rank when
                a file carries no alphas, so the scale alpha / r is folded into B.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from dit_video.convert import load_dit_weights
from dit_video.convert.wan import dit_to_wan_tensor, wan_names
from dit_video.errors import CheckpointError
from dit_video.files import sha256_file
from dit_video.model import DiTConfig

ADAPTER = "default"  # peft's adapter name; one adapter per run
# Every Linear of a cross-attention DiT block, named as in dit_video/model/blocks.py: diffusers' Wan
# LoRAs (finetrainers, musubi-tuner, DiffSynth) adapt the same projections (attn1/attn2 q, k, v, out; ffn).
BLOCK_LINEARS = ("attn.qkv", "attn.proj", "cross_attn.q", "cross_attn.kv", "cross_attn.proj", "mlp.fc1", "mlp.fc2")
_ADAPTER_KEY = re.compile(rf"^(?P<layer>.+)\.lora_(?P<ab>[AB])\.{ADAPTER}\.weight$")


@dataclass
class LoRAConfig:
    rank: int = 16  # r: adapter width; memory and capacity grow with it (Wan LoRAs: 16-128)
    alpha: float = 16.0  # the update is scaled by alpha / rank (alpha = rank: scale 1)
    dropout: float = 0.0  # dropout on the adapter's input, training only
    target_modules: tuple[str, ...] = BLOCK_LINEARS  # Linear layers to adapt, as suffixes of module names

    def validate(self) -> LoRAConfig:
        if self.rank < 1:
            raise ValueError(f"lora.rank={self.rank} must be >= 1 (set lora=null to fine-tune every weight)")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha={self.alpha} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout={self.dropout} must be in [0, 1)")
        if not self.target_modules:
            raise ValueError("lora.target_modules is empty: name the Linear layers to adapt, e.g. "
                             f"{list(BLOCK_LINEARS)}")
        return self

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return {**asdict(self), "target_modules": list(self.target_modules)}


def apply_lora(dit: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Inject peft LoRA layers into `dit` (in place) and freeze all but the adapters; returns `dit`.

    The frozen base weights keep their tensors (peft moves each Linear under `.base_layer`), so load
    `init_from` weights before this call. ValueError naming lora.target_modules if one matches nothing."""
    from peft import LoraConfig, inject_adapter_in_model  # optional dependency: only LoRA runs need it

    linears = {name for name, m in dit.named_modules() if isinstance(m, nn.Linear)}
    for target in cfg.target_modules:
        if not any(name == target or name.endswith("." + target) for name in linears):
            raise ValueError(f"lora.target_modules: {target!r} names no Linear layer of this DiT "
                             f"(block Linears: {list(BLOCK_LINEARS)})")
    peft_cfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=list(cfg.target_modules), bias="none")
    inject_adapter_in_model(peft_cfg, dit, adapter_name=ADAPTER)
    for name, param in dit.named_parameters():
        param.requires_grad_(is_adapter_key(name))
    return dit


def is_adapter_key(key: str) -> bool:
    return _ADAPTER_KEY.match(key) is not None


def base_key(peft_key: str) -> str:
    """A peft-wrapped model's name for a base tensor -> the plain DiT's (`x.base_layer.weight` -> `x.weight`)."""
    return peft_key.replace(".base_layer.", ".")


def adapter_pairs(adapters: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer name: (A [r, in], B [out, r])} from adapter tensors keyed as in the peft-wrapped DiT."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in adapters.items():
        match = _ADAPTER_KEY.match(key)
        if match is None:
            raise KeyError(f"'{key}' is not a LoRA adapter tensor (*.lora_A/B.{ADAPTER}.weight)")
        found.setdefault(match["layer"], {})[match["ab"]] = tensor
    incomplete = sorted(layer for layer, ab in found.items() if set(ab) != {"A", "B"})
    if incomplete:
        raise KeyError(f"LoRA layer '{incomplete[0]}' has only one of lora_A/lora_B")
    return {layer: (ab["A"], ab["B"]) for layer, ab in found.items()}


@torch.no_grad()
def merge_lora(base: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """Plain DiT state dict with every adapted Linear's weight W + scale * B A (fp32 math, base dtype kept).

    base: the plain DiT's state dict (keys `blocks.0.attn.qkv.weight`); adapters as apply_lora names them."""
    merged = dict(base)
    for layer, (A, B) in adapter_pairs(adapters).items():
        key = f"{layer}.weight"
        if key not in base:
            raise KeyError(f"LoRA layer '{layer}' has no base weight '{key}'")
        W = base[key]
        merged[key] = (W.float() + scale * (B.float() @ A.float())).to(W.dtype)  # [out, in]
    return merged


def diffusers_lora_state(adapters: dict[str, torch.Tensor], scale: float, cfg: DiTConfig) -> dict[str, torch.Tensor]:
    """Adapters -> diffusers' Wan LoRA keys (`transformer.<Wan module>.lora_A.weight` / `.lora_B.weight`),
    scale folded into B. Only Linear layers that map row-wise onto Wan Linears convert; others raise
    KeyError naming the layer (adapt block Linears only for a diffusers LoRA)."""
    names = wan_names(cfg)
    out: dict[str, torch.Tensor] = {}
    for layer, (A, B) in adapter_pairs(adapters).items():
        key = f"{layer}.weight"
        if not layer.startswith("blocks.") or key not in names:
            raise KeyError(f"LoRA layer '{layer}' has no diffusers Wan counterpart: adapt only block Linears "
                           f"({', '.join(BLOCK_LINEARS)}) to export a diffusers LoRA")
        for wan_key, B_part in dit_to_wan_tensor(key, names[key], B.float() * scale, cfg).items():
            module = "transformer." + wan_key[: -len(".weight")]
            out[f"{module}.lora_A.weight"] = A.float().clone()  # [r, in]: each fused part its own copy of the shared A
            out[f"{module}.lora_B.weight"] = B_part  # [out_part, r]
    return out


def checkpoint_dit_state(state_dict: dict[str, torch.Tensor], meta: dict, prefix: str,
                         base: str | Path | None = None) -> dict[str, torch.Tensor]:
    """A LoRA run's checkpoint -> the plain (merged) DiT state dict of its `prefix` ("dit." or "ema.")
    adapters on the frozen weights it trained on: meta["lora"]["base"], or `base` when that file moved.
    CheckpointError when the base file is missing or is not the one the run trained on (sha256)."""
    lora = meta["lora"]
    path = Path(base if base is not None else lora["base"])
    if not path.is_file():
        raise CheckpointError(f"LoRA checkpoint: its frozen weights '{path}' (init_from of the run) are missing; "
                              "pass base=PATH of that file")
    if sha256_file(path) != lora["base_sha256"]:
        raise CheckpointError(f"LoRA checkpoint: '{path}' is not the file the adapters were trained on "
                              f"(sha256 differs from {lora['base_sha256'][:12]}...)")
    _, base_state, _ = load_dit_weights(path)
    adapters = checkpoint_adapters(state_dict, prefix)
    if not adapters:
        raise CheckpointError(f"LoRA checkpoint holds no '{prefix}*' adapters")
    return merge_lora(base_state, adapters, lora["alpha"] / lora["rank"])


def checkpoint_adapters(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The `prefix` adapters of a LoRA run's checkpoint, keyed as in the peft-wrapped DiT."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix) and is_adapter_key(k)}
