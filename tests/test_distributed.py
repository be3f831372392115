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

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from spawn_ranks import assert_collective_parity

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300
STEPS = 4
GLOBAL_BATCH = 8
INF_STEP = 2  # global_step (0-based) whose gradient is Inf; its result is recorded as step INF_STEP + 1
EXT_DIR = Path.home() / ".cache" / "dit_video" / "torch_extensions"  # DeepSpeed's JIT-compiled CPU comm op


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- worker (runs under torchrun)


class _InfGradient(torch.autograd.Function):
    """Identity forward (the loss stays finite); an Inf gradient backward (every weight's gradient)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("inf"))


def make_module(cfg):
    import dataclasses

    from torch import nn

    from dit_video.build import build_dit_config, build_objective_from, build_parallel
    from dit_video.build import dataclass_from as _dataclass_from
    from dit_video.lit_module import DiTModule, OptimConfig
    from dit_video.model import DiT

    class FixedNoiseDiT(DiTModule):
        """DiTModule whose batch is a list of sample ids: data = f(id), noise and t = f(step, id)."""

        def sample(self, sample: int):
            data = torch.Generator().manual_seed(10**6 + sample)  # never equal to a noise seed
            latents = torch.randn(1, 4, 3, 4, 4, generator=data)  # [1, C, T', H', W']
            text_emb = torch.randn(1, 5, 16, generator=data)  # [1, L, D]
            text_mask = torch.tensor([[True, True, True, sample % 2 == 0, False]])
            return latents.to(self.device), text_emb.to(self.device), text_mask.to(self.device)

        def training_step(self, batch, batch_idx):
            # 1. each sample's DiT inputs as the objective draws them from its own (step, id) generator
            inputs = []
            for sample in batch.tolist():
                noise = torch.Generator().manual_seed(1000 * self.global_step + sample)
                self.objective.loss(lambda *args: inputs.append(args) or torch.zeros_like(args[0]),
                                    *self.sample(sample), generator=noise)
            # 2. one DiT forward for the whole local batch
            x, t, text_emb, text_mask = (torch.cat(parts) for parts in zip(*inputs, strict=True))  # [B, ...]
            pred = self.dit(x, t, text_emb, text_mask)  # [B, C, T', H', W']
            if self.global_step == INF_STEP:
                pred = _InfGradient.apply(pred)
            # 3. each sample's loss on its row of the prediction, with the same draws
            losses = []
            for i, sample in enumerate(batch.tolist()):
                noise = torch.Generator().manual_seed(1000 * self.global_step + sample)
                loss, _ = self.objective.loss(lambda *args, i=i: pred[i : i + 1], *self.sample(sample), generator=noise)
                losses.append(loss)
            return torch.stack(losses).mean()

    dit_cfg = build_dit_config(cfg.model, in_channels=4, text_dim=16)
    optim = _dataclass_from(OptimConfig, cfg.optim, "optim")
    parallel = build_parallel(cfg)
    meta = {"dit_config": dataclasses.asdict(dit_cfg), "latent_shape": [3, 4, 4], "config": {}}
    return FixedNoiseDiT(DiT(dit_cfg), build_objective_from(cfg), nn.Identity(), nn.Identity(), optim,
                         float(cfg.ema_decay), meta, parallel)


def full_params(module) -> dict[str, torch.Tensor]:
    """Every parameter whole, fp32, on the CPU: gathered under ZeRO-3 and FSDP2 (collective)."""
    params = list(module.named_parameters())
    if any(hasattr(p, "ds_id") for _, p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in params]):
            return {n: p.detach().float().cpu().clone() for n, p in params}
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().float().cpu().clone() for n, p in params}


def optimizer_tensors(optimizer) -> list[torch.Tensor]:
    """This rank's optimizer state (moments, and DeepSpeed's fp32 master partitions), copied."""
    base = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed's ZeRO optimizer wraps a torch AdamW
    found = [p for group in base.param_groups for p in group["params"]]
    found += [v for state in base.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return [(t.to_local() if hasattr(t, "to_local") else t).detach().clone() for t in found]


def probe(out: str):
    """A callback recording what the tests check on every rank: the timestep embedding's input,
    weights and optimizer state around the Inf-gradient step, the guard's count, the EMA's dtype;
    rank 0 also keeps the weights after every step and the EMA at the start."""
    from lightning.pytorch.callbacks import Callback

    from dit_video.callbacks import NonFiniteGuard

    class Probe(Callback):
        def on_train_start(self, trainer, pl_module):
            self.t_inputs: list[torch.Tensor] = []
            pl_module.dit.t_embedder.register_forward_pre_hook(lambda m, args: self.t_inputs.append(args[0].detach()))
            self.ema_start = full_params(pl_module.ema)
            self.weights = {trainer.global_step: full_params(pl_module.dit)}
            self.optim = optimizer_tensors(trainer.optimizers[0])
            self.report = {"skip_weights_same": None, "skip_optim_same": None}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step
            self.weights[step] = full_params(pl_module.dit)
            optim = optimizer_tensors(trainer.optimizers[0])
            if step == INF_STEP + 1:  # the step that got the Inf gradient has just run
                self.report["skip_weights_same"] = all(torch.equal(a, self.weights[step - 1][n])
                                                       for n, a in self.weights[step].items())
                self.report["skip_optim_same"] = len(optim) == len(self.optim) and all(
                    torch.equal(a, b) for a, b in zip(optim, self.optim, strict=True))
            self.optim = optim

        def on_train_end(self, trainer, pl_module):
            guard = next(c for c in trainer.callbacks if isinstance(c, NonFiniteGuard))
            first_t = self.t_inputs[0]
            partitioned = all(getattr(p, "ds_numel", 0) > 0 and p.numel() == 0 for p in pl_module.dit.parameters())
            self.report |= {"skipped_total": guard.skipped_total, "bad_steps": list(guard.bad_steps),
                            "t_dtype": str(first_t.dtype), "t_values": first_t.float().tolist(),
                            "ema_dtypes": sorted({str(p.dtype) for p in pl_module.ema.parameters()}),
                            "dit_dtypes": sorted({str(p.dtype) for p in pl_module.dit.parameters()}),
                            "partitioned": partitioned, "ema_in_tree": any(
                                p is q for p in pl_module.parameters() for q in pl_module.ema.parameters())}
            Path(out, f"probe-{trainer.global_rank}.json").write_text(json.dumps(self.report))
            if trainer.is_global_zero:
                torch.save({"weights": self.weights, "ema_start": self.ema_start}, Path(out, "trajectory.pt"))

    return Probe()


def allow_deepspeed_on_cpu() -> None:
    """Lift the two CPU refusals of Lightning's DeepSpeedStrategy, nothing else: its CUDA-only
    `setup_environment` check, and the device-index check (CPU devices have no index, which
    DeepSpeed's engine needs: every rank gets cpu:0, a no-op `set_device` on DeepSpeed's CPU accelerator)."""
    import lightning.pytorch.strategies.deepspeed as lightning_deepspeed
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

    def setup_environment(self):
        self.parallel_devices = [torch.device("cpu", 0)] * len(self.parallel_devices)
        DDPStrategy.setup_environment(self)  # what DeepSpeedStrategy's runs after its CUDA check

    DeepSpeedStrategy.setup_environment = setup_environment
    lightning_deepspeed._validate_device_index_selection = lambda devices: None


def worker_overrides(out: str) -> list[str]:
    """The tiny fp32 gloo run both 2-process training tests compose (plus their own overrides)."""
    return ["model.depth=2", "model.hidden_size=32", "model.num_heads=2", "optim.warmup_steps=2", "optim.lr=3e-3",
            "trainer.precision=32-true", "trainer.enable_model_summary=false", "+trainer.enable_progress_bar=false",
            "trainer.log_every_n_steps=1", "checkpoint_reserve_gb=0", "strategy.process_group_backend=gloo",
            "objective.caption_dropout=0.0", "eval=off", f"run_dir={out}"]


def fit_once(out: str, overrides: list[str], log) -> None:
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
    with log.device_tensors():  # built as a strategy would place it: on the device
        module = make_module(cfg)
    trainer = build_trainer(cfg, Path(out), extra_callbacks=[LossRecorder(str(Path(out) / "losses.txt")), probe(out)])
    if cfg.strategy.kind == "deepspeed" and cfg.strategy.zero_stage == 3:
        # Partition even this tiny model's weights (the config keeps < 1e6-element ones whole).
        trainer.strategy.config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    per_rank = GLOBAL_BATCH // trainer.world_size
    loader = DataLoader(torch.arange(GLOBAL_BATCH), batch_size=per_rank, shuffle=False)
    trainer.fit(module, loader, ckpt_path=resolve_ckpt_path(cfg.ckpt_path, Path(out) / "checkpoints"), weights_only=True)
    if cfg.strategy.kind == "deepspeed":
        trainer.strategy.deepspeed_engine.destroy()  # release ZeRO-3 hooks before the process group goes


def worker(out: str, args: list[str]) -> None:
    """args: Hydra overrides, and `--resume-from=<checkpoint>`: after the run, a second Trainer in the
    same processes resumes from it into <out>/resumed (DeepSpeed's JIT op and the group are reused)."""
    from spawn_ranks import record_collectives

    if any(a.startswith("strategy=deepspeed") for a in args):
        allow_deepspeed_on_cpu()
    log = record_collectives("cpu", host_tensors=True)
    resume = [a.split("=", 1)[1] for a in args if a.startswith("--resume-from=")]
    overrides = [a for a in args if not a.startswith("--")]
    try:
        fit_once(out, overrides, log)
        if resume:
            fit_once(str(Path(out) / "resumed"), [*overrides, f"ckpt_path={resume[0]}"], log)
    finally:
        log.dump(Path(out) / f"collectives-{int(os.environ.get('RANK', 0))}.json")
    torch.distributed.destroy_process_group() if torch.distributed.is_initialized() else None


# ----------------------------------------------------------------------------- test side


def read_losses(out: Path) -> dict[int, float]:
    losses = {}
    for line in (out / "losses.txt").read_text().splitlines():
        step, loss, *_ = line.split()
        losses[int(step)] = float(loss)
    return losses


def torchrun(nproc: int, out: Path, *overrides: str) -> dict[int, float]:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}", OMP_NUM_THREADS="1", DIT_VIDEO_QUIET="1",
               DS_BUILD_OPS="0", DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(EXT_DIR))
    EXT_DIR.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", str(Path(__file__).resolve()), str(out),
           f"trainer.devices={nproc}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert_collective_parity(out, nproc, "cpu", min_entries=1 if nproc > 1 else 0)
    return read_losses(out)


def probes(out: Path, world: int) -> list[dict]:
    return [json.loads((out / f"probe-{r}.json").read_text()) for r in range(world)]


def assert_inf_step_skipped(out: Path, world: int) -> None:
    """The Inf-gradient step left weights and this rank's optimizer state untouched, and was counted."""
    for report in probes(out, world):
        assert report["skipped_total"] == 1 and report["bad_steps"] == [INF_STEP], report
        assert report["skip_weights_same"] and report["skip_optim_same"], report


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    return torchrun(1, out, "strategy=single", f"trainer.max_steps={STEPS}", "checkpoint_every=2"), out


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    return torchrun(2, out, "strategy=ddp", f"trainer.max_steps={STEPS}", "checkpoint_every=2"), out


def assert_close(losses: dict[int, float], reference: dict[int, float]) -> None:
    assert sorted(losses) == sorted(reference)
    torch.testing.assert_close(torch.tensor([losses[s] for s in sorted(losses)]),
                               torch.tensor([reference[s] for s in sorted(reference)]), rtol=1e-5, atol=1e-6)


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


def ema_of(trajectory: dict, decay: float) -> dict[str, torch.Tensor]:
    """The EMA a single fp32 process computes from a run's weights after each step (DiTModule's rule)."""
    from dit_video.lit_module import ema_decay_at

    ema = {k: v.double() for k, v in trajectory["ema_start"].items()}
    for step in sorted(s for s in trajectory["weights"] if s > 0):
        w = 1.0 - ema_decay_at(step, decay)
        ema = {k: v + w * (trajectory["weights"][step][k].double() - v) for k, v in ema.items()}
    return {k: v.float() for k, v in ema.items()}


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


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2:])
