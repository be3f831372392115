"""The causal VAE on disk: vae.safetensors (weights + latent shift/scale) beside vae.json (config).

Safetensors only: weights are never unpickled."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch

from dit_video.encoders.causal_vae.config import CausalVAEConfig
from dit_video.encoders.causal_vae.frozen import CausalVideoAutoencoder
from dit_video.encoders.causal_vae.model import CausalVAE
from dit_video.encoders.causal_vae.tiling import TilingConfig
from dit_video.files import atomic_write

VAE_WEIGHTS_FILE = "vae.safetensors"
VAE_CONFIG_FILE = "vae.json"
VAE_FORMAT = "dit_video.causal_vae/1"  # bump when the state-dict layout changes
TRAIN_HINT = "python train.py +experiment=vae_demo"


def save_vae(
    out_dir: str | os.PathLike,
    vae: CausalVAE,
    config: CausalVAEConfig,
    shift: torch.Tensor,
    scale: torch.Tensor,
) -> Path:
    """Write out_dir/vae.safetensors (weights + latent shift/scale) and out_dir/vae.json (config).

    Returns the weights path. Both files are written atomically; the JSON goes last, so a
    directory with a vae.json always has matching weights.
    """
    from safetensors.torch import save_file

    if asdict(config) != asdict(vae.config):
        raise ValueError("save_vae: `config` differs from the config the VAE was built with (vae.config)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"vae.{k}": v.detach().cpu().contiguous() for k, v in vae.state_dict().items()}
    tensors["latent.shift"] = shift.detach().float().cpu().contiguous()
    tensors["latent.scale"] = scale.detach().float().cpu().contiguous()
    weights = out / VAE_WEIGHTS_FILE
    atomic_write(weights, lambda p: save_file(tensors, str(p), metadata={"format": VAE_FORMAT}))
    meta = {"format": VAE_FORMAT, "config": asdict(config)}
    atomic_write(out / VAE_CONFIG_FILE, lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
    return weights


def load_vae(
    path: str | os.PathLike, device: str | torch.device = "cpu", tiling: TilingConfig | None = None
) -> CausalVideoAutoencoder:
    """Load a frozen CausalVideoAutoencoder from a directory holding vae.safetensors + vae.json
    (or from the vae.safetensors path itself); `tiling` makes its encode/decode tiled/chunked."""
    from safetensors.torch import load_file

    p = Path(path)
    weights = p if p.suffix == ".safetensors" else p / VAE_WEIGHTS_FILE
    config_path = weights.with_name(VAE_CONFIG_FILE)
    for f in (weights, config_path):
        if not f.is_file():
            raise FileNotFoundError(f"VAE file {f} not found: train and save a VAE first with `{TRAIN_HINT}`")
    meta = json.loads(config_path.read_text())
    if meta.get("format") != VAE_FORMAT or "config" not in meta:
        raise ValueError(
            f"{config_path}: expected format {VAE_FORMAT!r} with a 'config' entry, got {meta.get('format')!r}"
        )
    config = CausalVAEConfig.from_dict(meta["config"], source=str(config_path))
    tensors = load_file(str(weights))
    try:
        shift, scale = tensors.pop("latent.shift"), tensors.pop("latent.scale")
    except KeyError as e:
        raise ValueError(
            f"{weights}: missing latent normalisation tensor {e}; re-save it with save_vae"
        ) from None
    state = {k.removeprefix("vae."): v for k, v in tensors.items()}
    vae = CausalVAE(config)
    missing, unexpected = vae.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{weights} does not match the config in {config_path}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return CausalVideoAutoencoder(vae, shift, scale, weights_path=str(weights), tiling=tiling).to(device)
