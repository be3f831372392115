"""Exact, resumable order: same keys and pixels after a resume (2 workers), no repeats or drops
when the world size changes, and the state round-trips through a real Lightning checkpoint."""

from __future__ import annotations

import itertools
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from data_prep.make_demo import make_demo
from dit_video.data.config import VideoDataConfig
from dit_video.data.datamodule import VideoDataModule
from dit_video.data.order import epoch_batches, steps_per_rank, train_steps

T, SIZE = 5, 16


@pytest.fixture(scope="module")
def resume_shards(tmp_path_factory) -> Path:
    """30 tiny clips in 4 shards (fewer shards than some readers below)."""
    out = tmp_path_factory.mktemp("resume")
    make_demo(out, num_clips=30, val_clips=0, size=SIZE, frames=9, shard_size=8, seed=0)
    return out


def _module(shards: Path, workers: int, batch_size: int = 3) -> VideoDataModule:
    cfg = VideoDataConfig(shards=str(shards / "train-*.tar"), val_shards=None, num_frames=T, fps=None,
                          size=(SIZE, SIZE), batch_size=batch_size, num_workers=workers, shuffle_buffer=1, seed=7)
    return VideoDataModule(cfg)


def _consume(module: VideoDataModule, n: int) -> list[dict]:
    """n training batches through the hook Lightning calls, as a training loop would see them."""
    out = []
    loader = module.train_dataloader()
    for batch in itertools.islice(loader, n):
        out.append(module.on_before_batch_transfer(batch, 0))
    del loader
    return out


def test_order_is_a_partition_of_each_epoch():
    bucket_of = np.array([0] * 10 + [1] * 7)
    batches = epoch_batches(bucket_of, [3, 2], seed=1, epoch=0)
    flat = np.concatenate(batches)
    assert len(flat) == len(set(flat.tolist())) == 9 + 6  # each bucket's incomplete tail dropped
    assert all(len(set(bucket_of[b].tolist())) == 1 for b in batches)  # one bucket per batch
    assert [b.tolist() for b in batches] == [b.tolist() for b in epoch_batches(bucket_of, [3, 2], 1, 0)]
    assert [b.tolist() for b in batches] != [b.tolist() for b in epoch_batches(bucket_of, [3, 2], 1, 1)]
    # Two workers of one rank split the steps between them, in alternation.
    steps = [list(train_steps(10, 2, 2, 1, 2, w)) for w in range(2)]
    assert [g for _, g, _ in steps[0]] == [3, 7] and [g for _, g, _ in steps[1]] == [5, 9]


@pytest.mark.parametrize("stop", [1, 4, 9])
def test_resume_mid_epoch_with_two_workers_gives_the_same_batches(resume_shards, stop):
    total = 12  # 10 batches per epoch: crosses into epoch 1
    reference = _consume(_module(resume_shards, workers=2), total)
    first = _module(resume_shards, workers=2)
    _consume(first, stop)
    state = first.state_dict()
    assert state["batches_into_epoch"] == stop and state["epoch"] == 0
    resumed = _module(resume_shards, workers=2)
    resumed.load_state_dict(state)
    rest = _consume(resumed, total - stop)
    for want, got in zip(reference[stop:], rest, strict=True):
        assert want["key"] == got["key"]
        assert torch.equal(want["clip"], got["clip"])  # same frames and crops, not just the same files


def test_worker_count_does_not_change_the_order(resume_shards):
    keys = [[b["key"] for b in _consume(_module(resume_shards, workers=w), 6)] for w in (0, 2)]
    assert keys[0] == keys[1]


def test_world_size_change_resumes_without_repeats_or_drops(resume_shards):
    """2 ranks for 2 steps, then 4 ranks to the end of the epoch: every batch of the epoch is
    read exactly once, except the documented tail ((remaining) mod 4 batches)."""
    module = _module(resume_shards, workers=0)
    seen = []
    for rank in range(2):
        ds = module.train_dataset()
        ds.rank, ds.world_size = rank, 2
        batches = list(itertools.islice(iter(ds), 2))
        seen += [k for b in batches for k in b["key"]]
    assert batches[-1]["position"] == (0, 4)  # 2 steps x 2 ranks consumed
    module.load_state_dict({**module.state_dict(), "epoch": 0, "batches_into_epoch": 4})
    plan = ds.epoch_plan(0)
    steps = steps_per_rank(len(plan), 4, 4)
    assert len(plan) == 10 and steps == 1  # 6 batches left for 4 ranks: 1 step each, 2 in the tail
    for rank in range(4):
        ds = module.train_dataset()
        ds.rank, ds.world_size = rank, 4
        batches = list(itertools.islice(iter(ds), steps))
        assert batches[-1]["position"] == (1, 0)  # the epoch is over for every rank at once
        seen += [k for b in batches for k in b["key"]]
    plan_keys = [ds.index.samples[i].key for b in plan for i in b]
    assert len(seen) == len(set(seen)), "a sample was repeated"
    assert sorted(seen) == sorted(plan_keys[: 8 * 3])  # batches 0-7 of the epoch; only the 2-batch tail is skipped


class _KeyRecorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.keys: list[list[str]] = []

    def training_step(self, batch, batch_idx):
        self.keys.append(list(batch["key"]))
        return (self.w - batch["clip"].float().mean()).pow(2)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(module: VideoDataModule, steps: int, root: Path, ckpt: str | None = None) -> _KeyRecorder:
    model = _KeyRecorder()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(root), num_sanity_val_steps=0,
                        limit_val_batches=0, enable_checkpointing=False)
    trainer.fit(model, datamodule=module, ckpt_path=ckpt)
    if ckpt is None:
        trainer.save_checkpoint(root / "last.ckpt")
    return model


def test_lightning_checkpoint_resume_is_exact(resume_shards, tmp_path):
    reference = _fit(_module(resume_shards, workers=2), 7, tmp_path / "a").keys
    _fit(_module(resume_shards, workers=2), 3, tmp_path / "b")
    ckpt = torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)
    assert ckpt["VideoDataModule"]["batches_into_epoch"] == 3
    resumed = _fit(_module(resume_shards, workers=2), 7, tmp_path / "c", ckpt=str(tmp_path / "b" / "last.ckpt"))
    assert resumed.keys == reference[3:]
