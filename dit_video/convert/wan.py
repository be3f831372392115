"""Wan 2.1/2.2 transformers <-> our DiT: the config and the weight names, both ways (pure functions).

diffusers' `WanTransformer3DModel` is our cross-attention DiT with the Wan layout of DiTConfig
(`WAN_LAYOUT` in dit_video/model/config.py): adaLN-single with per-block tables, QK RMSNorm over
all heads, an affine LayerNorm before cross-attention, a final shift/scale table added to the raw
timestep embedding, text zero-padded to 512 tokens and attended in full. Three things differ only
in how weights are laid out, and are fixed here, at conversion:

- RoPE pairs. Wan rotates channel pairs (2i, 2i+1) of a head; we rotate (i, i + hd/2) ("rotate-half",
  model/rope.py). Both take pair i's angle from the same (t, h, w) frequency list, so moving channel
  2i to i and 2i+1 to i + hd/2 in q's and k's projection rows (and in their norm weights) gives the
  same rotation; q.k sums over the same products, so attention is unchanged. v is not touched.
- Output patch order. Wan's proj_out emits each token's values as (pt, ph, pw, c), we as (c, pt, ph, pw).
- Fused projections. Our self-attention has one qkv Linear, cross-attention one kv Linear.

Anything else (image cross-attention of Wan 2.1 I2V/FLF2V, VACE, unknown config keys) is refused with
the name of the field: a model we cannot compute exactly is not converted approximately.
"""

from __future__ import annotations

import math
from dataclasses import asdict

import torch

from dit_video.errors import CheckpointError
from dit_video.model.config import WAN_LAYOUT, DiTConfig, wan_rope_axes_dim

WAN_CLASS = "WanTransformer3DModel"
# WanTransformer3DModel.__init__ arguments (diffusers 0.35-0.42) and the values we can compute.
WAN_CONFIG_KEYS = (
    "patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
    "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "qk_norm", "eps", "image_dim", "added_kv_proj_dim",
    "rope_max_seq_len", "pos_embed_seq_len",
)
# Keys diffusers writes into every config.json that say nothing about the architecture.
WAN_BOOKKEEPING = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")


def dit_config_from_wan(config: dict, text_len: int = 512, source: str = "config.json") -> DiTConfig:
    """A diffusers WanTransformer3DModel config.json (as a dict) -> the DiTConfig that computes it.

    text_len: the caption length Wan's pipeline pads to (`max_sequence_length`, 512 as trained).
    Raises CheckpointError naming the field for anything we cannot compute exactly.
    """
    def refuse(field: str, why: str) -> CheckpointError:
        return CheckpointError(f"{source}: {field}={config.get(field)!r} {why}")

    if config.get("_class_name", WAN_CLASS) != WAN_CLASS:
        raise refuse("_class_name", f"is not {WAN_CLASS} (VACE, Animate and other Wan variants are not supported)")
    unknown = sorted(set(config) - set(WAN_CONFIG_KEYS) - set(WAN_BOOKKEEPING))
    if unknown:
        raise CheckpointError(f"{source}: unknown field(s) {unknown}: a newer diffusers Wan option this converter "
                              "cannot map; convert with a diffusers version of the 0.35-0.42 layout")
    for field in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len"):
        if config.get(field) is not None:
            raise refuse(field, "is the image cross-attention of Wan I2V/FLF2V, not supported yet: convert a "
                                "text-to-video (T2V, or Wan 2.2 TI2V) transformer")
    if config.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
        raise refuse("qk_norm", "is not 'rms_norm_across_heads', the only QK norm WanAttention computes")
    heads, head_dim = int(config.get("num_attention_heads", 40)), int(config.get("attention_head_dim", 128))
    if head_dim % 2:
        raise refuse("attention_head_dim", "is odd; RoPE rotates channel pairs")
    hidden = heads * head_dim
    ffn_dim = int(config.get("ffn_dim", 13824))
    in_channels = int(config.get("in_channels", 16))
    out_channels = int(config.get("out_channels") or in_channels)
    return DiTConfig(**{
        **WAN_LAYOUT,
        "in_channels": in_channels,
        "text_dim": int(config.get("text_dim", 4096)),
        "out_channels": None if out_channels == in_channels else out_channels,  # None: our spelling of "same"
        "hidden_size": hidden,
        "depth": int(config.get("num_layers", 40)),
        "num_heads": heads,
        "mlp_ratio": mlp_ratio_for(ffn_dim, hidden),
        "patch_size": tuple(int(p) for p in config.get("patch_size", (1, 2, 2))),
        "rope_axes_dim": wan_rope_axes_dim(head_dim),
        "freq_dim": int(config.get("freq_dim", 256)),
        "norm_eps": float(config.get("eps", 1e-6)),
        "cross_attn_norm": bool(config.get("cross_attn_norm", True)),
        "text_len": text_len,
    })


def mlp_ratio_for(ffn_dim: int, hidden: int) -> float:
    """The float whose int(hidden * ratio) is exactly ffn_dim (ffn_dim / hidden, nudged if rounding undershoots)."""
    ratio = ffn_dim / hidden
    while int(hidden * ratio) < ffn_dim:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def wan_config_from_dit(cfg: DiTConfig, rope_max_seq_len: int = 1024) -> dict:
    """Our DiTConfig -> a WanTransformer3DModel config.json dict, for any model diffusers' Wan computes
    exactly; otherwise CheckpointError naming the model.* field and the value Wan needs."""
    head_dim = cfg.head_dim
    needed = {  # what WanTransformer3DModel hard-codes (its sizes, eps, freq_dim and cross_attn_norm are options)
        "conditioning": "cross_attn", "modulation": "adaln_single", "pos_embed": "rope", "pooled_text_dim": 0,
        "qk_norm": True, "qk_norm_across_heads": True, "final_modulation": "table", "rope_theta": 10000.0,
        "rope_scale": (1.0, 1.0, 1.0), "time_scale": 1000.0, "rope_axes_dim": wan_rope_axes_dim(head_dim),
    }
    for field, value in needed.items():
        if getattr(cfg, field) != value and not (field == "rope_axes_dim" and cfg.axes_dim == value):
            raise CheckpointError(
                f"model.{field}={getattr(cfg, field)!r} cannot be expressed as a diffusers WanTransformer3DModel, "
                f"which computes model.{field}={value!r} only"
            )
    if not cfg.text_len:
        raise CheckpointError(
            "model.text_len=0 (padded caption tokens masked) cannot be expressed as a diffusers WanTransformer3DModel, "
            "which attends to every caption position, zero-padded: train with model.text_len=N (Wan: 512)"
        )
    return {
        "_class_name": WAN_CLASS,
        "patch_size": list(cfg.patch_size),
        "num_attention_heads": cfg.num_heads,
        "attention_head_dim": head_dim,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_dim,
        "text_dim": cfg.text_dim,
        "freq_dim": cfg.freq_dim,
        "ffn_dim": int(cfg.hidden_size * cfg.mlp_ratio),
        "num_layers": cfg.depth,
        "cross_attn_norm": cfg.cross_attn_norm,
        "qk_norm": "rms_norm_across_heads",
        "eps": cfg.norm_eps,
        "image_dim": None,
        "added_kv_proj_dim": None,
        "rope_max_seq_len": rope_max_seq_len,
        "pos_embed_seq_len": None,
    }


# ----------------------------------------------------------------------------- weight layouts


def _pairs_to_halves(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows [D, ...] head-major with RoPE pairs (2i, 2i+1) -> pairs (i, i + hd/2) in every head."""
    return w.unflatten(0, (heads, -1, 2)).transpose(1, 2).flatten(0, 2)  # [H, hd/2, 2, ...] -> [H, 2, hd/2, ...]


def _halves_to_pairs(w: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of _pairs_to_halves."""
    return w.unflatten(0, (heads, 2, -1)).transpose(1, 2).flatten(0, 2)  # [H, 2, hd/2, ...] -> [H, hd/2, 2, ...]


def _patch_rows(w: torch.Tensor, cfg: DiTConfig, to_ours: bool) -> torch.Tensor:
    """proj_out rows (pt, ph, pw, c) [Wan] <-> (c, pt, ph, pw) [ours]; w is [P, ...] (weight or bias)."""
    pt, ph, pw = cfg.patch_size
    c = cfg.out_dim
    if to_ours:
        return w.unflatten(0, (pt, ph, pw, c)).movedim(3, 0).flatten(0, 3)
    return w.unflatten(0, (c, pt, ph, pw)).movedim(0, 3).flatten(0, 3)


def _block_keys(i: int, cross_attn_norm: bool) -> list[tuple[str, list[str]]]:
    """(our key, the Wan keys it is made of) for block i; fused projections list several Wan keys."""
    ours, wan = f"blocks.{i}.", f"blocks.{i}."
    pairs = [(ours + "modulation", [wan + "scale_shift_table"])]
    for p in ("weight", "bias"):
        pairs += [
            (ours + f"attn.qkv.{p}", [wan + f"attn1.to_q.{p}", wan + f"attn1.to_k.{p}", wan + f"attn1.to_v.{p}"]),
            (ours + f"attn.proj.{p}", [wan + f"attn1.to_out.0.{p}"]),
            (ours + f"cross_attn.q.{p}", [wan + f"attn2.to_q.{p}"]),
            (ours + f"cross_attn.kv.{p}", [wan + f"attn2.to_k.{p}", wan + f"attn2.to_v.{p}"]),
            (ours + f"cross_attn.proj.{p}", [wan + f"attn2.to_out.0.{p}"]),
            (ours + f"mlp.fc1.{p}", [wan + f"ffn.net.0.proj.{p}"]),
            (ours + f"mlp.fc2.{p}", [wan + f"ffn.net.2.{p}"]),
        ]
        if cross_attn_norm:
            pairs.append((ours + f"norm2.{p}", [wan + f"norm2.{p}"]))
    for attn, wan_attn in (("attn", "attn1"), ("cross_attn", "attn2")):
        for qk in ("q", "k"):
            pairs.append((ours + f"{attn}.{qk}_norm.weight", [wan + f"{wan_attn}.norm_{qk}.weight"]))
    return pairs


def key_map(cfg: DiTConfig) -> list[tuple[str, list[str]]]:
    """Every (our state-dict key, Wan keys) of a Wan-layout DiT, in our state-dict order."""
    pairs = [
        ("x_embedder.proj.weight", ["patch_embedding.weight"]),
        ("x_embedder.proj.bias", ["patch_embedding.bias"]),
    ]
    for ours, wan in (("t_embedder.mlp.0", "time_embedder.linear_1"), ("t_embedder.mlp.2", "time_embedder.linear_2"),
                      ("t_block.1", "time_proj"), ("text_proj.fc1", "text_embedder.linear_1"),
                      ("text_proj.fc2", "text_embedder.linear_2")):
        pairs += [(f"{ours}.{p}", [f"condition_embedder.{wan}.{p}"]) for p in ("weight", "bias")]
    for i in range(cfg.depth):
        pairs += _block_keys(i, cfg.cross_attn_norm)
    pairs += [
        ("final_layer.modulation", ["scale_shift_table"]),
        ("final_layer.linear.weight", ["proj_out.weight"]),
        ("final_layer.linear.bias", ["proj_out.bias"]),
    ]
    return pairs


def _rope_rows(our_key: str) -> bool:
    """Tensors whose rows are q or k channels of self-attention (RoPE'd): they take the pair permutation."""
    return ".attn.q_norm." in our_key or ".attn.k_norm." in our_key


def wan_to_dit_state(wan: dict[str, torch.Tensor], cfg: DiTConfig, source: str = "weights") -> dict[str, torch.Tensor]:
    """A WanTransformer3DModel state dict -> our DiT's (cfg from dit_config_from_wan). Every Wan tensor must
    be used and every DiT tensor made, with the right shape; otherwise CheckpointError naming the key."""
    heads, D = cfg.num_heads, cfg.hidden_size
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for ours, names in key_map(cfg):
        missing = [n for n in names if n not in wan]
        if missing:
            raise CheckpointError(f"{source}: no tensor '{missing[0]}' (needed for {ours}); is it a complete "
                                  f"{WAN_CLASS} of this config?")
        parts = [wan[n] for n in names]
        used.update(names)
        if ours.endswith(".attn.qkv.weight") or ours.endswith(".attn.qkv.bias"):
            q, k, v = parts
            tensor = torch.cat([_pairs_to_halves(q, heads), _pairs_to_halves(k, heads), v])  # [3D, ...]
        elif _rope_rows(ours):
            tensor = _pairs_to_halves(parts[0], heads)
        elif len(parts) > 1:
            tensor = torch.cat(parts)  # cross-attention kv [2D, ...]
        elif ours == "x_embedder.proj.weight":
            tensor = parts[0].flatten(1)  # Conv3d [D, C, pt, ph, pw] -> Linear [D, C*pt*ph*pw]: same (c, pt, ph, pw) order
        elif ours.startswith("final_layer.linear."):
            tensor = _patch_rows(parts[0], cfg, to_ours=True)
        elif ours.endswith("modulation"):
            tensor = parts[0].reshape(-1, D)  # [1, 6, D] -> [6, D], [1, 2, D] -> [2, D]
        else:
            tensor = parts[0]
        out[ours] = tensor
    extra = sorted(set(wan) - used)
    if extra:
        raise CheckpointError(f"{source}: tensor '{extra[0]}' ({len(extra)} unused in all) has no place in the "
                              "converted DiT; the folder holds more than its config.json describes")
    return out


def dit_to_wan_state(state: dict[str, torch.Tensor], cfg: DiTConfig) -> dict[str, torch.Tensor]:
    """Our DiT state dict (a Wan-layout cfg, see wan_config_from_dit) -> WanTransformer3DModel names and layout."""
    out: dict[str, torch.Tensor] = {}
    for ours, names in key_map(cfg):
        out.update(dit_to_wan_tensor(ours, names, state[ours], cfg))
    return out


def wan_names(cfg: DiTConfig) -> dict[str, list[str]]:
    """{our state-dict key: the Wan keys it becomes} of a Wan-layout DiT."""
    return dict(key_map(cfg))


def dit_to_wan_tensor(ours: str, names: list[str], tensor: torch.Tensor, cfg: DiTConfig) -> dict[str, torch.Tensor]:
    """One tensor of ours -> its Wan tensor(s). Only the rows (dim 0) move for a Linear weight, so a LoRA
    up-projection B [out, r] of that Linear converts with the same call (dit_video/lora.py)."""
    heads, D = cfg.num_heads, cfg.hidden_size
    if ours.endswith(".attn.qkv.weight") or ours.endswith(".attn.qkv.bias"):
        q, k, v = tensor.chunk(3)
        parts = [_halves_to_pairs(q, heads), _halves_to_pairs(k, heads), v]
    elif _rope_rows(ours):
        parts = [_halves_to_pairs(tensor, heads)]
    elif len(names) > 1:
        parts = list(tensor.chunk(len(names)))
    elif ours == "x_embedder.proj.weight":
        parts = [tensor.reshape(D, cfg.in_channels, *cfg.patch_size)]  # Linear -> Conv3d weight
    elif ours.startswith("final_layer.linear."):
        parts = [_patch_rows(tensor, cfg, to_ours=False)]
    elif ours.endswith("modulation"):
        parts = [tensor[None]]  # [6, D] -> [1, 6, D], [2, D] -> [1, 2, D]
    else:
        parts = [tensor]
    return {name: part.contiguous() for name, part in zip(names, parts, strict=True)}


def config_difference(recorded: DiTConfig, built: DiTConfig, ignore: tuple[str, ...] = ()) -> str | None:
    """The first field (not in `ignore`) where two DiT configs differ, as 'field=recorded vs built', or None."""
    a, b = asdict(recorded), asdict(built)
    a["out_channels"], b["out_channels"] = recorded.out_dim, built.out_dim  # None means in_channels
    for field in a:
        if field not in ignore and a[field] != b[field]:
            return f"model.{field}={a[field]!r} there, {b[field]!r} in this run"
    return None
