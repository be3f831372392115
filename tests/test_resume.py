"""Exact resume, preemption and kill-during-write, on real training subprocesses.

Each run is `python tests/test_resume.py <hydra overrides> [--self-signal NAME@STEP] ...`: the
real config tree, `run.build_trainer` / `run.fit` (StepCheckpoint, Preemption, NonFiniteGuard,
RNGState, SafeCheckpointIO, ResumableData), the real `VideoDataModule` on demo shards and the real
DiT + objective. Only the frozen encoders are small stand-ins (a fixed pooling "VAE" and a hashed
word embedding), so the tests do not need a trained VAE or MiniLM and run in seconds.

Loader position: the data issue's resumable `VideoDataModule` (state_dict / load_state_dict,
position recorded when a batch reaches the step) is used as it is, with 2 loader workers;
`ResumableData`'s replay fallback for loaders without state is tested in test_checkpoint.py.

Equality is bitwise: single process, one thread, same CPU kernels.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from spawn_ranks import free_port
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 240
TINY = ["data.batch_size=4", "data.num_workers=2", "data.shuffle_buffer=8", "data.val_shards=null",
        "model.depth=2", "model.hidden_size=32", "model.num_heads=2", "optim.warmup_steps=3", "optim.lr=1e-3",
        "trainer.log_every_n_steps=1", "trainer.enable_model_summary=false",
        "num_threads=1", "checkpoint_reserve_gb=0", "logger=csv", "eval=off"]


# ----------------------------------------------------------------------------- stand-in frozen encoders


class PoolingVAE(nn.Module):
    """uint8-derived video [B, 3, T, H, W] in [-1, 1] -> latents [B, 4, 1 + (T-1)/4, H/4, W/4]:
    every 4th frame (the first alone), 4x4 average pooling, a fixed 3 -> 4 channel mix."""

    latent_channels = 4

    def __init__(self):
        super().__init__()
        self.register_buffer("mix", torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0.5, 0.5, 0.5]]))

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        frames = video[:, :, ::4]  # [B, 3, T', H, W]
        pooled = nn.functional.avg_pool3d(frames.float(), (1, 4, 4))  # [B, 3, T', H/4, W/4]
        return torch.einsum("oc,bcthw->bothw", self.mix, pooled)  # [B, 4, T', H/4, W/4]

    def latent_shape(self, num_frames: int, height: int, width: int):
        return (1 + (num_frames - 1) // 4, height // 4, width // 4)


class HashTextEncoder(nn.Module):
    """Captions -> (text_emb [B, L, 16], text_mask [B, L]) from a fixed table indexed by word hash."""

    dim, max_length = 16, 8

    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.randn(97, self.dim, generator=torch.Generator().manual_seed(0)))

    def encode(self, captions: list[str]):
        emb = torch.zeros(len(captions), self.max_length, self.dim)
        mask = torch.zeros(len(captions), self.max_length, dtype=torch.bool)
        for i, caption in enumerate(captions):
            for j, word in enumerate(caption.split()[: self.max_length]):
                emb[i, j] = self.table[sum(map(ord, word)) % 97]
                mask[i, j] = True
        return emb, mask


# ----------------------------------------------------------------------------- the worker


class LossRecorder:
    """Appends `step loss` (exact float repr) per optimizer step to a file."""

    def __new__(cls, path: str, sleep: float = 0.0):
        from lightning.pytorch.callbacks import Callback

        class _Recorder(Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                loss = trainer.strategy.reduce(outputs["loss"].detach().float(), reduce_op="mean")
                if trainer.is_global_zero:
                    with open(path, "a") as f:
                        keys = ",".join(batch["key"]) if isinstance(batch, dict) else "-"
                        f.write(f"{trainer.global_step} {float(loss)!r} {keys}\n")
                if sleep:
                    time.sleep(sleep)

        return _Recorder()


class SelfSignal:
    """Sends `signum` to this process at the end of optimizer step `step` (a real signal, from outside Python code's control flow)."""

    def __new__(cls, signum: int, step: int):
        from lightning.pytorch.callbacks import Callback

        class _SelfSignal(Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if trainer.global_step == step and trainer.is_global_zero:
                    os.kill(os.getpid(), signum)

        return _SelfSignal()


def compose_cfg(overrides):
    from hydra import compose, initialize_config_dir

    import dit_video.build  # noqa: F401  (resolvers)

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=["+experiment=demo", *overrides])


def run_worker(overrides: list[str], loss_log: str, self_signal: str | None = None, step_sleep: float = 0.0,
               stall_fsync_at: int | None = None) -> None:
    """Build and train like run.train_dit, with the stand-in encoders."""
    import dataclasses

    import lightning as L

    from dit_video.build import build_data, build_dit_config, build_objective_from, build_parallel
    from dit_video.build import dataclass_from as _dataclass_from
    from dit_video.lit_module import DiTModule, OptimConfig
    from dit_video.model import DiT
    from dit_video.run import build_trainer, fit

    cfg = compose_cfg(overrides)
    torch.set_num_threads(int(cfg.num_threads))
    L.seed_everything(int(cfg.seed), workers=True)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    data_cfg, datamodule = build_data(cfg)
    vae, text_encoder = PoolingVAE(), HashTextEncoder()
    dit_cfg = build_dit_config(cfg.model, vae.latent_channels, text_encoder.dim)
    optim = _dataclass_from(OptimConfig, cfg.optim, "optim")
    parallel = build_parallel(cfg)
    latent_shape = list(vae.latent_shape(data_cfg.num_frames, *data_cfg.size))
    meta = {"dit_config": dataclasses.asdict(dit_cfg), "latent_shape": latent_shape, "config": {}}
    module = DiTModule(DiT(dit_cfg), build_objective_from(cfg), vae, text_encoder, optim, float(cfg.ema_decay), meta,
                       parallel)
    extra = [LossRecorder(loss_log, step_sleep)]
    if self_signal:
        name, step = self_signal.split("@")
        extra.append(SelfSignal(getattr(signal, name), int(step)))
    if stall_fsync_at is not None:
        _stall_checkpoint_fsync(run_dir, stall_fsync_at)
    trainer = build_trainer(cfg, run_dir, extra_callbacks=extra)
    fit(trainer, module, datamodule, cfg, run_dir)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _stall_checkpoint_fsync(run_dir: Path, step: int) -> None:
    """Freeze the process inside the write of checkpoint `step` (after its bytes reach the temporary
    file, before fsync/rename) and announce it with a marker file, so the test can SIGKILL it there."""
    import dit_video.checkpoint.save as ck

    real_fsync = os.fsync
    name = f".{ck.checkpoint_name(step)}.tmp"

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(name):
            (run_dir / "STALLED").write_text(str(os.getpid()))
            time.sleep(3600)
        real_fsync(fd)

    ck.os.fsync = fsync  # the worker process only


def _main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--loss-log", required=True)
    parser.add_argument("--self-signal", default=None)  # NAME@STEP
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--stall-fsync-at", type=int, default=None)
    args, overrides = parser.parse_known_args(argv)
    run_worker(overrides, args.loss_log, args.self_signal, args.step_sleep, args.stall_fsync_at)


# ----------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory):
    out = tmp_path_factory.getbasetemp() / "resume_shards"
    if not (out / "train-000001.tar").is_file():
        subprocess.run([sys.executable, "-m", "data_prep.make_demo", "--out", str(out), "--num-clips", "48",
                        "--val-clips", "4", "--shard-size", "24"], cwd=ROOT, check=True, capture_output=True)
    return f"data.shards={out}/train-*.tar"


def worker_cmd(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


def worker_env(**extra) -> dict:
    env = dict(os.environ, DIT_VIDEO_QUIET="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def run(args: list[str], env=None, timeout=TIMEOUT) -> subprocess.CompletedProcess:
    proc = subprocess.run(worker_cmd(*args), cwd=ROOT, env=env or worker_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def read_losses(path: Path) -> dict[int, float]:
    out: dict[int, float] = {}
    for line in path.read_text().splitlines():
        step, loss, _keys = line.split()
        out[int(step)] = float(loss)
    return out


def load_state(ckpt: Path) -> dict:
    return torch.load(ckpt, map_location="cpu", weights_only=True)


def assert_same_training_state(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:  # DiT and its EMA
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    opt_a, opt_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for idx in opt_a:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt_a[idx][name], opt_b[idx][name]), (idx, name)
    assert a["lr_schedulers"] == b["lr_schedulers"]


# ----------------------------------------------------------------------------- tests


def test_sigterm_at_step_k_then_auto_resume_is_bitwise_identical(demo_shards, tmp_path):
    steps, k = 8, 3
    base = [demo_shards, *TINY, f"trainer.max_steps={steps}", "checkpoint_every=100"]
    run(["--loss-log", str(tmp_path / "ref.txt"), *base, f"run_dir={tmp_path / 'ref'}"])
    reference = read_losses(tmp_path / "ref.txt")
    assert sorted(reference) == list(range(1, steps + 1))

    # Interrupted: SIGTERM (a real signal) at the end of step k -> checkpoint, clean exit (rc 0).
    resumed_dir = tmp_path / "resumed"
    log = tmp_path / "resumed.txt"
    run(["--loss-log", str(log), "--self-signal", f"SIGTERM@{k}", *base, f"run_dir={resumed_dir}", "ckpt_path=auto"])
    first = read_losses(log)
    # The signal lands after Preemption's check of step k, so training stops at the next boundary.
    assert max(first) == k + 1, first
    ckpts = resumed_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == f"step-{k + 1:08d}.ckpt"
    # The same command again (what a requeued job runs) resumes from step k.
    run(["--loss-log", str(log), *base, f"run_dir={resumed_dir}", "ckpt_path=auto"])
    losses = read_losses(log)
    assert sorted(losses) == list(range(1, steps + 1))
    assert losses == reference  # bitwise: every step's loss, before and after the resume
    assert_same_training_state(load_state(ckpts / "last.ckpt"), load_state(tmp_path / "ref" / "checkpoints" / "last.ckpt"))


@pytest.mark.slow
def test_ddp_two_processes_sigterm_then_auto_resume_is_bitwise_identical(demo_shards, tmp_path):
    """The same on 2 gloo processes (torchrun): rank 0 gets SIGTERM, both ranks save and stop at the
    same step; per-rank RNG states and loader positions resume. Losses are the mean over ranks."""

    steps, k = 6, 2
    base = [demo_shards, *TINY, f"trainer.max_steps={steps}", "checkpoint_every=100", "strategy=ddp",
            "strategy.process_group_backend=gloo", "trainer.devices=2", "trainer.precision=32-true"]
    env = worker_env(PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}")

    def torchrun(*args):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
               f"--master-port={free_port()}", str(Path(__file__).resolve()), *args]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
        assert proc.returncode == 0, proc.stderr[-4000:]

    torchrun("--loss-log", str(tmp_path / "ref.txt"), *base, f"run_dir={tmp_path / 'ref'}")
    log = tmp_path / "resumed.txt"
    torchrun("--loss-log", str(log), "--self-signal", f"SIGTERM@{k}", *base, f"run_dir={tmp_path / 'run'}",
             "ckpt_path=auto")
    assert max(read_losses(log)) == k + 1
    torchrun("--loss-log", str(log), *base, f"run_dir={tmp_path / 'run'}", "ckpt_path=auto")
    assert read_losses(log) == read_losses(tmp_path / "ref.txt")


def test_sigusr1_saves_requeues_with_fake_scontrol_and_exits_cleanly(demo_shards, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol_calls.txt"
    fake = bin_dir / "scontrol"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake.chmod(0o755)
    env = worker_env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242")
    log = tmp_path / "loss.txt"
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        worker_cmd("--loss-log", str(log), "--step-sleep", "0.3", demo_shards, *TINY, "trainer.max_steps=500",
                   "checkpoint_every=1000", f"run_dir={run_dir}", "ckpt_path=auto"),
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.time() + TIMEOUT
        while not (log.is_file() and len(log.read_text().splitlines()) >= 2):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() < deadline, "worker never reached step 2"
            time.sleep(0.1)
        proc.send_signal(signal.SIGUSR1)
        _, stderr = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert calls.read_text().split() == ["requeue", "4242"]
    last_step = max(read_losses(log))
    assert last_step < 500
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest.name == f"step-{last_step:08d}.ckpt"
    assert load_state(latest)["global_step"] == last_step
    # The requeued job (same command) continues from there.
    run(["--loss-log", str(log), demo_shards, *TINY, f"trainer.max_steps={last_step + 2}", "checkpoint_every=1000",
         f"run_dir={run_dir}", "ckpt_path=auto"], env=env)
    assert sorted(read_losses(log))[-2:] == [last_step + 1, last_step + 2]
    assert calls.read_text().split() == ["requeue", "4242"]  # a finished run does not requeue


def test_sigkill_during_checkpoint_write_keeps_previous_checkpoint_and_pointer(demo_shards, tmp_path):
    from dit_video.checkpoint.paths import resolve_ckpt_path

    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        worker_cmd("--loss-log", str(tmp_path / "loss.txt"), "--stall-fsync-at", "4", demo_shards, *TINY,
                   "trainer.max_steps=6", "checkpoint_every=2", f"run_dir={run_dir}"),
        cwd=ROOT, env=worker_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.time() + TIMEOUT
        while not (run_dir / "STALLED").is_file():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() < deadline
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)  # no handler, no cleanup: the process just disappears
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    ckpts = run_dir / "checkpoints"
    partial = ckpts / ".step-00000004.ckpt.tmp"
    assert partial.is_file() and partial.stat().st_size > 0  # killed mid-write
    assert not (ckpts / "step-00000004.ckpt").exists()
    assert (ckpts / "latest").read_text().strip() == "step-00000002.ckpt"
    assert load_state(ckpts / "last.ckpt")["global_step"] == 2
    assert resolve_ckpt_path("auto", ckpts) == str(ckpts / "step-00000002.ckpt")
    # Resuming ignores the partial file and removes it at the next save of that step.
    run(["--loss-log", str(tmp_path / "loss2.txt"), demo_shards, *TINY, "trainer.max_steps=4", "checkpoint_every=2",
         f"run_dir={run_dir}", "ckpt_path=auto"])
    assert not partial.exists()
    assert (ckpts / "latest").read_text().strip() == "step-00000004.ckpt"
    assert sorted(read_losses(tmp_path / "loss2.txt")) == [3, 4]


if __name__ == "__main__":
    _main(sys.argv[1:])
