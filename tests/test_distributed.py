"""DDP and FSDP2 on 2 CPU processes (gloo, torchrun) against single-process training.

What runs here: Lightning's DDPStrategy and ModelParallelStrategy (FSDP2 `fully_shard` per DiT
block from DiTModule.configure_model -> dit_video.parallel) both work on CPU with gloo, built by
`run.build_trainer` from conf/strategy/{single,ddp,fsdp}.yaml. (Lightning's FSDPStrategy and
DeepSpeedStrategy refuse CPU; DeepSpeed is tested with plain `deepspeed.initialize` in
test_distributed_deepspeed.py.)

Same global batch everywhere: 8 samples per step, as 1 x 8 or 2 ranks x 4 (Lightning's
DistributedSampler interleaves the ids, so the union per step is the same 8). Each sample's
latents and text come from a generator seeded by its id, its noise and t from one seeded by
(step, id), so nothing depends on which rank draws them. Losses are the mean over ranks. fp32 (bf16 would
change the reduction order's rounding): equal within 1e-5 relative.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300
STEPS = 4
GLOBAL_BATCH = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- worker (runs under torchrun)


def make_module(cfg):
    import dataclasses

    from torch import nn

    from dit_video.build import build_dit_config, build_objective_from, build_parallel
    from dit_video.build import dataclass_from as _dataclass_from
    from dit_video.lit_module import DiTModule, OptimConfig
    from dit_video.model import DiT

    class FixedNoiseDiT(DiTModule):
        """DiTModule whose batch is a list of sample ids: data = f(id), noise and t = f(step, id)."""

        def training_step(self, batch, batch_idx):
            losses = []
            for sample in batch.tolist():
                data = torch.Generator().manual_seed(10**6 + sample)  # never equal to a noise seed
                latents = torch.randn(1, 4, 3, 4, 4, generator=data)  # [1, C, T', H', W']
                text_emb = torch.randn(1, 5, 16, generator=data)  # [1, L, D]
                text_mask = torch.tensor([[True, True, True, sample % 2 == 0, False]])
                noise = torch.Generator().manual_seed(1000 * self.global_step + sample)
                loss, _ = self.objective.loss(self.dit, latents, text_emb, text_mask, generator=noise)
                losses.append(loss)
            return torch.stack(losses).mean()

    dit_cfg = build_dit_config(cfg.model, in_channels=4, text_dim=16)
    optim = _dataclass_from(OptimConfig, cfg.optim, "optim")
    parallel = build_parallel(cfg)
    meta = {"dit_config": dataclasses.asdict(dit_cfg), "latent_shape": [3, 4, 4], "config": {}}
    return FixedNoiseDiT(DiT(dit_cfg), build_objective_from(cfg), nn.Identity(), nn.Identity(), optim,
                         float(cfg.ema_decay), meta, parallel)


def worker_overrides(out: str) -> list[str]:
    """The tiny fp32 gloo run both 2-process training tests compose (plus their own overrides)."""
    return ["model.depth=2", "model.hidden_size=32", "model.num_heads=2", "optim.warmup_steps=2", "optim.lr=3e-3",
            "trainer.precision=32-true", "trainer.enable_model_summary=false", "+trainer.enable_progress_bar=false",
            "trainer.log_every_n_steps=1", "checkpoint_reserve_gb=0", "strategy.process_group_backend=gloo",
            "objective.caption_dropout=0.0", "eval=off", f"run_dir={out}"]


def worker(out: str, overrides: list[str]) -> None:
    import lightning as L
    from hydra import compose, initialize_config_dir
    from test_resume import LossRecorder
    from torch.utils.data import DataLoader

    from dit_video.checkpoint.paths import resolve_ckpt_path
    from dit_video.run import build_trainer

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*worker_overrides(out), *overrides])
    torch.set_num_threads(1)
    L.seed_everything(0)
    module = make_module(cfg)
    trainer = build_trainer(cfg, Path(out), extra_callbacks=[LossRecorder(str(Path(out) / "losses.txt"))])
    per_rank = GLOBAL_BATCH // trainer.world_size
    loader = DataLoader(torch.arange(GLOBAL_BATCH), batch_size=per_rank, shuffle=False)
    trainer.fit(module, loader, ckpt_path=resolve_ckpt_path(cfg.ckpt_path, Path(out) / "checkpoints"), weights_only=True)
    torch.distributed.destroy_process_group() if torch.distributed.is_initialized() else None


# ----------------------------------------------------------------------------- test side


def torchrun(nproc: int, out: Path, *overrides: str) -> dict[int, float]:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}", OMP_NUM_THREADS="1", DIT_VIDEO_QUIET="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", str(Path(__file__).resolve()), str(out),
           f"trainer.devices={nproc}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-5000:]
    losses = {}
    for line in (out / "losses.txt").read_text().splitlines():
        step, loss, *_ = line.split()
        losses[int(step)] = float(loss)
    return losses


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    return torchrun(1, out, "strategy=single", f"trainer.max_steps={STEPS}", "checkpoint_every=2"), out


def assert_close(losses: dict[int, float], reference: dict[int, float]) -> None:
    assert sorted(losses) == sorted(reference)
    torch.testing.assert_close(torch.tensor([losses[s] for s in sorted(losses)]),
                               torch.tensor([reference[s] for s in sorted(reference)]), rtol=1e-5, atol=1e-6)


def test_ddp_two_processes_match_single_process(single, tmp_path):
    reference, _ = single
    assert sorted(reference) == list(range(1, STEPS + 1))
    losses = torchrun(2, tmp_path, "strategy=ddp", f"trainer.max_steps={STEPS}", "checkpoint_every=2")
    assert_close(losses, reference)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)  # one file, written by rank 0
    per_rank = ckpt["callbacks"]["RNGState"]["per_rank"]
    assert ckpt["global_step"] == STEPS and len(per_rank) == 2
    # seed_everything seeds every rank alike; RNGState.on_train_start gives rank 1 its own stream,
    # so ranks do not draw identical noise and t for their different clips.
    assert not torch.equal(per_rank[0]["torch"], per_rank[1]["torch"])


def test_fsdp2_two_processes_match_single_process_and_reload_sharded_at_world_size_1(single, tmp_path):
    from dit_video.checkpoint.export import export_ema, load_exported
    from dit_video.checkpoint.load import load_training_checkpoint

    reference, single_dir = single
    run2 = tmp_path / "ws2"
    losses = torchrun(2, run2, "strategy=fsdp", "strategy.parallel.fsdp_param_dtype=null",
                      f"trainer.max_steps={STEPS}", "checkpoint_every=2")
    assert_close(losses, reference)
    sharded = run2 / "checkpoints" / "step-00000002.ckpt"
    assert sharded.is_dir() and len(list(sharded.glob("*.distcp"))) == 2  # one shard file per rank
    # The sharded checkpoint of world size 2 continues at world size 1 (DCP reshards on load).
    run1 = tmp_path / "ws1"
    resumed = torchrun(1, run1, "strategy=fsdp", "strategy.parallel.fsdp_param_dtype=null",
                       f"trainer.max_steps={STEPS}", "checkpoint_every=2", f"ckpt_path={sharded}")
    assert sorted(resumed) == [3, 4]
    assert_close(resumed, {s: reference[s] for s in (3, 4)})
    # ... and exports to one safetensors file on a process without any process group.
    weights, meta = load_exported(export_ema(run2 / "checkpoints" / "step-00000004.ckpt", tmp_path / "ema.safetensors"))
    single_ema = load_training_checkpoint(single_dir / "checkpoints" / "step-00000004.ckpt")["state_dict"]
    assert meta["latent_shape"] == [3, 4, 4]
    for key, value in weights.items():
        torch.testing.assert_close(value, single_ema[f"ema.{key}"], rtol=1e-4, atol=1e-5)


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2:])
