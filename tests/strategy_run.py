"""One Lightning training run of the strategy tests (test_distributed.py, test_sequence_parallel.py),
run by torchrun as `python tests/strategy_run.py <out> <hydra overrides> [--resume-from=<ckpt>]`,
and the test-side helpers that start it and read what it recorded.

The run: `run.build_trainer` from the composed config (strategy, callbacks, checkpoints), a tiny
DiT whose batch is a list of sample ids (data = f(id), noise and t = f(step, id): nothing depends
on which rank draws them), an Inf gradient at step INF_STEP, a probe of what the tests check, and
every collective recorded (spawn_ranks.record_collectives, host tensors refused).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from spawn_ranks import assert_collective_parity, free_port

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300
STEPS = 4
GLOBAL_BATCH = 8
INF_STEP = 2  # global_step (0-based) whose gradient is Inf; its result is recorded as step INF_STEP + 1
EXT_DIR = Path.home() / ".cache" / "dit_video" / "torch_extensions"  # DeepSpeed's JIT-compiled CPU comm op


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
    dit, lora = DiT(dit_cfg), None
    if cfg.lora is not None:  # LoRA on a seeded random base (every weight random: zero-init gates would block
        from dit_video.lora import LoRAConfig, apply_lora  # the adapters' gradients), the same in every run

        base = torch.Generator().manual_seed(123)
        with torch.no_grad():
            for p in dit.parameters():
                p.copy_(torch.randn(p.shape, generator=base) * 0.1)
        lora = _dataclass_from(LoRAConfig, cfg.lora, "lora").validate()
        apply_lora(dit, lora)
    return FixedNoiseDiT(dit, build_objective_from(cfg), nn.Identity(), nn.Identity(), optim,
                         float(cfg.ema_decay), meta, parallel, lora=lora)


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
            self.ema_start = full_params(pl_module.ema) if pl_module.lora is None else {}
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
                            "ema_dtypes": sorted({str(p.dtype) for p in ema_tensors(pl_module)}),
                            "dit_dtypes": sorted({str(p.dtype) for p in pl_module.dit.parameters()}),
                            "partitioned": partitioned, "ema_in_tree": any(
                                p is q for p in pl_module.parameters() for q in ema_tensors(pl_module))}
            Path(out, f"probe-{trainer.global_rank}.json").write_text(json.dumps(self.report))
            if trainer.is_global_zero:
                torch.save({"weights": self.weights, "ema_start": self.ema_start}, Path(out, "trajectory.pt"))

    return Probe()


def ema_tensors(pl_module) -> list[torch.Tensor]:
    """The EMA's tensors: the EMA copy's parameters, or a LoRA run's EMA adapters."""
    if pl_module.lora is None:
        return list(pl_module.ema.parameters())
    return list(pl_module.ema_weights.tensors.values())


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
    assert "module(s) in eval mode" not in proc.stderr  # the EMA, in eval mode, is no submodule any more
    assert_collective_parity(out, nproc, "cpu", min_entries=1 if nproc > 1 else 0)
    return read_losses(out)


def probes(out: Path, world: int) -> list[dict]:
    return [json.loads((out / f"probe-{r}.json").read_text()) for r in range(world)]


def assert_inf_step_skipped(out: Path, world: int) -> None:
    """The Inf-gradient step left weights and this rank's optimizer state untouched, and was counted."""
    for report in probes(out, world):
        assert report["skipped_total"] == 1 and report["bad_steps"] == [INF_STEP], report
        assert report["skip_weights_same"] and report["skip_optim_same"], report


def assert_close(losses: dict[int, float], reference: dict[int, float]) -> None:
    assert sorted(losses) == sorted(reference)
    torch.testing.assert_close(torch.tensor([losses[s] for s in sorted(losses)]),
                               torch.tensor([reference[s] for s in sorted(reference)]), rtol=1e-5, atol=1e-6)


def ema_of(trajectory: dict, decay: float) -> dict[str, torch.Tensor]:
    """The EMA a single fp32 process computes from a run's weights after each step (DiTModule's rule)."""
    from dit_video.lit_module import ema_decay_at

    ema = {k: v.double() for k, v in trajectory["ema_start"].items()}
    for step in sorted(s for s in trajectory["weights"] if s > 0):
        w = 1.0 - ema_decay_at(step, decay)
        ema = {k: v + w * (trajectory["weights"][step][k].double() - v) for k, v in ema.items()}
    return {k: v.float() for k, v in ema.items()}


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2:])
