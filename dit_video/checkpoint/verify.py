"""Refuse a checkpoint that would unpickle code, before anything else reads it.

Files load with `torch.load(weights_only=True)`; a DCP folder's `.metadata` (plain pickle) goes
through an allowlist of DCP's own types first.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from dit_video.checkpoint.deepspeed import is_deepspeed_checkpoint, verify_deepspeed_checkpoint
from dit_video.errors import CheckpointError


def load_checkpoint_file(path: str | Path) -> dict:
    """torch.load(weights_only=True) with a one-line CheckpointError; no fallback to full unpickling."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"checkpoint '{path}' cannot be loaded safely (weights_only=True refuses pickled code and "
            f"unknown types): {str(err).splitlines()[0]}"
        ) from None


class _DCPMetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP `.metadata` file allowing only the types DCP writes there: its metadata
    dataclasses, torch.Size, dtypes and layouts, and the path it was saved to."""

    def find_class(self, module: str, name: str):
        if module in ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem") and (
            name[:1].isupper() or name in ("_StorageInfo", "_MEM_FORMAT_ENCODING")
        ):
            return super().find_class(module, name)
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        if (module, name) in (("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                              ("pathlib", "PurePosixPath"), ("collections", "OrderedDict")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a DCP checkpoint's .metadata")


def verify_checkpoint(path: str | Path) -> None:
    """Refuse a checkpoint that would unpickle code before anything else reads it.

    A file is loaded with weights_only=True. A DCP folder's `.metadata` is plain pickle (DCP reads
    it with pickle.load), so it is first unpickled here with an allowlist of DCP's own types;
    its `meta.pt` is loaded with weights_only=True; its shard files hold raw tensor bytes.
    """
    path = Path(path)
    if is_deepspeed_checkpoint(path):  # a ZeRO folder (Lightning's DeepSpeedStrategy): checkpoint/deepspeed.py
        return verify_deepspeed_checkpoint(path)
    if path.is_dir():
        meta = path / ".metadata"
        if not meta.is_file():
            raise CheckpointError(f"checkpoint folder '{path}' has no DCP .metadata (incomplete or not a checkpoint)")
        try:
            with open(meta, "rb") as f:
                _DCPMetadataUnpickler(f).load()
        except Exception as err:
            raise CheckpointError(f"checkpoint '{path}' cannot be loaded safely: {err}") from None
        load_checkpoint_file(path / "meta.pt")
    else:
        load_checkpoint_file(path)
