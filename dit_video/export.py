"""Hand a trained DiT to others:  python -m dit_video.export ckpt=PATH out=DIR --format diffusers

    ckpt=     a training checkpoint (file, or FSDP2 DCP folder), a run directory (its checkpoints/last.ckpt),
              or a .safetensors file in our format (python -m dit_video.convert, or an EMA export)
    out=      where to write: a new folder (diffusers) or a .safetensors file (safetensors)
    weights=  ema (default: what sampling uses) | raw (the optimised weights), for training checkpoints
    dtype=    float32 (default) | bfloat16 (half the size)
    --format  diffusers: a WanTransformer3DModel folder (config.json + safetensors, sharded above 5 GB)
                         that `WanTransformer3DModel.from_pretrained(out)` loads and `WanPipeline` runs;
                         any DiT diffusers' Wan computes exactly (a converted Wan, or one of ours trained
                         with the Wan layout), others are refused naming the model.* field
              safetensors: our one-file format (state dict + DiTConfig), what `init_from=` reads
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from dit_video.checkpoint.load import load_checkpoint
from dit_video.checkpoint.paths import resolve_checkpoint
from dit_video.convert import load_dit_weights, save_diffusers_folder, save_dit_weights
from dit_video.errors import CheckpointError
from dit_video.model import DiTConfig

FORMATS = ("diffusers", "safetensors")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def dit_weights(ckpt: str | Path, weights: str = "ema") -> tuple[DiTConfig, dict[str, torch.Tensor], dict]:
    """(DiTConfig, DiT state dict, run metadata) of a checkpoint, run directory or our .safetensors file."""
    if weights not in ("ema", "raw"):
        raise CheckpointError(f"weights={weights!r}: use 'ema' or 'raw'")
    path = Path(ckpt)
    if path.suffix == ".safetensors":
        return load_dit_weights(path)
    ckpt_dict = load_checkpoint(resolve_checkpoint(path))
    meta = ckpt_dict["dit_video"]
    prefix = "ema." if weights == "ema" else "dit."
    state = {k[len(prefix):]: v for k, v in ckpt_dict["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise CheckpointError(f"checkpoint '{path}' holds no '{prefix}*' weights; try weights={'raw' if weights == 'ema' else 'ema'}")
    # LoRA (issue 17, part 2): adapters are merged into `state` here, so every format below exports the merged model.
    return DiTConfig.from_dict(meta["dit_config"]), state, meta


def export(ckpt: str | Path, out: str | Path, fmt: str = "diffusers", weights: str = "ema",
           dtype: str = "float32") -> tuple[Path, DiTConfig]:
    """Write the DiT of `ckpt` to `out` in `fmt` (see the module docstring); returns (out, its DiTConfig)."""
    if fmt not in FORMATS:
        raise CheckpointError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype={dtype!r}: use one of {', '.join(DTYPES)}")
    cfg, state, meta = dit_weights(ckpt, weights)
    if fmt == "diffusers":
        return save_diffusers_folder(state, cfg, out, dtype=DTYPES[dtype]), cfg
    state = {k: v.to(DTYPES[dtype]) for k, v in state.items()}
    extra = {k: v for k, v in meta.items() if k != "dit_config"}
    return save_dit_weights(state, cfg, out, **{**extra, "exported_from": str(ckpt), "weights": weights}), cfg


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dit_video.export", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("assignments", nargs="*", metavar="key=value", help="ckpt=, out=, weights=, dtype=")
    parser.add_argument("--format", default="diffusers", choices=FORMATS)
    args = parser.parse_args(argv)
    values = {"ckpt": None, "out": None, "weights": "ema", "dtype": "float32"}
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
        out, cfg = export(args.ckpt, args.out, args.format, args.weights, args.dtype)
    except CheckpointError as err:
        raise SystemExit(f"error: {err}") from None
    print(out)
    if args.format == "diffusers" and cfg.text_len != 512:
        print(f"note: this model attends to {cfg.text_len} caption tokens: call WanPipeline with "
              f"max_sequence_length={cfg.text_len}")


if __name__ == "__main__":
    main()
