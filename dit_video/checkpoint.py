"""Checkpoints that cannot be half-written, `ckpt_path=auto`, and an EMA exporter.

On disk, one run's `checkpoints/` folder holds

    step-00000400.ckpt     a complete checkpoint (a file; a folder of DCP shards under FSDP2)
    step-00000800.ckpt
    latest                 text: the name of the newest complete checkpoint
    last.ckpt -> step-00000800.ckpt   (convenience symlink, same target as `latest`)

A checkpoint is written under a temporary name (`.step-00000800.ckpt.tmp`), flushed to disk
(fsync of every file, then of the folder), and only then renamed to its final name; `latest` is
replaced the same way afterwards. A job killed at any moment (SIGKILL, node loss, full disk)
therefore leaves either the new checkpoint complete and pointed at, or the previous one still
complete and still pointed at; a leftover `.tmp` is ignored and removed by the next save.

Loading never unpickles code: files load with `torch.load(weights_only=True)` and the exported
EMA weights are a safetensors file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import shutil
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO

from dit_video.files import sha256_file
from dit_video.pipeline import CheckpointError

log = logging.getLogger("dit_video")

LATEST = "latest"  # pointer file: the name of the newest complete checkpoint
LAST_LINK = "last.ckpt"  # symlink to the same checkpoint, for humans and `sample.py ckpt=...`
_STEP_NAME = re.compile(r"^step-(\d{8})\.ckpt$")
# Serialisation overhead above the raw tensor bytes, and headroom so the save does not fill the
# disk to the last byte (other jobs, logs and the next checkpoint need some).
_SIZE_MARGIN = 1.1


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}.ckpt"


# ----------------------------------------------------------------------------- low-level atomic I/O


def fsync_path(path: Path) -> None:
    """Flush a file, or a folder's entries and every file below it, to stable storage."""
    if path.is_dir():
        for child in sorted(path.rglob("*")):
            if child.is_file():
                _fsync_fd(child, os.O_RDONLY)
        for folder in sorted({p.parent for p in path.rglob("*")} | {path}):
            _fsync_fd(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    else:
        _fsync_fd(path, os.O_RDONLY)


def _fsync_fd(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (the rename is only recorded in the folder's entry)."""
    _fsync_fd(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` so readers see the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_torch_save(obj, path: Path) -> None:
    """torch.save to a temporary name in the same folder, fsync, rename over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def state_bytes(obj) -> int:
    """Bytes of tensor data in a (nested) state dict; DTensors count their local shard."""
    if isinstance(obj, torch.Tensor):
        local = obj.to_local() if hasattr(obj, "to_local") else obj
        return local.numel() * local.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v) for v in obj)
    return 0


def check_free_space(folder: Path, needed: int, reserve: int = 0) -> None:
    """Raise CheckpointError before writing if `folder`'s disk cannot hold `needed` + `reserve` bytes."""
    free = shutil.disk_usage(folder).free
    if free < needed + reserve:
        gib = 1024**3
        raise CheckpointError(
            f"not enough disk space for a checkpoint in '{folder}': needs ~{needed / gib:.2f} GiB "
            f"(+ {reserve / gib:.2f} GiB checkpoint_reserve_gb), {free / gib:.2f} GiB free; free space, "
            f"lower checkpoint_keep, or point run_dir at a larger disk"
        )


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO for single-file checkpoints: atomic, durable writes and
    `weights_only=True` loads (a checkpoint carrying pickled code is refused, never executed)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return load_checkpoint_file(path)


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


# ----------------------------------------------------------------------------- finding checkpoints


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete step checkpoints in `ckpt_dir`, oldest first (temporaries are never listed)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if _STEP_NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP_NAME.match(p.name).group(1)))


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The checkpoint `latest` names; if the pointer is missing or stale, the newest complete one."""
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / LATEST
    if pointer.is_file():
        target = ckpt_dir / pointer.read_text().strip()
        if _STEP_NAME.match(target.name) and target.exists():
            return target
        log.warning("checkpoint pointer %s names a missing checkpoint; using the newest complete one", pointer)
    found = complete_checkpoints(ckpt_dir)
    return found[-1] if found else None


def resolve_ckpt_path(spec: str | None, ckpt_dir: Path) -> str | None:
    """`ckpt_path` as configured -> what `Trainer.fit(ckpt_path=...)` gets.

    None/"" starts fresh; "auto" resumes from the newest complete checkpoint in `ckpt_dir` (a
    fresh start if there is none, so a requeued job and its first attempt run the same command);
    anything else must exist.
    """
    if spec in (None, "", "null"):
        return None
    if spec == "auto":
        found = latest_checkpoint(ckpt_dir)
        if found is None:
            log.info("ckpt_path=auto: no checkpoint in %s, starting fresh", ckpt_dir)
            return None
        log.info("ckpt_path=auto: resuming from %s", found)
    else:
        found = Path(spec)
        if not found.exists():
            raise CheckpointError(f"ckpt_path: '{spec}' does not exist (use ckpt_path=auto to resume the newest one)")
    verify_checkpoint(found)
    return str(found)


# ----------------------------------------------------------------------------- the callback


class StepCheckpoint(Callback):
    """Save `step-N.ckpt` every `every_n_steps` optimizer steps and at the end of training,
    atomically; then move `latest`/`last.ckpt` to it and delete all but the newest `keep`.

    Works with every strategy: `trainer.save_checkpoint` writes a file (single, DDP, through
    SafeCheckpointIO) or a folder of shards (FSDP2/ModelParallelStrategy, every rank writes its
    own); rank 0 renames the finished temporary into place after a barrier.
    """

    def __init__(self, dirpath: str | Path, every_n_steps: int, keep: int = 3, reserve_gb: float = 0.0):
        if every_n_steps < 1:
            raise ValueError(f"checkpoint_every={every_n_steps} must be >= 1")
        if keep < 1:
            raise ValueError(f"checkpoint_keep={keep} must be >= 1 (the newest checkpoint is always kept)")
        self.dirpath = Path(dirpath)
        self.every_n_steps, self.keep = every_n_steps, keep
        self.reserve_bytes = int(reserve_gb * 1024**3)
        self.last_saved_step: int | None = None

    @property
    def state_key(self) -> str:
        return "StepCheckpoint"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > 0 and trainer.global_step % self.every_n_steps == 0:
            self.save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self.save(trainer)

    def last_before(self, step: int) -> Path | None:
        """The newest complete checkpoint saved at or before `step` (e.g. before trouble began)."""
        found = [p for p in complete_checkpoints(self.dirpath) if int(_STEP_NAME.match(p.name).group(1)) <= step]
        return found[-1] if found else None

    def save(self, trainer: L.Trainer) -> Path:
        """Write the checkpoint for the current step (collective: call on every rank)."""
        step = trainer.global_step
        final = self.dirpath / checkpoint_name(step)
        if self.last_saved_step == step and final.exists():
            return final
        tmp = self.dirpath / f".{final.name}.tmp"
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            _remove(tmp)  # a leftover from a killed save
            check_free_space(self.dirpath, self._estimate_bytes(trainer), self.reserve_bytes)
        trainer.strategy.barrier("dit_video_ckpt_start")
        trainer.save_checkpoint(tmp, weights_only=False)  # the full training state, not just weights
        trainer.strategy.barrier("dit_video_ckpt_written")
        if trainer.is_global_zero:
            fsync_path(tmp)
            _remove(final)  # only when re-saving the same step after a resume
            os.replace(tmp, final)
            fsync_dir(self.dirpath)
            atomic_write_text(self.dirpath / LATEST, final.name + "\n")
            _point_symlink(self.dirpath / LAST_LINK, final.name)
            self._prune(keep_also=final)
            log.info("checkpoint saved: %s", final)
        trainer.strategy.barrier("dit_video_ckpt_done")
        self.last_saved_step = step
        return final

    def _estimate_bytes(self, trainer) -> int:
        module_bytes = state_bytes(trainer.lightning_module.state_dict())
        optim_bytes = sum(state_bytes(list(opt.state.values())) for opt in trainer.optimizers)
        # Sharded strategies: every rank holds 1/world of this and the folder holds all of it.
        world = trainer.world_size if _is_sharded(trainer) else 1
        return int(_SIZE_MARGIN * world * (module_bytes + optim_bytes))

    def _prune(self, keep_also: Path) -> None:
        found = complete_checkpoints(self.dirpath)
        for old in found[: max(0, len(found) - self.keep)]:
            if old != keep_also:
                _remove(old)


def _is_sharded(trainer) -> bool:
    from lightning.pytorch.strategies import ModelParallelStrategy

    return isinstance(trainer.strategy, ModelParallelStrategy)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _point_symlink(link: Path, target_name: str) -> None:
    tmp = link.with_name(f".{link.name}.tmp")
    _remove(tmp)
    tmp.symlink_to(target_name)
    os.replace(tmp, link)


# ----------------------------------------------------------------------------- loader position


class ReplayLoader:
    """A training loader that resumes by replaying: it drops the first `skip` batches (the fallback
    for datamodules without their own position; see `with_loader_state`).

    Exact for loaders whose batch sequence is a deterministic function of their config, seed,
    rank and worker count (seeded streams, in-order workers). Replaying costs decoding the skipped
    batches again; a datamodule with its own state_dict (VideoDataModule) is used as it is.
    """

    def __init__(self, loader, skip: int = 0):
        self.loader, self.skip = loader, skip

    def __iter__(self):
        it = iter(self.loader)
        for _ in range(self.skip):
            next(it)
        return it


class ResumableData(L.LightningDataModule):
    """Wraps a datamodule without its own loader state so the training position is part of every
    checkpoint: the number of training batches consumed (Lightning's batch progress, which does
    not count the prefetched batch), restored before the loader is built, which then skips that
    many. Use `with_loader_state(datamodule)`, which only wraps when needed.
    """

    def __init__(self, inner: L.LightningDataModule):
        super().__init__()
        self.inner = inner
        self.skip_batches = 0

    def setup(self, stage: str | None = None) -> None:
        self.inner.trainer = self.trainer
        self.inner.setup(stage)

    def train_dataloader(self):
        return ReplayLoader(self.inner.train_dataloader(), self.skip_batches)

    def val_dataloader(self):
        if type(self.inner).val_dataloader is L.LightningDataModule.val_dataloader:
            return []  # the wrapped datamodule has no validation data
        return self.inner.val_dataloader()

    def state_dict(self) -> dict:
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        return {"train_batches": int(progress.processed)}

    def load_state_dict(self, state: dict) -> None:
        self.skip_batches = int(state["train_batches"])
        log.info("resuming the training loader at batch %d (replaying)", self.skip_batches)


def with_loader_state(datamodule: L.LightningDataModule) -> L.LightningDataModule:
    """`datamodule` itself if it saves and restores its own position (VideoDataModule does, through
    Lightning's datamodule state_dict/load_state_dict hooks), else wrapped in ResumableData."""
    base = L.LightningDataModule
    own = type(datamodule).state_dict is not base.state_dict and type(datamodule).load_state_dict is not (
        base.load_state_dict
    )
    return datamodule if own else ResumableData(datamodule)


# ----------------------------------------------------------------------------- loading and export


def load_training_checkpoint(path: str | Path, sections: list[str] | None = None) -> dict:
    """A step checkpoint as one dict {"state_dict", "dit_video", ...}, from a file or a DCP folder.

    A sharded folder (written by FSDP2 at any world size) is read on this process, without a
    process group, into full CPU tensors; `sections` picks which of its top-level entries to
    read ("state_dict", "optimizer_0", ...; None = all; sampling needs only "state_dict", which
    skips the optimizer state, twice the weights' size under AdamW). Nothing is unpickled beyond
    tensors and plain types: `.metadata` passes the allowlist first (verify_checkpoint).
    """
    path = Path(path)
    if path.is_dir():
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

        verify_checkpoint(path)
        state: dict = {}
        # No process group: DCP reads every shard on this process into plain tensors.
        _load_state_dict(state, storage_reader=FileSystemReader(str(path)),
                         planner=_EmptyStateDictLoadPlanner(keys=sections), no_dist=True)
        meta = load_checkpoint_file(path / "meta.pt")
        if "state_dict" not in state:
            raise CheckpointError(f"checkpoint '{path}' holds no 'state_dict' (not a Lightning DCP checkpoint)")
        return {**meta, **state}
    return load_checkpoint_file(path)


def checkpoint_sha256(path: str | Path) -> str:
    """sha256 of a checkpoint file; of a DCP folder, over its files' relative names and contents."""
    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path).as_posix()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def export_ema(ckpt_path: str | Path, out: str | Path) -> Path:
    """Write the EMA weights of a DiT checkpoint as one safetensors file with the run's metadata.

    The file holds the DiT state dict (keys as in `DiT.state_dict()`) and, in the safetensors
    header, `dit_video` = the JSON the checkpoint records (DiT config, latent shape, encoders).
    Load it with `load_exported(path)`; safetensors cannot carry code.
    """
    from safetensors.torch import save_file

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
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["dit_video"])
        state = {k: f.get_tensor(k) for k in f.keys()}
    return state, meta


def main(argv: list[str] | None = None) -> None:
    """python -m dit_video.checkpoint export <ckpt file or folder | run checkpoints/ dir> <out.safetensors>"""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    exp = sub.add_parser("export", help="EMA weights + config -> one safetensors file")
    exp.add_argument("ckpt")
    exp.add_argument("out")
    args = parser.parse_args(argv)
    ckpt = Path(args.ckpt)
    if ckpt.is_dir() and not (ckpt / ".metadata").is_file():  # a checkpoints/ folder: take its latest
        found = latest_checkpoint(ckpt)
        if found is None:
            raise SystemExit(f"no complete checkpoint in {ckpt}")
        ckpt = found
    print(export_ema(ckpt, args.out))


if __name__ == "__main__":
    main()
