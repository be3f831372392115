"""Weights on disk: diffusers Wan folders in and out, and our converted single-file format.

- A diffusers model folder: config.json plus diffusion_pytorch_model.safetensors, or shards
  diffusion_pytorch_model-0000i-of-0000n.safetensors listed by diffusion_pytorch_model.safetensors.index.json.
  Read from local files only (no hub, no pickles: a folder with only .bin weights is refused).
- Our format: one safetensors file of a DiT state dict whose header holds `dit_video` = JSON with
  "dit_config" (what `dit_video.checkpoint.export_ema` writes too), so `init_from=` reads both.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dit_video.convert.wan import dit_config_from_wan, dit_to_wan_state, wan_config_from_dit, wan_to_dit_state
from dit_video.errors import CheckpointError
from dit_video.files import fsync_path
from dit_video.model import DiT, DiTConfig

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
SHARD_BYTES = 5 * 1024**3  # diffusers' default max_shard_size (5GB): a 14B float32 export is 12 shards


def transformer_folder(path: str | Path, subfolder: str | None = None) -> Path:
    """The folder holding a diffusers model's config.json: `path`, `path/subfolder`, or a pipeline's `transformer/`."""
    folder = Path(path) / subfolder if subfolder else Path(path)
    if not (folder / "config.json").is_file() and not subfolder and (folder / "transformer" / "config.json").is_file():
        folder = folder / "transformer"  # a whole pipeline folder (Wan2.1-T2V-1.3B-Diffusers)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"'{folder}': no config.json; point at a local diffusers WanTransformer3DModel folder, "
                              "or a Wan pipeline folder (its transformer/ is used; Wan 2.2 A14B: --subfolder transformer_2)")
    return folder


def read_safetensors_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a diffusers model folder, single file or sharded, read whole."""
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [folder / name for name in sorted(set(weight_map.values()))]
    elif (folder / WEIGHTS_NAME).is_file():
        files = [folder / WEIGHTS_NAME]
    else:
        raise CheckpointError(f"'{folder}': no {WEIGHTS_NAME} or {INDEX_NAME} (pickled .bin weights are not read; "
                              "save the model with safe_serialization=True)")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"'{index}' lists '{file.name}', which is missing: the download is incomplete")
        with safe_open(str(file), framework="pt") as f:
            state.update({k: f.get_tensor(k) for k in f.keys()})
    return state


def check_dit_state(state: dict[str, torch.Tensor], cfg: DiTConfig, source: str) -> None:
    """Raise CheckpointError naming the first key DiT(cfg) lacks, does not have, or has in another shape."""
    with torch.device("meta"):  # shapes only, no memory
        reference = {k: tuple(v.shape) for k, v in DiT(cfg).state_dict().items()}
    for key, shape in reference.items():
        if key not in state:
            raise CheckpointError(f"{source}: no tensor '{key}', which this DiT config needs")
        if tuple(state[key].shape) != shape:
            raise CheckpointError(f"{source}: '{key}' has shape {tuple(state[key].shape)}, this DiT config needs {shape}")
    extra = sorted(set(state) - set(reference))
    if extra:
        raise CheckpointError(f"{source}: tensor '{extra[0]}' is not part of this DiT config")


def load_wan_folder(path: str | Path, subfolder: str | None = None, text_len: int = 512):
    """A local diffusers WanTransformer3DModel folder -> (DiTConfig, our DiT state dict), exactly equivalent."""
    folder = transformer_folder(path, subfolder)
    cfg = dit_config_from_wan(json.loads((folder / "config.json").read_text()), text_len, str(folder / "config.json"))
    state = wan_to_dit_state(read_safetensors_folder(folder), cfg, str(folder))
    check_dit_state(state, cfg, str(folder))
    return cfg, state


def save_dit_weights(state: dict[str, torch.Tensor], cfg: DiTConfig, out: str | Path, **meta) -> Path:
    """Our format: the state dict in one safetensors file, `dit_video` = {"dit_config", **meta} in its header."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = {"dit_video": json.dumps({"dit_config": asdict(cfg), **meta}), "weights": str(meta.get("weights", "converted"))}
    tmp = out.with_name(f".{out.name}.tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=header)
    fsync_path(tmp)
    os.replace(tmp, out)
    return out


def load_dit_weights(path: str | Path) -> tuple[DiTConfig, dict[str, torch.Tensor], dict]:
    """(DiTConfig, state dict, header meta) from our format (a converted file or an EMA export), or from a
    diffusers Wan folder (converted on the fly, text_len 512)."""
    path = Path(path)
    if path.is_dir():
        cfg, state = load_wan_folder(path)
        return cfg, state, {"converted_from": str(path)}
    if not path.is_file():
        raise CheckpointError(f"'{path}' does not exist (give a converted .safetensors file or a diffusers Wan folder)")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for a file that is not safetensors
        raise CheckpointError(f"'{path}' is not a safetensors file: {str(err).splitlines()[0]}") from None
    if "dit_video" not in header:
        raise CheckpointError(f"'{path}' has no dit_video config in its header; write it with "
                              "`python -m dit_video.convert` or `python -m dit_video.checkpoint export`")
    meta = json.loads(header["dit_video"])
    cfg = DiTConfig.from_dict(meta["dit_config"])
    check_dit_state(state, cfg, str(path))
    return cfg, state, meta


def save_diffusers_folder(state: dict[str, torch.Tensor], cfg: DiTConfig, out: str | Path,
                          dtype: torch.dtype = torch.float32, shard_bytes: int = SHARD_BYTES) -> Path:
    """Our DiT (state dict + config, any Wan-expressible model) -> a WanTransformer3DModel folder
    that `WanTransformer3DModel.from_pretrained(out)` loads. Refuses other models naming the field
    (wan_config_from_dit) and an existing non-empty `out`."""
    config = wan_config_from_dit(cfg)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"'{out}' exists and is not empty; give a new folder for the export")
    wan = {k: v.to(dtype) for k, v in dit_to_wan_state(state, cfg).items()}
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shards = _shards(wan, shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(v.numel() * v.element_size() for v in wan.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    fsync_path(tmp)
    if out.exists():
        out.rmdir()  # empty (checked above)
    os.replace(tmp, out)
    return out


def _shards(state: dict[str, torch.Tensor], shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Split a state dict, in key order, into dicts of at most shard_bytes each (a bigger tensor alone)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards


def parameter_count(state: dict[str, torch.Tensor]) -> int:
    return sum(math.prod(v.shape) for v in state.values())
