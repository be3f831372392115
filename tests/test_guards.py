"""NonFiniteGuard on a real Trainer: NaN/Inf steps are skipped (weights untouched) and counted,
too many in a window stop the run naming the last good checkpoint; loss spikes are logged."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader

from dit_video.callbacks import NonFiniteGuard
from dit_video.checkpoint.paths import checkpoint_name
from dit_video.checkpoint.save import SafeCheckpointIO, StepCheckpoint
from dit_video.errors import TrainingDiverged


class _InfGrad(torch.autograd.Function):
    """Identity times zero forward (the loss stays finite); Inf gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x * 0.0

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("inf"))


class Injecting(L.LightningModule):
    """A linear model whose loss is NaN (`nan_steps`), whose gradient is Inf with a finite loss
    (`inf_grad_steps`), or 100x larger (`spike_steps`) at the given optimizer steps."""

    def __init__(self, nan_steps=(), inf_grad_steps=(), spike_steps=()):
        super().__init__()
        self.net = nn.Linear(4, 1)
        self.nan_steps, self.inf_grad_steps, self.spike_steps = set(nan_steps), set(inf_grad_steps), set(spike_steps)

    def training_step(self, batch, batch_idx):
        loss = self.net(batch).square().mean()
        step = self.global_step
        if step in self.nan_steps:
            loss = loss * float("nan")
        if step in self.inf_grad_steps:
            loss = loss + _InfGrad.apply(self.net.weight).sum()  # finite loss, Inf gradient
        if step in self.spike_steps:
            loss = loss * 100.0
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


class Weights(Callback):
    """Weights after every optimizer step, by step."""

    def __init__(self):
        self.after: dict[int, torch.Tensor] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[trainer.global_step] = pl_module.net.weight.detach().clone()


def data():
    return DataLoader(torch.randn(400, 4, generator=torch.Generator().manual_seed(0)) + 1.0, batch_size=8)


def fit(tmp_path, module, steps, guard, extra=()):
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, plugins=[SafeCheckpointIO()],
                        callbacks=[guard, *extra], default_root_dir=str(tmp_path))
    trainer.fit(module, data())
    return trainer


def test_nan_loss_and_inf_grad_steps_are_skipped_and_counted(tmp_path):
    guard = NonFiniteGuard(max_bad_steps=5, window=100)
    weights = Weights()
    # global_step g is the step being taken; its result is recorded as step g + 1.
    fit(tmp_path, Injecting(nan_steps={3, 4}, inf_grad_steps={6}), 10, guard, [weights])
    assert guard.skipped_total == 3
    for skipped in (3, 4, 6):
        assert torch.equal(weights.after[skipped + 1], weights.after[skipped]), skipped  # weights did not move
    assert not torch.equal(weights.after[3], weights.after[2])  # normal steps do move them
    assert all(torch.isfinite(w).all() for w in weights.after.values())


def test_too_many_nonfinite_steps_stop_and_name_the_last_good_checkpoint(tmp_path):
    ckpt = StepCheckpoint(tmp_path / "ckpts", every_n_steps=2)
    guard = NonFiniteGuard(max_bad_steps=2, window=10, checkpoint=ckpt)
    with pytest.raises(TrainingDiverged) as err:
        fit(tmp_path, Injecting(nan_steps=set(range(5, 100))), 50, guard, [ckpt])
    msg = str(err.value)
    # Steps 5, 6, 7 are non-finite -> stop at the third; the last checkpoint was at step 4.
    assert "3 non-finite steps within 10 steps" in msg and "guard.max_bad_steps=2" in msg
    assert str(tmp_path / "ckpts" / checkpoint_name(4)) in msg


def test_isolated_bad_steps_outside_the_window_do_not_stop(tmp_path):
    guard = NonFiniteGuard(max_bad_steps=1, window=5)
    trainer = fit(tmp_path, Injecting(nan_steps={2, 9, 16}), 20, guard)
    assert trainer.global_step == 20 and guard.skipped_total == 3


def test_loss_spike_is_detected_and_kept(tmp_path):
    guard = NonFiniteGuard(spike_zscore=6.0, spike_warmup=10)
    weights = Weights()
    fit(tmp_path, Injecting(spike_steps={30}), 40, guard, [weights])
    assert guard.spikes_total == 1 and guard.skipped_total == 0
    assert not torch.equal(weights.after[31], weights.after[30])  # a spike is logged, not skipped
