"""EMA weights of a DiT checkpoint -> one safetensors file with the run's metadata.

    python -m dit_video.checkpoint export <ckpt file or folder | run checkpoints/ dir> <out.safetensors>
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dit_video.checkpoint.deepspeed import is_deepspeed_checkpoint
from dit_video.checkpoint.load import load_training_checkpoint
from dit_video.checkpoint.paths import latest_checkpoint
from dit_video.errors import CheckpointError
from dit_video.files import fsync_path


def export_ema(ckpt_path: str | Path, out: str | Path) -> Path:
    """Write the EMA weights of a DiT checkpoint as one safetensors file with the run's metadata.

    The file holds the DiT state dict (keys as in `DiT.state_dict()`) and, in the safetensors
    header, `dit_video` = the JSON the checkpoint records (DiT config, latent shape, encoders).
    Load it with `load_exported(path)`; safetensors cannot carry code.
    """
    ckpt = load_training_checkpoint(ckpt_path, sections=["state_dict"])
    if "dit_video" not in ckpt:
        raise CheckpointError(f"checkpoint '{ckpt_path}' was not written by dit-video's DiT training")
    ema = {k[len("ema."):]: v.detach().float().contiguous() for k, v in ckpt["state_dict"].items()
           if k.startswith("ema.")}
    if not ema:
        raise CheckpointError(f"checkpoint '{ckpt_path}' holds no EMA weights (keys 'ema.*')")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file(ema, str(tmp), metadata={"dit_video": json.dumps(ckpt["dit_video"]), "weights": "ema"})
    fsync_path(tmp)
    os.replace(tmp, out)
    return out


def load_exported(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(DiT state dict, run metadata) from a file written by `export_ema`."""
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["dit_video"])
        state = {k: f.get_tensor(k) for k in f.keys()}
    return state, meta


def main(argv: list[str] | None = None) -> None:
    """python -m dit_video.checkpoint export <ckpt file or folder | run checkpoints/ dir> <out.safetensors>"""
    parser = argparse.ArgumentParser(description=main.__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    exp = sub.add_parser("export", help="EMA weights + config -> one safetensors file")
    exp.add_argument("ckpt")
    exp.add_argument("out")
    args = parser.parse_args(argv)
    ckpt = Path(args.ckpt)
    if ckpt.is_dir() and not (ckpt / ".metadata").is_file() and not is_deepspeed_checkpoint(ckpt):  # checkpoints/
        found = latest_checkpoint(ckpt)
        if found is None:
            raise SystemExit(f"no complete checkpoint in {ckpt}")
        ckpt = found
    try:
        print(export_ema(ckpt, args.out))
    except CheckpointError as err:  # a bad or hostile checkpoint: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
