"""The training loader's position in every checkpoint, for datamodules that do not save their own."""

from __future__ import annotations

import logging

import lightning as L

log = logging.getLogger("dit_video")


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
