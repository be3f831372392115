"""LoRA under DDP and FSDP2 (Lightning ModelParallelStrategy), 2 gloo processes: the loss trace equals one
process's, only the adapters move (the frozen base stays bitwise), checkpoints hold the adapters and their
EMA only, and a resume from the step-2 checkpoint continues the trace exactly. Collective parity is checked
on every run (strategy_run.torchrun)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from strategy_run import STEPS, assert_close, read_losses, torchrun

from dit_video.checkpoint.load import load_training_checkpoint
from dit_video.lora import is_adapter_key

pytest.importorskip("peft")

LORA = ["lora=wan", "lora.rank=4", "lora.alpha=8", "lora.dropout=0.0", f"trainer.max_steps={STEPS}",
        "checkpoint_every=2", "ema_decay=0.9"]
FP32 = ["strategy.parallel.fsdp_param_dtype=null"]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> tuple[dict[int, float], Path]:
    out = tmp_path_factory.mktemp("lora_single")
    return torchrun(1, out, *LORA), out


def check_run(out: Path, reference: dict[int, float], single_dir: Path) -> None:
    losses = read_losses(out)
    assert_close(losses, reference)
    trajectory = torch.load(out / "trajectory.pt", weights_only=True)["weights"]
    first, last = trajectory[0], trajectory[STEPS]
    adapters = [k for k in first if is_adapter_key(k)]
    frozen = [k for k in first if not is_adapter_key(k)]
    assert adapters and frozen
    assert all(torch.equal(first[k], last[k]) for k in frozen)  # the base, bitwise
    assert any(not torch.equal(first[k], last[k]) for k in adapters)
    state = load_training_checkpoint(out / "checkpoints" / f"step-{STEPS:08d}.ckpt")["state_dict"]
    assert set(state) == {f"dit.{k}" for k in adapters} | {f"ema.{k}" for k in adapters}
    for key in adapters:  # the same adapters as one process trained
        torch.testing.assert_close(state[f"dit.{key}"].float(), last[key], rtol=1e-4, atol=1e-5)
    reference_state = load_training_checkpoint(single_dir / "checkpoints" / f"step-{STEPS:08d}.ckpt")["state_dict"]
    for key, value in reference_state.items():  # ... and the same EMA of them
        torch.testing.assert_close(state[key].float(), value.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [["strategy=ddp"], ["strategy=fsdp", *FP32]], ids=["ddp", "fsdp2"])
def test_lora_two_processes_match_one_and_resume_exactly(strategy, single, tmp_path):
    reference, single_dir = single
    out = tmp_path / "run"
    torchrun(2, out, *strategy, *LORA, f"--resume-from={out / 'checkpoints' / 'step-00000002.ckpt'}")
    check_run(out, reference, single_dir)
    resumed = read_losses(out / "resumed")
    assert sorted(resumed) == [3, 4]
    assert_close(resumed, {s: reference[s] for s in (3, 4)})  # the resumed trace equals the uninterrupted one
    final = load_training_checkpoint(out / "resumed" / "checkpoints" / f"step-{STEPS:08d}.ckpt")["state_dict"]
    uninterrupted = load_training_checkpoint(out / "checkpoints" / f"step-{STEPS:08d}.ckpt")["state_dict"]
    assert set(final) == set(uninterrupted)
    for key, value in uninterrupted.items():
        torch.testing.assert_close(final[key].float(), value.float(), rtol=1e-5, atol=1e-6)
