"""Tiny random diffusers WanTransformer3DModels on disk, and how the Wan tests compare with them."""

from __future__ import annotations

import importlib.util
import inspect
import json
from pathlib import Path

import torch

# Two tiny Wan configs: a Wan 2.1 T2V layout (heads 2 x 16, 2 layers, patch 1x2x2) and one with the
# options Wan 2.2 TI2V adds or allows (heads 3 x 20, 3 layers, patch 2x2x1, out_channels != in_channels,
# no cross-attention norm; per-token timesteps are tested in test_wan.py), sharded on disk.
WAN_21 = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
              text_dim=12, freq_dim=16, ffn_dim=48, num_layers=2, cross_attn_norm=True)
WAN_22 = dict(patch_size=(2, 2, 1), num_attention_heads=3, attention_head_dim=20, in_channels=6, out_channels=3,
              text_dim=10, freq_dim=32, ffn_dim=70, num_layers=3, cross_attn_norm=False)


def save_wan(folder: Path, kwargs: dict, shard: bool, seed: int = 0) -> Path:
    """A random WanTransformer3DModel saved with save_pretrained: sharded (many small files + index) or one file."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    WanTransformer3DModel(**kwargs).save_pretrained(folder, max_shard_size="20KB" if shard else "10GB")
    return folder


def load_wan(folder: Path):
    """diffusers' WanTransformer3DModel from a local folder, offline, in eval mode.

    from_pretrained needs the `accelerate` package for this model (it keeps some modules in float32,
    which diffusers 0.42 only does through accelerate); where accelerate is missing, the two steps
    from_pretrained takes: the config through diffusers' config loader, then a strict state-dict load
    of every safetensors file (every name and shape diffusers expects, nothing more)."""
    from diffusers import WanTransformer3DModel
    from diffusers.models.model_loading_utils import load_state_dict

    folder = Path(folder)
    if importlib.util.find_spec("accelerate") is not None:
        return WanTransformer3DModel.from_pretrained(folder, local_files_only=True).eval()
    config = WanTransformer3DModel.load_config(folder, local_files_only=True)
    init_args = set(inspect.signature(WanTransformer3DModel.__init__).parameters)
    assert {k for k in config if not k.startswith("_")} <= init_args, config  # no key diffusers would drop
    model = WanTransformer3DModel.from_config(config)
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [
        "diffusion_pytorch_model.safetensors"]
    state = {}
    for name in files:
        state.update(load_state_dict(str(folder / name)))
    model.load_state_dict(state, strict=True)
    return model.eval()


def wan_forward(wan, x: torch.Tensor, t: torch.Tensor, padded_text: torch.Tensor) -> torch.Tensor:
    """diffusers' Wan takes t in scheduler units (sigma * 1000) and no text mask (padding is zeros)."""
    return wan(x, t * 1000.0, padded_text, return_dict=False)[0]


def padded_text(text_emb: torch.Tensor, text_mask: torch.Tensor, text_len: int) -> torch.Tensor:
    """What Wan's pipeline gives its transformer: each caption's real tokens, then zeros to text_len."""
    out = torch.zeros(text_emb.shape[0], text_len, text_emb.shape[2])
    out[:, : text_emb.shape[1]] = torch.where(text_mask[..., None], text_emb, 0.0)
    return out


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, name: str = "", tol: float = 1e-5) -> None:
    """Equal to `tol`, relative to the tensor's scale when it exceeds 1 (summed-loss gradients are not O(1))."""
    scale = max(1.0, theirs.abs().max().item())
    err = (ours - theirs).abs().max().item()
    assert err <= tol * scale, f"{name}: max |diff| {err:.2e} at scale {scale:.2e}"
