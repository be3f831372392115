"""Refuse a checkpoint that would unpickle code, before anything else reads it, cheaply.

A file is checked with `torch.load(weights_only=True, mmap=True)`: the whole pickle goes through
torch's allowlist, while the tensor bytes stay on disk (mapped, never read), so verifying a
17.5 GB checkpoint on every rank reads kilobytes, not 17.5 GB per rank on top of the real load.
A DCP folder's `.metadata` goes through dit_video.checkpoint.dcp (exact allowlist, declarations
checked against the shard files); its `meta.pt` is a small file loaded with weights_only=True.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import Metadata

from dit_video.checkpoint.dcp import read_dcp_metadata, why
from dit_video.checkpoint.deepspeed import is_deepspeed_checkpoint, verify_deepspeed_checkpoint
from dit_video.errors import CheckpointError


def load_checkpoint_file(path: str | Path) -> dict:
    """torch.load(weights_only=True) with a one-line CheckpointError; no fallback to full unpickling."""
    return _load_file(path, mmap=False)


def verify_checkpoint_file(path: str | Path) -> None:
    """Refuse a checkpoint file that would unpickle code, without reading its tensor data."""
    path = Path(path)
    # torch.save's zip format can be mapped; the legacy format (torch < 1.6) cannot, and is read whole.
    _load_file(path, mmap=path.is_file() and zipfile.is_zipfile(path))


def _load_file(path: str | Path, mmap: bool):
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:
        raise CheckpointError(
            f"checkpoint '{path}' cannot be loaded safely (weights_only=True refuses pickled code and "
            f"unknown types): {why(err)}"
        ) from None


def verify_dcp_checkpoint(folder: str | Path) -> Metadata:
    """A DCP folder's checked metadata (dit_video.checkpoint.dcp.read_dcp_metadata), after its
    `meta.pt` passed weights_only=True; hand it to `load_dcp` so the folder is verified once."""
    metadata = read_dcp_metadata(folder)
    verify_checkpoint_file(Path(folder) / "meta.pt")
    return metadata


def verify_checkpoint(path: str | Path) -> None:
    """Refuse a checkpoint (file or DCP folder) that would unpickle code or declare more data than
    it holds, before anything else reads it. Cheap: no tensor data is read."""
    path = Path(path)
    if is_deepspeed_checkpoint(path):  # a ZeRO folder (Lightning's DeepSpeedStrategy): checkpoint/deepspeed.py
        return verify_deepspeed_checkpoint(path)
    if path.is_dir():
        verify_dcp_checkpoint(path)
    else:
        verify_checkpoint_file(path)
