"""Sequence parallelism in training (strategy.sequence_parallel_size): a DiT whose tokens are split
over 2 gloo processes (Ulysses or ring attention) equals the whole DiT on one process.

Fast test (torch.multiprocessing, no Lightning): forward output and data-parallel-averaged
gradients of `parallel.shard_sequence` vs the plain model, for ulysses, ring and ulysses with
activation checkpointing; eval-mode forwards stay whole; bad setups are one-line errors.
Slow test (torchrun + Lightning DDP, as tests/test_distributed.py): 2 processes with
sequence_parallel_size=2 train the same loss trace and the same final weights as 1 process with
the same batch (forward, gradients, AdamW), reading the same samples on both ranks.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from spawn_ranks import assert_collective_parity, free_port, record_collectives, spawn_ranks

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2


def tiny_dit(num_heads: int = 2, hidden_size: int = 32):
    from dit_video.model import DiT, DiTConfig

    torch.manual_seed(0)
    model = DiT(DiTConfig(in_channels=4, text_dim=8, hidden_size=hidden_size, depth=2, num_heads=num_heads))
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.1)  # leave adaLN-Zero, so every parameter gets a non-trivial gradient
    return model


def inputs():
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 3, 4, 4, generator=g), torch.rand(2, generator=g)  # 3*2*2 = 12 tokens
    text, mask = torch.randn(2, 5, 8, generator=g), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    weight = torch.randn(2, 4, 3, 4, 4, generator=g)  # dL/dout, so no two outputs share a gradient
    return x, t, text, mask, weight


def run(model):
    """Output and parameter gradients of sum(out * weight)."""
    x, t, text, mask, weight = inputs()
    model.zero_grad(set_to_none=True)
    out = model(x, t, text, mask)  # [B, C, T, H, W]
    (out * weight).sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


def _rank(rank: int, store: str, queue) -> None:
    from dit_video.parallel import ParallelConfig, parallelize, sequence_parallel_group, shard_sequence

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        group = sequence_parallel_group(WORLD)
        reference = tiny_dit()
        ref_out, ref_grads = run(reference)
        done = []
        for attention, checkpointing in (("ulysses", False), ("ring", False), ("ulysses", True)):
            model = shard_sequence(copy.deepcopy(reference), group, attention)
            parallelize(model, ParallelConfig(activation_checkpointing=checkpointing))
            out, grads = run(model)
            torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
            for name, grad in grads.items():
                dist.all_reduce(grad)  # what DDP does: the mean over all ranks of the group
                torch.testing.assert_close(grad / WORLD, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
            model.eval()  # eval forwards (samples, held-out loss) run the whole sequence on each rank
            torch.testing.assert_close(run(model)[0], ref_out, rtol=1e-5, atol=1e-6)
            done.append((attention, checkpointing))
        # Ranks of one group that got different inputs would train on garbage: caught at the first forward.
        model = shard_sequence(copy.deepcopy(reference), group)
        x, t, text, mask, _ = inputs()
        with pytest.raises(RuntimeError, match="got different inputs"):
            model(x + rank, t, text, mask)
        with pytest.raises(ValueError, match="num_heads=3 divisible by strategy.sequence_parallel_size=2"):
            shard_sequence(tiny_dit(num_heads=3, hidden_size=24), group, "ulysses")
        shard_sequence(tiny_dit(num_heads=3, hidden_size=24), group, "ring")  # ring takes any head count
        queue.put((rank, done))
    finally:
        dist.destroy_process_group()


def test_sharded_dit_equals_whole_dit_on_two_processes(tmp_path):
    done = spawn_ranks(_rank, str(tmp_path / "store"), WORLD, timeout=180)
    assert done[0] == done[1] == [("ulysses", False), ("ring", False), ("ulysses", True)]


def test_data_parallel_rank_of_a_sequence_parallel_grid():
    from dit_video.parallel import data_parallel_sampler_kwargs

    # 4 ranks, sp = 2: ranks {0, 1} read data shard 0 of 2, ranks {2, 3} shard 1.
    assert [data_parallel_sampler_kwargs(r, 4, 2)["rank"] for r in range(4)] == [0, 0, 1, 1]
    assert data_parallel_sampler_kwargs(3, 4, 2)["num_replicas"] == 2
    assert data_parallel_sampler_kwargs(3, 4, 1) == {"num_replicas": 4, "rank": 3}


def test_loader_dist_info_is_sequence_parallel_aware(monkeypatch):
    from dit_video.data.dataset import dist_info

    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert dist_info() == (3, 4)
    assert dist_info(sequence_parallel_size=2) == (1, 2)  # the same grid as data_parallel_sampler_kwargs


def test_sequence_parallel_config_errors():
    from hydra import compose, initialize_config_dir

    from dit_video.build import build_parallel
    from dit_video.errors import ConfigError
    from dit_video.run import build_strategy
    from dit_video.strategies import StrategyConfig

    def compose_train(*overrides):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            return compose("train", overrides=list(overrides))

    with pytest.raises(ConfigError, match="needs strategy=ddp or strategy=fsdp"):
        build_strategy(compose_train("strategy.sequence_parallel_size=2"), {"devices": 2})
    with pytest.raises(ConfigError, match="must divide the world size 3"):
        build_strategy(compose_train("strategy=ddp", "strategy.sequence_parallel_size=2"), {"devices": 3})
    with pytest.raises(ValueError, match="sp_attention='flash'"):
        StrategyConfig(kind="ddp", sp_attention="flash").validate()
    cfg = compose_train("strategy=fsdp", "strategy.sequence_parallel_size=2", "strategy.sp_attention=ring")
    strategy, _ = build_strategy(cfg, {"devices": 4})
    assert type(strategy).__name__ == "SequenceParallelSafeModelParallelStrategy"  # FSDP resume stays safe under SP
    parallel = build_parallel(cfg)
    assert (parallel.sequence_parallel_size, parallel.sp_attention, parallel.fsdp) == (2, "ring", True)


# ----------------------------------------------------------------------------- Lightning, torchrun

STEPS = 3
GLOBAL_BATCH = 4


def worker(out: str, overrides: list[str]) -> None:
    import lightning as L
    from hydra import compose, initialize_config_dir
    from strategy_run import make_module, worker_overrides
    from test_resume import LossRecorder
    from torch.utils.data import DataLoader

    from dit_video.data.datamodule import ResumableDataModule
    from dit_video.run import build_trainer

    log = record_collectives("cpu")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[
            *worker_overrides(out), f"checkpoint_every={STEPS}",
            f"trainer.max_steps={STEPS}", *overrides])
    torch.set_num_threads(1)
    L.seed_everything(0)
    module = make_module(cfg)  # batch = sample ids; latents = f(id), noise and t = f(step, id)
    log.track_host_tensors()  # the module is built: what is made from now on is checked
    trainer = build_trainer(cfg, Path(out), extra_callbacks=[LossRecorder(str(Path(out) / "losses.txt"))])
    # The whole global batch on every rank of the (single) sequence-parallel group: Lightning's
    # DistributedSampler reads the strategy's data-parallel rank/size.
    data_world = trainer.world_size // int(cfg.strategy.sequence_parallel_size)
    loader = DataLoader(torch.arange(GLOBAL_BATCH), batch_size=GLOBAL_BATCH // data_world, shuffle=False)
    trainer.fit(module, loader)
    datamodule = ResumableDataModule()
    datamodule.trainer = trainer  # what Lightning sets; our shard loaders read _rank_world from it
    rank_world = datamodule._rank_world()
    if trainer.world_size > 1:
        states: list = [None] * trainer.world_size
        dist.all_gather_object(states, (rank_world, torch.get_rng_state()))
        if trainer.is_global_zero:
            torch.save({"rank_world": [s[0] for s in states], "rng": [s[1] for s in states]}, Path(out) / "ranks.pt")
        dist.destroy_process_group()
    log.dump(Path(out) / f"collectives-{trainer.global_rank}.json")


def torchrun(nproc: int, out: Path, *overrides: str) -> dict[int, float]:

    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}", OMP_NUM_THREADS="1", DIT_VIDEO_QUIET="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", str(Path(__file__).resolve()), str(out), f"trainer.devices={nproc}",
           *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert_collective_parity(out, nproc, "cpu", min_entries=1 if nproc > 1 else 0)
    return {int(step): float(loss) for step, loss, *_ in (line.split() for line in (out / "losses.txt").read_text().splitlines())}


@pytest.mark.slow  # ~17 s each on 2 idle cores, 60-100 s when the machine is busy (3 torchrun launches)
@pytest.mark.parametrize(("strategy", "attention"), [("ddp", "ulysses"), ("ddp", "ring"), ("fsdp", "ulysses")])
def test_lightning_sequence_parallel_two_processes_trains_like_one(tmp_path, strategy, attention):
    from dit_video.checkpoint.load import load_training_checkpoint

    single = torchrun(1, tmp_path / "single", "strategy=single")
    sp = torchrun(2, tmp_path / "sp", f"strategy={strategy}", "strategy.sequence_parallel_size=2",
                  f"strategy.sp_attention={attention}",
                  *(["strategy.parallel.fsdp_param_dtype=null"] if strategy == "fsdp" else []))  # fsdp: with AC
    assert sorted(single) == sorted(sp) == list(range(1, STEPS + 1))
    torch.testing.assert_close(torch.tensor([sp[s] for s in sorted(sp)]),
                               torch.tensor([single[s] for s in sorted(single)]), rtol=1e-5, atol=1e-6)
    weights = {}
    for name in ("single", "sp"):
        # FSDP writes a sharded DCP folder, DDP and single one file: both load to full tensors.
        state = load_training_checkpoint(tmp_path / name / "checkpoints" / "last.ckpt", ["state_dict"])["state_dict"]
        weights[name] = {k: v for k, v in state.items() if k.startswith("dit.")}
    assert sorted(weights["sp"]) == sorted(weights["single"])
    for key, value in weights["single"].items():
        torch.testing.assert_close(weights["sp"][key], value, rtol=1e-4, atol=1e-6, msg=key)
    ranks = torch.load(tmp_path / "sp" / "ranks.pt", weights_only=True)
    assert ranks["rank_world"] == [(0, 1), (0, 1)]  # both ranks read data-parallel shard 0 of 1
    # share_rng at every batch start: the two ranks' noise/t/dropout streams are one stream.
    assert torch.equal(ranks["rng"][0], ranks["rng"][1])


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2:])
