"""Training callbacks for surviving clusters: preemption, non-finite steps, exact RNG resume.

- `Preemption`: SIGUSR1/SIGTERM -> checkpoint at the end of the current step, `scontrol requeue`
  (SLURM), clean exit. The requeued job runs the same command with `ckpt_path=auto`.
- `NonFiniteGuard`: a step whose loss or gradient is NaN/Inf is skipped (the weights do not
  move) and counted; too many in a window stops the run with the last good checkpoint named.
  Loss spikes (z-score against a running mean) are logged.
- `RNGState`: torch, numpy and python RNG states of every rank go into each checkpoint and are
  put back just before the first step after a resume.

Signal handlers only set a flag: the save happens at a step boundary, on every rank at once,
because sharded checkpoints are collective and a half-finished step has no consistent state.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import shutil
import signal
import subprocess
from collections import deque

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy

from dit_video.checkpoint.save import StepCheckpoint
from dit_video.errors import TrainingDiverged

log = logging.getLogger("dit_video")



def log_scalars(trainer, metrics: dict[str, float]) -> None:
    """Log metrics at the current global step from a callback, on rank 0 only (they are
    already reduced over ranks; every logger of the trainer gets them)."""
    if trainer.is_global_zero and trainer.logger is not None:
        trainer.logger.log_metrics(metrics, step=trainer.global_step)

# ----------------------------------------------------------------------------- preemption


def slurm_job_id(env=os.environ) -> str | None:
    """The id `scontrol requeue` needs: `<array job>_<task>` for array jobs, else SLURM_JOB_ID."""
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def requeue_slurm_job(job_id: str, timeout: float = 60.0) -> bool:
    """Run `scontrol requeue <job_id>`; True on success. Failures are logged, not raised: the
    checkpoint is already safe, and a human can resubmit with ckpt_path=auto."""
    if not re.fullmatch(r"[0-9]+(_[0-9]+)?", job_id):
        log.error("not requeueing: SLURM job id %r is malformed", job_id)
        return False
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        log.error("not requeueing job %s: scontrol is not on PATH", job_id)
        return False
    result = subprocess.run([scontrol, "requeue", job_id], capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        log.error("scontrol requeue %s failed (%d): %s", job_id, result.returncode, result.stderr.strip())
        return False
    log.info("requeued SLURM job %s", job_id)
    return True


class Preemption(Callback):
    """On any of `signals`: save a checkpoint after the current step, requeue the SLURM job if the
    signal is one of `requeue_signals`, and stop training cleanly (exit code 0).

    SLURM sends `--signal=USR1@120` 120 s before the time limit (-> save + requeue). It sends
    SIGTERM on preemption and on `scancel`; requeueing on SIGTERM would resurrect cancelled jobs,
    so by default SIGTERM only saves (preemption with PreemptMode=REQUEUE requeues by itself).
    """

    def __init__(self, checkpoint: StepCheckpoint, signals=("SIGUSR1", "SIGTERM"), requeue_signals=("SIGUSR1",)):
        self.checkpoint = checkpoint
        self.signals = [_signum(s) for s in signals]
        self.requeue_signals = {_signum(s) for s in requeue_signals}
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _on_signal(self, signum, frame) -> None:
        self.received = signum  # async-signal-safe: no I/O, no locks; acted on at the step boundary

    def on_train_start(self, trainer, pl_module) -> None:
        # Installed here, after Lightning registered its own handlers in Trainer._run, so ours
        # replace them (Lightning's SIGTERM handler raises out of the loop without a checkpoint).
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def teardown(self, trainer, pl_module, stage) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        local = self.received
        # Any rank signalled -> every rank saves (collective) and stops at the same step.
        stop = trainer.strategy.reduce_boolean_decision(local is not None, all=False)
        if not stop:
            return
        name = signal.Signals(local).name if local is not None else "a signal on another rank"
        log.warning("received %s: saving a checkpoint at step %d and stopping", name, trainer.global_step)
        self.checkpoint.save(trainer)
        job_id = slurm_job_id()
        if trainer.is_global_zero and local in self.requeue_signals and job_id is not None:
            requeue_slurm_job(job_id)
        trainer.should_stop = True


def _signum(name) -> int:
    return int(getattr(signal, name)) if isinstance(name, str) else int(name)


# ----------------------------------------------------------------------------- non-finite guard


class NonFiniteGuard(Callback):
    """Skip steps whose gradients (hence also loss) are NaN/Inf; stop when there are too many.

    A skipped step drops its gradients before the optimizer runs, so AdamW leaves the weights and
    its moments untouched; the LR schedule and the step counter still advance. More than
    `max_bad_steps` skips within the last `window` steps raises TrainingDiverged.

    Spikes: the loss is compared with an exponential running mean/variance; z > spike_zscore
    after `spike_warmup` steps logs `train/loss_spike` and a warning (the step is kept).
    """

    def __init__(self, max_bad_steps: int = 10, window: int = 200, spike_zscore: float = 6.0,
                 spike_warmup: int = 50, checkpoint: StepCheckpoint | None = None):
        self.max_bad_steps, self.window = max_bad_steps, window
        self.spike_zscore, self.spike_warmup = spike_zscore, spike_warmup
        self.checkpoint = checkpoint
        self.bad_steps: deque[int] = deque()
        self.skipped_total = 0
        self.spikes_total = 0
        self._mean, self._var, self._seen = 0.0, 0.0, 0
        self._skipped_this_step = False

    @property
    def state_key(self) -> str:
        return "NonFiniteGuard"

    def state_dict(self) -> dict:
        return {"skipped_total": self.skipped_total, "spikes_total": self.spikes_total,
                "bad_steps": list(self.bad_steps), "mean": self._mean, "var": self._var, "seen": self._seen}

    def load_state_dict(self, state: dict) -> None:
        self.skipped_total, self.spikes_total = int(state["skipped_total"]), int(state["spikes_total"])
        self.bad_steps = deque(int(s) for s in state["bad_steps"])
        self._mean, self._var, self._seen = float(state["mean"]), float(state["var"]), int(state["seen"])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if isinstance(trainer.strategy, DeepSpeedStrategy):
            return  # the ZeRO optimizer holds the gradients (p.grad is None): judged after its step
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        local_bad = bool(grads) and not _all_finite(grads)
        # FSDP shards differ per rank; DDP grads are identical after all-reduce. Agree either way.
        bad = trainer.strategy.reduce_boolean_decision(local_bad, all=False)
        self._skipped_this_step = bad
        if bad:
            optimizer.zero_grad(set_to_none=True)  # AdamW skips parameters without a gradient
            self._count_skip(trainer.global_step)

    def _deepspeed_verdict(self, trainer) -> None:
        """DeepSpeed's ZeRO optimizer skips a step with a non-finite gradient itself (its global norm
        is inf/NaN; strategies.deepspeed_config keeps the check on in bf16) and leaves weights and
        optimizer state untouched; `was_step_applied` says whether it did, the same on every rank."""
        self._skipped_this_step = not trainer.model.was_step_applied()
        if self._skipped_this_step:
            self._count_skip(trainer.global_step - 1)  # the step just taken, as numbered before it

    def _count_skip(self, step: int) -> None:
        self.skipped_total += 1
        self.bad_steps.append(step)
        while self.bad_steps and self.bad_steps[0] <= step - self.window:
            self.bad_steps.popleft()
        log.warning("step %d: non-finite loss/gradient, step skipped (%d in the last %d steps, %d in total)",
                    step, len(self.bad_steps), self.window, self.skipped_total)
        if len(self.bad_steps) > self.max_bad_steps:
            last = self.checkpoint.last_before(self.bad_steps[0]) if self.checkpoint is not None else None
            where = (f"the last good checkpoint (before step {self.bad_steps[0]}, the first of them) is {last}"
                     if last else "no checkpoint was saved before them")
            raise TrainingDiverged(
                f"training diverged: {len(self.bad_steps)} non-finite steps within {self.window} steps "
                f"(limit guard.max_bad_steps={self.max_bad_steps}) at step {step}; {where}. Restart from it "
                f"with a lower optim.lr or more optim.warmup_steps (ckpt_path=<that path>)"
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if isinstance(trainer.strategy, DeepSpeedStrategy):
            self._deepspeed_verdict(trainer)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        value = float(loss.detach().float()) if loss is not None else float("nan")
        spike = 0.0
        if math.isfinite(value) and not self._skipped_this_step:
            if self._seen >= self.spike_warmup and self._var > 0:
                z = (value - self._mean) / math.sqrt(self._var)
                if z > self.spike_zscore:
                    spike = 1.0
                    self.spikes_total += 1
                    log.warning("step %d: loss spike %.4g (running mean %.4g, z=%.1f)",
                                trainer.global_step, value, self._mean, z)
            # Running moments with a ~100-step memory (Welford-style exponential update).
            beta = 0.99 if self._seen > 0 else 0.0
            delta = value - self._mean
            self._mean += (1 - beta) * delta
            self._var = beta * (self._var + (1 - beta) * delta * delta)
            self._seen += 1
        pl_module.log("train/skipped_steps", float(self.skipped_total), on_step=True, on_epoch=False)
        pl_module.log("train/loss_spike", spike, on_step=True, on_epoch=False)


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    # One fused norm per tensor; a NaN or Inf anywhere makes its norm non-finite.
    norms = torch._foreach_norm([t.float() if t.dtype != torch.float32 else t for t in local])
    return bool(torch.isfinite(torch.stack(norms)).all())


# ----------------------------------------------------------------------------- RNG state


def capture_rng() -> dict:
    """This process's torch (CPU and CUDA), numpy and python RNG states as checkpoint-safe values."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RNGState(Callback):
    """Every rank's RNG states in the checkpoint; restored right before the first resumed step.

    Restored at the first `on_train_batch_start`, not at load time: between loading and the
    first step Lightning builds the data iterator, which draws a seed from the global RNG (as the
    uninterrupted run did once, at its start). Loader workers need no state of their own: the
    dataset seeds its generators from (seed, epoch, rank, worker) and the position is replayed.
    """

    def __init__(self):
        self._pending: dict | None = None

    @property
    def state_key(self) -> str:
        return "RNGState"

    def state_dict(self) -> dict:
        mine = capture_rng()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            gathered: list = [None] * world
            torch.distributed.all_gather_object(gathered, mine)  # save is collective: every rank is here
            return {"per_rank": gathered}
        return {"per_rank": [mine]}

    def load_state_dict(self, state: dict) -> None:
        self._pending = state

    def on_train_start(self, trainer, pl_module) -> None:
        # seed_everything gives every rank the same seed, so without this all ranks would draw the
        # same noise, t and caption dropout for their (different) clips: a smaller effective batch
        # of noise. Rank r continues from seed + r; rank 0, hence single-process runs, is unchanged.
        # A resumed run restores each rank's saved stream at its first batch instead.
        if trainer.world_size > 1 and trainer.global_rank > 0 and self._pending is None:
            torch.manual_seed(torch.initial_seed() + trainer.global_rank)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._pending is None:
            return
        per_rank = self._pending["per_rank"]
        if len(per_rank) != trainer.world_size:
            log.warning("resuming at world size %d from a checkpoint of world size %d: RNG streams are "
                        "not continued exactly (reseeded from rank 0's state + rank)", trainer.world_size,
                        len(per_rank))
            restore_rng(per_rank[0])
            torch.manual_seed(int(torch.randint(2**62, ())) + trainer.global_rank)
        else:
            restore_rng(per_rank[trainer.global_rank])
        self._pending = None
