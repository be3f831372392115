"""Saving: the StepCheckpoint callback and SafeCheckpointIO write checkpoints that cannot be half-written.

A checkpoint is written under a temporary name, fsynced, renamed into place, and only then does
`latest` move (see the package docstring for the folder layout).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy

from dit_video.checkpoint.paths import LAST_LINK, LATEST, STEP_NAME, checkpoint_name, complete_checkpoints
from dit_video.checkpoint.verify import load_checkpoint_file
from dit_video.errors import CheckpointError
from dit_video.files import atomic_write_text, fsync_dir, fsync_path

log = logging.getLogger("dit_video")

# Serialisation overhead above the raw tensor bytes, and headroom so the save does not fill the
# disk to the last byte (other jobs, logs and the next checkpoint need some).
_SIZE_MARGIN = 1.1


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


def check_free_space(folder: Path, needed: int, reserve: int = 0, free: int | None = None) -> None:
    """Raise CheckpointError before writing if `folder`'s disk cannot hold `needed` + `reserve` bytes
    (`free`: bytes free, as measured by the caller; None = measure `folder` now)."""
    free = shutil.disk_usage(folder).free if free is None else free
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
        found = [p for p in complete_checkpoints(self.dirpath) if int(STEP_NAME.match(p.name).group(1)) <= step]
        return found[-1] if found else None

    def save(self, trainer: L.Trainer) -> Path:
        """Write the checkpoint for the current step (collective: call on every rank)."""
        step = trainer.global_step
        final = self.dirpath / checkpoint_name(step)
        if self.last_saved_step == step and final.exists():
            return final
        tmp = self.dirpath / f".{final.name}.tmp"
        self.dirpath.mkdir(parents=True, exist_ok=True)  # every rank measures the disk it writes to
        if trainer.is_global_zero:
            _remove(tmp)  # a leftover from a killed save
        self._check_space(trainer)
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

    def _check_space(self, trainer) -> None:
        """Raise the same CheckpointError on every rank, or on none: a rank that raised alone would
        leave the others waiting in the next barrier until the NCCL timeout. Every rank measures,
        and all judge the worst case (least free space, largest estimate) over the ranks."""
        free, needed = shutil.disk_usage(self.dirpath).free, self._estimate_bytes(trainer)
        worst = torch.tensor([-free, needed], dtype=torch.int64, device=trainer.strategy.root_device)  # [2]
        worst = trainer.strategy.reduce(worst, reduce_op="max").tolist()
        check_free_space(self.dirpath, worst[1], self.reserve_bytes, free=-worst[0])

    def _estimate_bytes(self, trainer) -> int:
        if isinstance(trainer.strategy, DeepSpeedStrategy):
            return int(_SIZE_MARGIN * deepspeed_checkpoint_bytes(trainer.lightning_module))
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


def deepspeed_checkpoint_bytes(module) -> int:
    """What a ZeRO checkpoint folder holds for `module`'s trained weights, whatever the stage: the
    fp32 master weights and AdamW's two moments (12 B/param, spread over the ranks' optimizer
    files), the module weights in their training dtype, and the fp32 EMA (client state). Under
    ZeRO-3 a parameter's local tensor is empty, so sizes come from DeepSpeed's `ds_numel`."""
    total = 0
    for p in module.parameters():
        if p.requires_grad:
            numel = int(getattr(p, "ds_numel", p.numel()))
            total += numel * (12 + p.element_size())
    ema = getattr(module, "ema_weights", None)
    if ema is not None:
        total += state_bytes(ema.module.state_dict())
    return total


def _is_sharded(trainer) -> bool:
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
