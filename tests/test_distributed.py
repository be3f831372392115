"""DDP, FSDP2 and DeepSpeed ZeRO-2/3 on 2 CPU processes (gloo, torchrun) against single-process training.

What runs here: Lightning's DDPStrategy, ModelParallelStrategy (FSDP2 `fully_shard` per DiT block
from DiTModule.configure_model -> dit_video.parallel) and DeepSpeedStrategy, each built by
`run.build_trainer` from conf/strategy/*.yaml, through `Trainer.fit` with our callbacks and
checkpoints. Lightning's DeepSpeedStrategy refuses CPU accelerators in two checks (a CUDA-only
`setup_environment` and a device-index check); the worker lifts exactly those
(`allow_deepspeed_on_cpu`), so the rest is the library's own code on the object we build: config
formatting and validation, `deepspeed.initialize`, the engine's step, `save_checkpoint` and
`load_checkpoint`. What a CPU cannot reach: NCCL and CUDA bf16 kernels (DeepSpeed bf16 runs on
CPU bf16 kernels here) and a real second device (the collective-parity check emulates one,
tests/spawn_ranks.py).

Same global batch everywhere: 8 samples per step, as 1 x 8 or 2 ranks x 4 (Lightning's
DistributedSampler interleaves the ids, so the union per step is the same 8). Each sample's
latents and text come from a generator seeded by its id, its noise and t from one seeded by
(step, id), so nothing depends on which rank draws them; the DiT runs once per step on the whole
local batch (ZeRO-3 gathers each weight once per forward). At step INF_STEP every run gets an
Inf gradient with a finite loss (NonFiniteGuard must skip and count it). Losses are the mean over
ranks. fp32 (bf16 would change the reduction order's rounding): equal within 1e-5 relative.
Every run records its collectives on every rank (spawn_ranks.record_collectives) and must
show parity, with host tensors from our code refused.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from strategy_run import (
    ROOT,
    STEPS,
    assert_close,
    assert_inf_step_skipped,
    ema_of,
    probes,
    read_losses,
    torchrun,
)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    return torchrun(1, out, "strategy=single", f"trainer.max_steps={STEPS}", "checkpoint_every=2"), out


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    return torchrun(2, out, "strategy=ddp", f"trainer.max_steps={STEPS}", "checkpoint_every=2"), out


def test_ddp_two_processes_match_single_process(single, ddp):
    reference, single_dir = single
    assert sorted(reference) == list(range(1, STEPS + 1))
    losses, out = ddp
    assert_close(losses, reference)
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)  # one file, written by rank 0
    per_rank = ckpt["callbacks"]["RNGState"]["per_rank"]
    assert ckpt["global_step"] == STEPS and len(per_rank) == 2
    # seed_everything seeds every rank alike; RNGState.on_train_start gives rank 1 its own stream,
    # so ranks do not draw identical noise and t for their different clips.
    assert not torch.equal(per_rank[0]["torch"], per_rank[1]["torch"])
    assert_inf_step_skipped(single_dir, 1)
    assert_inf_step_skipped(out, 2)


def test_fsdp2_two_processes_match_single_process_and_reload_sharded_at_world_size_1(single, tmp_path):
    from dit_video.checkpoint.export import export_ema, load_exported
    from dit_video.checkpoint.load import load_training_checkpoint

    reference, single_dir = single
    run2 = tmp_path / "ws2"
    losses = torchrun(2, run2, "strategy=fsdp", "strategy.parallel.fsdp_param_dtype=null",
                      f"trainer.max_steps={STEPS}", "checkpoint_every=2")
    assert_close(losses, reference)
    assert_inf_step_skipped(run2, 2)
    assert not probes(run2, 2)[0]["ema_in_tree"]  # sharded like the weights, but outside the module tree
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
    # The EMA resumed at world size 1 from the sharded checkpoint continues exactly.
    resumed_ema = load_training_checkpoint(run1 / "checkpoints" / "step-00000004.ckpt")["state_dict"]
    for key, value in weights.items():
        torch.testing.assert_close(resumed_ema[f"ema.{key}"], value, rtol=1e-5, atol=1e-6)

# ----------------------------------------------------------------------------- DeepSpeed ZeRO-2 / ZeRO-3

def deepspeed_run(tmp_path, stage: int, *overrides: str) -> tuple[Path, dict, dict]:
    """A ZeRO run of STEPS steps on 2 processes, then in the same processes a second Trainer resuming
    from its step-2 checkpoint (exact resume: same losses, same final EMA)."""
    pytest.importorskip("deepspeed")
    out = tmp_path / f"zero{stage}"
    losses = torchrun(2, out, f"strategy=deepspeed_zero{stage}", f"trainer.max_steps={STEPS}", "checkpoint_every=2",
                      *overrides, f"--resume-from={out / 'checkpoints' / 'step-00000002.ckpt'}")
    resumed = read_losses(out / "resumed")
    assert sorted(losses) == list(range(1, STEPS + 1)) and sorted(resumed) == [3, 4]
    assert all(resumed[s] == losses[s] for s in (3, 4)), (resumed, losses)  # bitwise: the state came back whole
    return out, losses, resumed


def assert_deepspeed_checkpoints_read(out: Path, ddp_dir: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """Checks shared by both stages; returns the exported EMA of the final checkpoint."""
    from dit_video.checkpoint.export import load_exported, main
    from dit_video.checkpoint.load import load_checkpoint, load_training_checkpoint
    from dit_video.checkpoint.paths import resolve_checkpoint
    from dit_video.model import DiT, DiTConfig

    for report in probes(out, 2) + probes(out / "resumed", 2):
        assert report["ema_dtypes"] == ["torch.float32"] and not report["ema_in_tree"], report
        # The timestep embedding sees the objective's fp32 t, as under DDP (same ids on rank 0).
        assert report["t_dtype"] == "torch.float32"
    assert probes(out, 2)[0]["t_values"] == probes(ddp_dir, 2)[0]["t_values"]
    assert_inf_step_skipped(out, 2)
    assert_inf_step_skipped(out / "resumed", 2)
    final = out / "checkpoints" / "step-00000004.ckpt"
    uninterrupted = load_training_checkpoint(final)["state_dict"]
    resumed = load_training_checkpoint(out / "resumed" / "checkpoints" / "step-00000004.ckpt")["state_dict"]
    assert uninterrupted.keys() == resumed.keys() and all(torch.equal(resumed[k], v) for k, v in uninterrupted.items())
    # Export (the CLI, given the run's checkpoints/ folder) and the sampling entry: run dir -> checkpoint -> DiT.
    main(["export", str(out / "checkpoints"), str(tmp_path / "ema.safetensors")])
    ema, meta = load_exported(tmp_path / "ema.safetensors")
    ckpt = load_checkpoint(resolve_checkpoint(out))
    for prefix in ("ema.", "dit."):  # Pipeline.from_checkpoint(weights="ema" | "raw")
        dit = DiT(DiTConfig.from_dict(meta["dit_config"]))
        dit.load_state_dict({k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)})
        x = torch.randn(2, 4, 3, 4, 4)
        assert torch.isfinite(dit(x, torch.rand(2), torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool))).all()
    return ema


def test_zero3_two_processes_match_single_process_resume_and_sample(single, ddp, tmp_path):
    """ZeRO-3 (fp32): every DiT weight partitioned, the EMA whole and fp32 outside the engine; losses,
    raw weights and EMA equal the single-process fp32 run's within 1e-5."""
    reference, single_dir = single
    out, losses, _ = deepspeed_run(tmp_path, 3)
    assert_close(losses, reference)
    assert all(report["partitioned"] for report in probes(out, 2))  # ZeRO-3 really partitioned the DiT
    ema = assert_deepspeed_checkpoints_read(out, ddp[1], tmp_path)
    from dit_video.checkpoint.load import load_training_checkpoint

    mine = load_training_checkpoint(out / "checkpoints" / "step-00000004.ckpt")["state_dict"]
    theirs = load_training_checkpoint(single_dir / "checkpoints" / "step-00000004.ckpt")["state_dict"]
    assert mine.keys() == theirs.keys()
    for key, value in theirs.items():  # dit.* rebuilt from the ranks' fp32 partitions, ema.* from rank 0
        torch.testing.assert_close(mine[key], value, rtol=1e-5, atol=1e-6, msg=key)
    for key, value in ema.items():
        torch.testing.assert_close(value, theirs[f"ema.{key}"], rtol=1e-5, atol=1e-6, msg=key)


def test_zero2_bf16_two_processes_keep_an_fp32_ema_resume_and_sample(single, ddp, tmp_path):
    """ZeRO-2 with DeepSpeed's bf16 engine (weights cast to bf16, no autocast; CPU bf16 kernels
    here, CUDA's on a GPU): the EMA stays fp32 and equals, within 1e-6, the EMA a single fp32
    process computes from this run's weights after each step; a bf16 EMA (the old submodule) drifts
    by bf16 rounding (~4e-3 relative) and fails. Losses follow the fp32 run within bf16 precision."""
    reference, _ = single
    out, losses, _ = deepspeed_run(tmp_path, 2, "trainer.precision=bf16-mixed")
    assert probes(out, 2)[0]["dit_dtypes"] == ["torch.bfloat16"]  # the engine really runs bf16 weights
    torch.testing.assert_close(torch.tensor([losses[s] for s in sorted(losses)]),
                               torch.tensor([reference[s] for s in sorted(reference)]), rtol=1e-3, atol=0)
    ema = assert_deepspeed_checkpoints_read(out, ddp[1], tmp_path)
    from omegaconf import OmegaConf

    decay = float(OmegaConf.load(ROOT / "conf" / "train.yaml").ema_decay)
    expected = ema_of(torch.load(out / "trajectory.pt", weights_only=True), decay)
    assert ema.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(ema[key], value, rtol=0, atol=1e-6, msg=key)
