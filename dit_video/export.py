"""Hand a trained DiT to others:  python -m dit_video.export ckpt=PATH out=DIR --format diffusers

    ckpt=     a training checkpoint (file, or FSDP2 DCP folder), a run directory (its checkpoints/last.ckpt),
              or a .safetensors file in our format (python -m dit_video.convert, or an EMA export)
    out=      where to write: a new folder (diffusers) or a .safetensors file (safetensors)
    weights=  ema (default: what sampling uses) | raw (the optimised weights), for training checkpoints
    dtype=    float32 (default) | bfloat16 (half the size)
    base=     a LoRA run's frozen weights, when its init_from file has moved (default: the recorded path)
    --format  diffusers: a WanTransformer3DModel folder (config.json + safetensors, sharded above 5 GB)
                         that `WanTransformer3DModel.from_pretrained(out)` loads and `WanPipeline` runs;
                         any DiT diffusers' Wan computes exactly (a converted Wan, or one of ours trained
                         with the Wan layout), others are refused naming the model.* field. A LoRA run's
                         adapters are merged into the weights.
              safetensors: our one-file format (state dict + DiTConfig), what `init_from=` reads (LoRA merged)
              lora:        a LoRA run's adapters alone, one small .safetensors file in diffusers' Wan LoRA
                           format: `WanPipeline.load_lora_weights(out)` on the base model applies them
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from dit_video.checkpoint.load import load_checkpoint
from dit_video.checkpoint.paths import resolve_checkpoint
from dit_video.convert import load_dit_weights, save_diffusers_folder, save_dit_weights, wan_config_from_dit
from dit_video.errors import CheckpointError
from dit_video.files import fsync_path
from dit_video.lora import checkpoint_adapters, checkpoint_dit_state, diffusers_lora_state
from dit_video.model import DiTConfig

FORMATS = ("diffusers", "safetensors", "lora")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def dit_weights(ckpt: str | Path, weights: str = "ema", base: str | None = None,
                adapters_only: bool = False) -> tuple[DiTConfig, dict[str, torch.Tensor], dict]:
    """(DiTConfig, DiT state dict, run metadata) of a checkpoint, run directory or our .safetensors file.
    A LoRA run's checkpoint: its adapters merged onto its frozen weights (`base` overrides their path),
    or with adapters_only the adapters alone (keys as in the peft-wrapped DiT)."""
    if weights not in ("ema", "raw"):
        raise CheckpointError(f"weights={weights!r}: use 'ema' or 'raw'")
    path = Path(ckpt)
    if path.suffix == ".safetensors":
        if adapters_only:
            raise CheckpointError(f"'{path}' holds a whole DiT, no LoRA adapters: --format lora takes a LoRA run's checkpoint")
        return load_dit_weights(path)
    ckpt_dict = load_checkpoint(resolve_checkpoint(path))
    meta = ckpt_dict["dit_video"]
    prefix = "ema." if weights == "ema" else "dit."
    state = {k[len(prefix):]: v for k, v in ckpt_dict["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise CheckpointError(f"checkpoint '{path}' holds no '{prefix}*' weights; try weights={'raw' if weights == 'ema' else 'ema'}")
    cfg = DiTConfig.from_dict(meta["dit_config"])
    if adapters_only or meta.get("lora"):  # meta["lora"]: written by LoRA runs only
        if not meta.get("lora"):
            raise CheckpointError(f"checkpoint '{path}' is not a LoRA run's (lora=none): export it --format diffusers")
        state = checkpoint_adapters(ckpt_dict["state_dict"], prefix) if adapters_only else checkpoint_dit_state(
            ckpt_dict["state_dict"], meta, prefix, base)
    return cfg, state, meta


def export(ckpt: str | Path, out: str | Path, fmt: str = "diffusers", weights: str = "ema",
           dtype: str = "float32", base: str | None = None) -> tuple[Path, DiTConfig]:
    """Write the DiT of `ckpt` to `out` in `fmt` (see the module docstring); returns (out, its DiTConfig)."""
    if fmt not in FORMATS:
        raise CheckpointError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype={dtype!r}: use one of {', '.join(DTYPES)}")
    cfg, state, meta = dit_weights(ckpt, weights, base, adapters_only=fmt == "lora")
    if fmt == "lora":
        return save_diffusers_lora(state, meta, cfg, out, DTYPES[dtype]), cfg
    if fmt == "diffusers":
        return save_diffusers_folder(state, cfg, out, dtype=DTYPES[dtype]), cfg
    state = {k: v.to(DTYPES[dtype]) for k, v in state.items()}
    extra = {k: v for k, v in meta.items() if k != "dit_config"}
    return save_dit_weights(state, cfg, out, **{**extra, "exported_from": str(ckpt), "weights": weights}), cfg


def save_diffusers_lora(adapters: dict[str, torch.Tensor], meta: dict, cfg: DiTConfig, out: str | Path,
                        dtype: torch.dtype) -> Path:
    """The adapters in diffusers' Wan LoRA format (dit_video.lora.diffusers_lora_state) as one safetensors
    file, written under a temporary name and renamed; its header records our LoRA config."""
    lora = meta["lora"]
    try:
        tensors = diffusers_lora_state(adapters, lora["alpha"] / lora["rank"], cfg)
    except KeyError as err:
        raise CheckpointError(str(err.args[0])) from None
    wan_config_from_dit(cfg)  # the base model must be a diffusers Wan too (CheckpointError naming the field)
    out = Path(out)
    if out.suffix != ".safetensors" or out.exists():
        raise CheckpointError(f"out={out}: give a new .safetensors file for --format lora")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={"format": "pt", "dit_video_lora": json.dumps(lora)})
    fsync_path(tmp)
    os.replace(tmp, out)
    return out


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dit_video.export", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("assignments", nargs="*", metavar="key=value", help="ckpt=, out=, weights=, dtype=, base=")
    parser.add_argument("--format", default="diffusers", choices=FORMATS)
    args = parser.parse_args(argv)
    values = {"ckpt": None, "out": None, "weights": "ema", "dtype": "float32", "base": None}
    for item in args.assignments:
        key, sep, value = item.partition("=")
        if not sep or key not in values:
            parser.error(f"{item!r}: give key=value with key one of {', '.join(values)}")
        values[key] = value
    for key in ("ckpt", "out"):
        if not values[key]:
            parser.error(f"{key}= is required")
    return argparse.Namespace(**values, format=args.format)


def main(argv: list[str] | None = None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        out, cfg = export(args.ckpt, args.out, args.format, args.weights, args.dtype, args.base)
    except CheckpointError as err:
        raise SystemExit(f"error: {err}") from None
    print(out)
    if args.format != "safetensors" and cfg.text_len != 512:
        print(f"note: this model attends to {cfg.text_len} caption tokens: call WanPipeline with "
              f"max_sequence_length={cfg.text_len}")


if __name__ == "__main__":
    main()
