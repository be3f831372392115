"""DeepSpeed ZeRO checkpoints: recognise, verify and read the folders Lightning's DeepSpeedStrategy writes.

A ZeRO checkpoint `step-N.ckpt/` holds `latest` (the tag, "checkpoint") and `<tag>/`, with

    mp_rank_00_model_states.pt               ZeRO-1/2: the module state (weights as the engine holds
                                             them, bf16 under bf16) and the client state (Lightning's
                                             loops and callbacks, dit_video meta, the EMA)
    zero_pp_rank_R_mp_rank_00_model_states.pt  ZeRO-3: one per rank; weights are empty placeholders
    [bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt  per rank: this rank's fp32 master partition
                                             and its AdamW moments

Nothing here imports DeepSpeed or unpickles code. Every file loads with `torch.load(weights_only=True)`;
the optimizer files name three DeepSpeed types (a loss scaler, the ZeRO stage enum, a fragment
address), which are allowlisted as inert stand-ins that only hold their pickled fields.
`verify_deepspeed_checkpoint` does this for every file (memory-mapped: only the pickles are read)
before Lightning hands the folder to DeepSpeed's own loader (which unpickles fully), as verify.py
does for DCP folders. `load_deepspeed_checkpoint` rebuilds the full fp32 weights from the
per-rank master partitions, so sampling, export and the notebook API read a ZeRO run like any other.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from dit_video.errors import CheckpointError

LATEST = "latest"
_RANK = re.compile(r"zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
# The engine's own entries of a model-state file; everything else is Lightning's client state.
_ENGINE_KEYS = {"module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
                "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "skipped_steps",
                "global_steps", "global_samples", "dp_world_size", "mp_world_size", "checkpoint_parallel_dimensions",
                "ds_config", "ds_version", "ema_state_dict"}
EMA_KEY = "ema_state_dict"  # the EMA in the client state (keys "ema.*"), written by lit_module/ema.py


class _Fields:
    """Stand-in for a pickled DeepSpeed object: keeps its fields as attributes, runs no code."""

    def __init__(self, *args):
        self.args = args


def _stage(value):
    """Stand-in for ZeroStageEnum(value): the stage number."""
    return int(value)


_ALLOWED = [(_Fields, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
            (_Fields, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
            (_stage, "deepspeed.runtime.zero.config.ZeroStageEnum"),
            (_Fields, "deepspeed.utils.tensor_fragment.fragment_address")]


def _load(path: Path, mmap: bool = False):
    try:
        with torch.serialization.safe_globals(_ALLOWED):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # never fall back to full unpickling
        raise CheckpointError(f"DeepSpeed checkpoint file '{path}' cannot be loaded safely (weights_only=True "
                              f"refuses pickled code and unknown types): {str(err).splitlines()[0]}") from None


def _tag_dir(path: Path) -> Path | None:
    latest = path / LATEST
    if not (path.is_dir() and latest.is_file()):
        return None
    tag = path / latest.read_text().strip()
    return tag if tag.is_dir() else None


def is_deepspeed_checkpoint(path: str | Path) -> bool:
    """A folder with DeepSpeed's `latest` tag file and model-state files under that tag."""
    tag = _tag_dir(Path(path))
    return tag is not None and any(tag.glob("*model_states.pt"))


def verify_deepspeed_checkpoint(path: str | Path) -> None:
    """Refuse a ZeRO checkpoint folder any of whose files would unpickle code (see the module docstring)."""
    tag = _tag_dir(Path(path))
    files = sorted(tag.glob("*.pt")) if tag is not None else []
    if not any(f.name.endswith("model_states.pt") for f in files):
        raise CheckpointError(f"DeepSpeed checkpoint '{path}' has no <tag>/*model_states.pt (incomplete or not one)")
    for f in files:
        _load(f, mmap=True)


def _model_states(tag: Path) -> dict:
    found = sorted(tag.glob("*model_states.pt"))  # mp_rank_00_... (ZeRO-1/2) or zero_pp_rank_0_... (ZeRO-3) first
    return _load(found[0])


def _optimizer_partitions(tag: Path, world: int) -> list[dict]:
    """Every rank's `optimizer_state_dict`, in rank order."""
    files = {int(_RANK.search(f.name).group(1)): f for f in tag.glob("*optim_states.pt") if _RANK.search(f.name)}
    if sorted(files) != list(range(world)):
        raise CheckpointError(f"DeepSpeed checkpoint '{tag.parent}' holds optimizer partitions of ranks {sorted(files)}, "
                              f"expected 0..{world - 1} (an incomplete copy?)")
    return [_load(files[r], mmap=True)["optimizer_state_dict"] for r in range(world)]


def _zero3_weights(shapes: dict[str, torch.Size], parts: list[dict]) -> dict[str, torch.Tensor]:
    """ZeRO-3: each parameter is split into `world` equal slices (the last padded), laid out on
    each rank one parameter after the other in `param_shapes` order."""
    flats = [torch.cat([g.flatten() for g in p["fp32_flat_groups"]]) for p in parts]  # per rank [sum of slices]
    out, offset = {}, 0
    for name, shape in shapes.items():
        numel = math.prod(shape)
        per_rank = math.ceil(numel / len(flats))
        whole = torch.cat([flat.narrow(0, offset, per_rank) for flat in flats])  # [world * per_rank] (padded)
        out[name] = whole[:numel].view(shape).clone()  # [*shape]
        offset += per_rank
    return out


def _zero12_weights(shapes: dict[str, torch.Size], parts: list[dict]) -> dict[str, torch.Tensor]:
    """ZeRO-1/2: each rank holds one contiguous slice of every param group's flat fp32 buffer;
    `param_slice_mappings` say where in it each parameter's piece starts and how long it is.
    A parameter's pieces, in rank order, are the parameter flattened."""
    pieces: dict[str, list[torch.Tensor]] = {name: [] for name in shapes}
    for part in parts:
        for flat, mapping in zip(part["single_partition_of_fp32_groups"], part["param_slice_mappings"], strict=True):
            for name, address in mapping.items():
                start, numel = address.start, address.numel
                pieces[name].append(flat.narrow(0, start, numel))
    return {name: torch.cat(pieces[name]).view(shape).clone() for name, shape in shapes.items()}  # [*shape] each


def load_deepspeed_checkpoint(path: str | Path, sections: list[str] | None = None) -> dict:
    """A ZeRO checkpoint as one dict like a single-file one: Lightning's client state (loops,
    callbacks, `dit_video` meta, ...) and, unless `sections` leaves it out, `state_dict` with the
    trained weights in fp32 (rebuilt from every rank's master partition; buffers from the module
    state) and the EMA (`ema.*`). Read on this process, without a process group or DeepSpeed."""
    path = Path(path)
    verify_deepspeed_checkpoint(path)
    tag = _tag_dir(path)
    states = _model_states(tag)
    ckpt = {k: v for k, v in states.items() if k not in _ENGINE_KEYS}
    if sections is not None and "state_dict" not in sections:
        return ckpt
    shapes = {name: shape for group in states["param_shapes"] for name, shape in group.items()}
    parts = _optimizer_partitions(tag, int(states["dp_world_size"]))
    stage = int(states["ds_config"]["zero_optimization"]["stage"])
    weights = _zero3_weights(shapes, parts) if stage == 3 else _zero12_weights(shapes, parts)
    buffers = {name: states["module"][name] for name in states["buffer_names"]}
    if EMA_KEY not in states:
        raise CheckpointError(f"DeepSpeed checkpoint '{path}' holds no EMA ('{EMA_KEY}'): was it written by "
                              "dit-video's DiT training?")
    ckpt["state_dict"] = {**weights, **buffers, **states[EMA_KEY]}
    return ckpt
