"""ZeRO checkpoint folders (checkpoint/deepspeed.py): recognised by every entry point, verified
without unpickling code, refused when a file would. Reading real ZeRO-2/3 checkpoints whole,
resuming from them and sampling from them is tested on Lightning runs in test_distributed.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dit_video.checkpoint.deepspeed import is_deepspeed_checkpoint
from dit_video.checkpoint.load import load_checkpoint
from dit_video.checkpoint.paths import resolve_checkpoint, resolve_ckpt_path
from dit_video.checkpoint.verify import verify_checkpoint
from dit_video.errors import CheckpointError


class RunsCode:
    """Unpickling this calls a function: what a hostile checkpoint would do (here a harmless one)."""

    def __reduce__(self):
        return (os.getcwd, ())


def zero_folder(root: Path, model_states: dict, optim_states: dict) -> Path:
    """The layout Lightning's DeepSpeedStrategy writes: <ckpt>/latest and <ckpt>/<tag>/*.pt."""
    ckpt = root / "step-00000002.ckpt"
    (ckpt / "checkpoint").mkdir(parents=True)
    (ckpt / "latest").write_text("checkpoint")
    torch.save(model_states, ckpt / "checkpoint" / "mp_rank_00_model_states.pt")
    torch.save(optim_states, ckpt / "checkpoint" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    return ckpt


def test_a_zero_folder_with_deepspeed_types_verifies_and_is_a_checkpoint_everywhere(tmp_path):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    optim = {"optimizer_state_dict": {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum(2),
                                      "single_partition_of_fp32_groups": [torch.zeros(4)]}}
    ckpt = zero_folder(tmp_path, {"module": {"dit.w": torch.ones(2)}, "dit_video": {}}, optim)
    assert is_deepspeed_checkpoint(ckpt)
    verify_checkpoint(ckpt)  # DCP folders need .metadata; a ZeRO folder is verified file by file instead
    assert resolve_ckpt_path(str(ckpt), tmp_path) == str(ckpt)  # ckpt_path=<folder>, as auto/+resume resolve it
    assert resolve_checkpoint(ckpt) == ckpt  # sample.py / the notebook API: a checkpoint, not a run directory


def test_a_zero_folder_that_would_run_code_is_refused_before_anything_reads_it(tmp_path):
    ckpt = zero_folder(tmp_path, {"module": {}}, {"optimizer_state_dict": {"payload": RunsCode()}})
    for entry in (verify_checkpoint, load_checkpoint, lambda p: resolve_ckpt_path(str(p), tmp_path)):
        with pytest.raises(CheckpointError, match="cannot be loaded safely"):
            entry(ckpt)
