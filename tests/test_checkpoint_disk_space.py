"""The disk-space check before a checkpoint is one decision for all ranks.

2 gloo processes under torchrun, Lightning DDP, a StepCheckpoint every step; only rank 0's disk
is full. Before the fix rank 0 raised while rank 1 waited in the checkpoint barrier (on a cluster,
until the NCCL timeout). Now both raise the same CheckpointError and both exit promptly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from spawn_ranks import free_port

ROOT = Path(__file__).resolve().parents[1]


def worker(out: Path) -> None:
    """One torchrun rank: a 1-step Lightning DDP fit whose first checkpoint finds rank 0's disk full."""
    import shutil
    from collections import namedtuple

    import lightning as L
    import torch
    from lightning.pytorch.strategies import DDPStrategy

    from dit_video.checkpoint import save
    from dit_video.checkpoint.save import StepCheckpoint

    rank = int(os.environ["RANK"])
    if rank == 0:  # a full disk on rank 0 only (e.g. a node-local scratch folder)
        usage = namedtuple("usage", "total used free")
        real = shutil.disk_usage
        save.shutil.disk_usage = lambda path: usage(real(path).total, real(path).total, 0)

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.net(batch).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.set_num_threads(1)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(process_group_backend="gloo"),
                        max_steps=2, callbacks=[StepCheckpoint(out / "checkpoints", every_n_steps=1)], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    try:
        trainer.fit(Tiny(), torch.utils.data.DataLoader(torch.randn(8, 2), batch_size=2))
        outcome = "no error"
    except Exception as err:  # noqa: BLE001 - the outcome is what this rank reports
        outcome = f"{type(err).__name__}: {err}"
    (out / f"rank{rank}.txt").write_text(outcome)
    torch.distributed.destroy_process_group() if torch.distributed.is_initialized() else None


def test_a_full_disk_on_one_rank_stops_every_rank_with_the_same_error(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DIT_VIDEO_QUIET="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", str(Path(__file__).resolve()), str(tmp_path)]
    # A rank left in the barrier would hang until gloo's 30-minute timeout: 120 s means it hung.
    subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    outcomes = [(tmp_path / f"rank{r}.txt").read_text() if (tmp_path / f"rank{r}.txt").is_file() else "killed"
                for r in range(2)]
    assert outcomes[0].startswith("CheckpointError: not enough disk space"), outcomes
    assert outcomes[1] == outcomes[0]  # the same decision and the same message on every rank
    assert not list((tmp_path / "checkpoints").glob("step-*"))  # nothing written


if __name__ == "__main__":
    worker(Path(sys.argv[1]))


def test_a_zero_checkpoint_is_estimated_from_the_full_parameter_count():
    """Under DeepSpeed a ZeRO-3 parameter's local tensor is empty and the optimizer state is not in
    `trainer.optimizers[i].state`: the estimate counted ~0 bytes. It now counts every trained
    parameter (ds_numel) at fp32 master + AdamW moments + its training dtype, plus the fp32 EMA."""
    from types import SimpleNamespace

    import torch
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from dit_video.checkpoint.save import StepCheckpoint
    from dit_video.lit_module.ema import EMAWeights

    net = torch.nn.Linear(100, 50)  # 5050 parameters
    module = torch.nn.Module()
    module.dit = net.to(torch.bfloat16)
    module.ema_weights = EMAWeights(net)
    numel = sum(p.numel() for p in net.parameters())
    for p in net.parameters():  # as ZeRO-3 leaves them: an empty local tensor, the true size in ds_numel
        p.ds_numel = p.numel()
        p.data = torch.empty(0, dtype=torch.bfloat16)
    trainer = SimpleNamespace(strategy=DeepSpeedStrategy(stage=3), lightning_module=module, optimizers=[],
                              world_size=8)
    estimate = StepCheckpoint("unused", every_n_steps=1)._estimate_bytes(trainer)
    assert estimate == int(1.1 * numel * (12 + 2 + 4))  # master + moments, bf16 weights, fp32 EMA
