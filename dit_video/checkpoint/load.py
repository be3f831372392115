"""A step checkpoint as one dict, from a file or a DCP folder written by FSDP2 at any world size."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from dit_video.checkpoint.dcp import SafeFullLoadPlanner, load_dcp, why
from dit_video.checkpoint.deepspeed import is_deepspeed_checkpoint, load_deepspeed_checkpoint
from dit_video.checkpoint.verify import load_checkpoint_file, verify_dcp_checkpoint
from dit_video.errors import CheckpointError
from dit_video.files import sha256_file


def load_training_checkpoint(path: str | Path, sections: list[str] | None = None) -> dict:
    """A step checkpoint as one dict {"state_dict", "dit_video", ...}, from a file or a DCP folder.

    A sharded folder (written by FSDP2 at any world size) is read on this process, without a
    process group, into full CPU tensors; `sections` picks which of its top-level entries to
    read ("state_dict", "optimizer_0", ...; None = all; sampling needs only "state_dict", which
    skips the optimizer state, twice the weights' size under AdamW). Nothing is unpickled beyond
    tensors and plain types, and nothing is allocated that the shard files do not hold:
    `.metadata` is checked once (dit_video.checkpoint.dcp) and handed to the reader.
    """
    path = Path(path)
    if is_deepspeed_checkpoint(path):
        return load_deepspeed_checkpoint(path, sections)
    if path.is_dir():
        metadata = verify_dcp_checkpoint(path)
        state: dict = {}
        # No process group: DCP reads every shard on this process into plain tensors.
        load_dcp(state, path, metadata, SafeFullLoadPlanner(path, keys=sections), no_dist=True)
        meta = load_checkpoint_file(path / "meta.pt")
        if "state_dict" not in state:
            raise CheckpointError(f"checkpoint '{path}' holds no 'state_dict' (not a Lightning DCP checkpoint)")
        return {**meta, **state}
    return load_checkpoint_file(path)


def load_checkpoint(path: str | Path) -> dict:
    """Load a Lightning checkpoint written by dit-video, never unpickling arbitrary objects: a
    file, or a DCP folder written by FSDP2 at any world size (read whole on this process)."""
    path = Path(path)
    if path.is_dir() and ((path / ".metadata").is_file() or is_deepspeed_checkpoint(path)):
        ckpt = load_training_checkpoint(path, sections=["state_dict"])  # weights and meta, no optimizer state
    elif not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist (look in <run_dir>/checkpoints/)")
    else:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # never fall back to full unpickling
            raise CheckpointError(f"checkpoint '{path}' cannot be loaded safely (weights_only=True): {why(err)}") from None
    if "dit_video" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"checkpoint '{path}' was not written by dit-video's DiT training")
    return ckpt


def checkpoint_sha256(path: str | Path) -> str:
    """sha256 of a checkpoint file; of a DCP folder, over its files' relative names and contents."""
    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path).as_posix()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()
