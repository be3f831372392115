"""Evaluation while training: samples, held-out loss against t, throughput/MFU and memory.

Three Lightning callbacks, configured by conf/eval/*.yaml (`eval=` on the command line) and
added by `dit_video.run.build_trainer` through `build_eval_callbacks`:

  InTrainingSamples  every N steps sample a fixed prompt set with fixed seeds. The prompts are
                     split across ranks (prompt i on rank i mod world_size: every rank works,
                     none waits on rank 0, each prompt is sampled exactly once) and gathered;
                     rank 0 writes them to <run_dir>/samples/step-NNNNNNN/ (provenance-marked),
                     logs them to wandb/TensorBoard, and logs the demo caption probe score.
  ValidationLoss     every N steps the loss on held-out shards with fixed noise, overall and per
                     t bucket (`val/loss`, `val/loss_t0-0.1`, ...), reduced over ranks.
  Throughput         samples/s, video tokens/s, achieved TFLOP/s per device and MFU, from the
                     DiT's exact FLOP count (dit_video.model.flops) and the device's peak: the
                     A100/H100/H200 dense bf16 table, or on CPU a GEMM rate measured at start;
                     plus peak memory (CUDA allocator or process RSS).
"""

from __future__ import annotations

import io
import logging
import math
import resource
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import lightning as L
import numpy as np
import torch

log = logging.getLogger("dit_video")

# Dense bf16 peak TFLOP/s per GPU (vendor datasheets; SXM parts; no 2:4 sparsity).
PEAK_TFLOPS_BF16 = {"A100": 312.0, "H100": 989.0, "H200": 989.0}


# ----------------------------------------------------------------------------- configs


@dataclass
class SamplesConfig:
    every_n_steps: int = 0  # 0 = off
    prompts: list[str] = field(default_factory=lambda: ["a red square moving left", "a blue circle moving up"])
    seeds: list[int] | None = None  # one per prompt; None = 0, 1, 2, ...
    steps: int = 10  # sampler steps
    cfg: float = 4.0
    sampler: str = "euler"
    shift: float = 1.0
    weights: str = "ema"  # ema | raw
    to_disk: bool = True  # <run_dir>/samples/step-NNNNNNN/
    to_logger: bool = True  # wandb / TensorBoard videos (CSV logs get the probe score only)
    probe: bool = True  # log eval/probe_* when every prompt is a demo caption


@dataclass
class ValLossConfig:
    every_n_steps: int = 0  # 0 = off
    max_batches: int = 4  # held-out batches per evaluation (per rank)
    num_buckets: int = 10  # t buckets of val/loss_t*
    seed: int = 0  # fixes t and noise: successive evaluations differ only by the weights
    weights: str = "ema"  # ema | raw


@dataclass
class ThroughputConfig:
    enabled: bool = True
    log_every_n_steps: int = 10  # average over this many steps per logged value
    peak_tflops: float | None = None  # override the per-device peak (TFLOP/s); None = table or measured


def _fill(cls, values: dict, group: str):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        from dit_video.run import ConfigError

        raise ConfigError(f"{group}: unknown field(s) {unknown}; known fields are {sorted(known)}")
    return cls(**values)


def build_eval_callbacks(cfg, run_dir: Path) -> list[L.Callback]:
    """The callbacks `cfg.eval` asks for (DiT runs only; none if the config has no `eval` group)."""
    from omegaconf import OmegaConf

    if cfg.get("task") != "dit" or cfg.get("eval") is None:
        return []
    node = OmegaConf.to_container(cfg.eval, resolve=True)
    samples = _fill(SamplesConfig, node.get("samples") or {}, "eval.samples")
    val = _fill(ValLossConfig, node.get("val_loss") or {}, "eval.val_loss")
    throughput = _fill(ThroughputConfig, node.get("throughput") or {}, "eval.throughput")
    out = []
    if samples.every_n_steps > 0:
        out.append(InTrainingSamples(samples, Path(run_dir)))
    if val.every_n_steps > 0:
        out.append(ValidationLoss(val))
    if throughput.enabled:
        out.append(Throughput(throughput))
    return out


# ----------------------------------------------------------------------------- distributed sampling


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def rank_share(num_prompts: int, rank: int, world_size: int) -> list[int]:
    """Prompt indices rank `rank` samples: i with i mod world_size == rank (each exactly once)."""
    return list(range(rank, num_prompts, world_size))


def sample_across_ranks(generate, prompts: list[str], seeds: list[int]) -> tuple[np.ndarray, list[int]]:
    """Run `generate(prompts, seeds) -> uint8 [n, T, H, W, 3]` on this rank's share of the prompts
    and gather: returns (clips [N, T, H, W, 3] in prompt order, the rank that made each) on
    every rank. Without torch.distributed it is just generate(prompts, seeds)."""
    rank, world = _dist()
    mine = rank_share(len(prompts), rank, world)
    local = generate([prompts[i] for i in mine], [seeds[i] for i in mine]) if mine else None
    if world == 1:
        return local, [0] * len(prompts)
    gathered: list = [None] * world
    torch.distributed.all_gather_object(gathered, (rank, mine, local))  # pickles numpy arrays (gloo and nccl)
    clips: list = [None] * len(prompts)
    owner = [-1] * len(prompts)
    for r, indices, arr in gathered:
        for j, i in enumerate(indices):
            clips[i], owner[i] = arr[j], r
    return np.stack(clips), owner


# ----------------------------------------------------------------------------- callbacks


def _log_scalars(trainer, metrics: dict[str, float]) -> None:
    if trainer.is_global_zero and trainer.logger is not None:
        trainer.logger.log_metrics(metrics, step=trainer.global_step)


class InTrainingSamples(L.Callback):
    """Every `every_n_steps`: sample the fixed prompts with fixed seeds across ranks; log and save."""

    def __init__(self, cfg: SamplesConfig, run_dir: Path):
        self.cfg, self.run_dir = cfg, run_dir
        self.seeds = list(cfg.seeds) if cfg.seeds is not None else list(range(len(cfg.prompts)))
        if len(self.seeds) != len(cfg.prompts):
            from dit_video.run import ConfigError

            raise ConfigError(f"eval.samples.seeds: {len(self.seeds)} seeds for {len(cfg.prompts)} prompts")
        from dit_video.provenance import check_prompts

        check_prompts(list(cfg.prompts))  # the same prompt filter as sample.py, at start-up

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step > 0 and step % self.cfg.every_n_steps == 0:
            self.sample(trainer, pl_module)

    @torch.no_grad()
    def sample(self, trainer, pl_module) -> np.ndarray:
        from dit_video.pipeline import Pipeline

        c = self.cfg
        dit = pl_module.ema if c.weights == "ema" else pl_module.dit
        was_training = dit.training
        dit.eval()
        pipe = Pipeline(dit, pl_module.vae, pl_module.text_encoder, pl_module.objective, pl_module.meta)
        try:
            clips, _ = sample_across_ranks(
                lambda p, s: pipe.generate(p, s, steps=c.steps, cfg=c.cfg, shift=c.shift, sampler=c.sampler),
                list(c.prompts), self.seeds)
        finally:
            dit.train(was_training)
        if trainer.is_global_zero:
            self._publish(trainer, clips, pipe.fps)
        return clips

    def _publish(self, trainer, clips: np.ndarray, fps: float) -> None:
        c, step = self.cfg, trainer.global_step
        if c.to_disk:
            from dit_video.media import write_samples

            settings = {"sampler": c.sampler, "steps": c.steps, "cfg": c.cfg, "shift": c.shift,
                        "weights": c.weights, "global_step": step}
            write_samples(clips, list(c.prompts), self.seeds, self.run_dir / "samples" / f"step-{step:07d}", fps,
                          settings, identity={"model": "dit-video DiT (in training)", "global_step": str(step)})
        if c.probe:
            from dit_video.eval.evaluate import _probe_applies

            if _probe_applies(list(c.prompts)):
                from dit_video.eval.probe import caption_faithfulness

                report = caption_faithfulness(clips, list(c.prompts))
                _log_scalars(trainer, {f"eval/probe_{k}": report[k] for k in ("score", "colour", "direction", "shape")})
        if c.to_logger:
            self._log_videos(trainer, clips, fps)

    def _log_videos(self, trainer, clips: np.ndarray, fps: float) -> None:
        """One animated GIF per prompt to every wandb / TensorBoard logger (tag `samples/NN_<prompt>`)."""
        from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

        from dit_video.media import slug
        from dit_video.provenance import ProvenanceConfig, mark_clips

        marked = mark_clips(clips, ProvenanceConfig())  # logged videos are labelled too
        gifs = [gif_bytes(clip, fps) for clip in marked]
        tags = [f"samples/{i:02d}_{slug(p)}" for i, p in enumerate(self.cfg.prompts)]
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                # Encoded here, so wandb.Video needs neither moviepy nor imageio.
                logger.log_video("samples", [io.BytesIO(g) for g in gifs], step=trainer.global_step,
                                 caption=list(self.cfg.prompts), format=["gif"] * len(gifs))
            elif isinstance(logger, TensorBoardLogger):
                for tag, gif, clip in zip(tags, gifs, marked, strict=True):
                    tensorboard_video(logger.experiment, tag, gif, clip.shape, trainer.global_step)


def gif_bytes(clip: np.ndarray, fps: float) -> bytes:
    """uint8 [T, H, W, 3] -> a looping animated GIF at its own size (what TensorBoard and wandb show)."""
    from PIL import Image

    frames = [Image.fromarray(frame) for frame in clip]
    buf = io.BytesIO()
    # GIF delays are whole 1/100 s: round here, so a run of identical frames (stored once, delays
    # summed by Pillow) still lasts exactly its number of frames.
    duration = 10 * max(1, round(100 / fps))  # ms
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=duration, loop=0,
                   comment=b"AI-generated by dit-video")
    return buf.getvalue()


def tensorboard_video(writer, tag: str, gif: bytes, shape: tuple, step: int) -> None:
    """Write an encoded GIF as a TensorBoard video summary: the image summary with a GIF payload
    that SummaryWriter.add_video writes (which would need moviepy 1.x just to encode the GIF)."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    _, h, w, c = shape  # [T, H, W, 3]
    image = Summary.Image(height=h, width=w, colorspace=c, encoded_image_string=gif)
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)


class ValidationLoss(L.Callback):
    """Every `every_n_steps`: held-out loss with fixed t and noise, overall and per t bucket."""

    def __init__(self, cfg: ValLossConfig):
        self.cfg = cfg

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step > 0 and step % self.cfg.every_n_steps == 0:
            self.evaluate(trainer, pl_module)

    @torch.no_grad()
    def evaluate(self, trainer, pl_module) -> dict[str, float] | None:
        from dit_video.diffusion import loss_by_t_bucket, t_bucket_names

        loader = trainer.datamodule.val_dataloader() if trainer.datamodule is not None else []
        c, k = self.cfg, self.cfg.num_buckets
        dit = pl_module.ema if c.weights == "ema" else pl_module.dit
        was_training = dit.training
        dit.eval()
        sums = torch.zeros(k, dtype=torch.float64)
        counts = torch.zeros(k, dtype=torch.float64)
        generator = torch.Generator(pl_module.device).manual_seed(c.seed)
        try:
            for i, batch in enumerate(loader):
                if i >= c.max_batches:
                    break
                latents = pl_module.encode_clips(batch["clip"].to(pl_module.device))  # [B, C, T', H', W']
                text_emb, text_mask, pooled = pl_module.encode_text_pooled(list(batch["caption"]))
                _, aux = pl_module.objective.loss(dit, latents, text_emb, text_mask, generator=generator, pooled=pooled)
                means, n = loss_by_t_bucket(aux["t"], aux["mse_per_sample"], k)
                sums += torch.nan_to_num(means.double().cpu()) * n.cpu()
                counts += n.double().cpu()
        finally:
            dit.train(was_training)
        if _dist()[1] > 1:
            both = torch.stack([sums, counts])
            torch.distributed.all_reduce(both)
            sums, counts = both[0], both[1]
        if counts.sum() == 0:
            return None
        metrics = {"val/loss": float(sums.sum() / counts.sum())}
        for name, s, n in zip(t_bucket_names(k, prefix="val/loss_t"), sums.tolist(), counts.tolist(), strict=True):
            if n > 0:
                metrics[name] = s / n
        _log_scalars(trainer, metrics)
        return metrics


def measure_cpu_matmul_tflops(dtype: torch.dtype = torch.float32, n: int = 1024, reps: int = 4) -> float:
    """Achieved TFLOP/s of an n x n x n matmul on this CPU with the current thread count (best of reps)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    best = math.inf
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12


def peak_tflops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> tuple[float, str]:
    """(peak TFLOP/s per device, where the number comes from) for MFU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for gpu, tflops in PEAK_TFLOPS_BF16.items():
            if gpu in name:
                return tflops, f"{gpu} dense bf16 datasheet"
        return math.nan, f"unknown GPU {name!r}: set eval.throughput.peak_tflops"
    return measure_cpu_matmul_tflops(dtype), f"measured CPU {str(dtype).removeprefix('torch.')} GEMM"


def memory_gb(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"mem/max_allocated_gb": torch.cuda.max_memory_allocated(device) / 1e9}
    return {"mem/max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}  # KiB on Linux


class Throughput(L.Callback):
    """samples/s, tokens/s, TFLOP/s, MFU and peak memory, averaged over `log_every_n_steps` steps.

    Step time is wall time between consecutive batch ends (data loading included: what the run
    actually achieves). FLOPs are the DiT's training FLOPs from `dit_flops` (frozen VAE and
    text encoder excluded, recompute excluded), the convention MFU numbers use.
    """

    def __init__(self, cfg: ThroughputConfig):
        self.cfg = cfg
        self.flops_per_sample = self.tokens_per_sample = None  # at the run's nominal latent shape (logged once)
        self.peak = math.nan
        self.last = None
        self.window_time, self.window_samples, self.window_tokens, self.window_flops = 0.0, 0, 0, 0.0
        self._cost: dict[tuple[int, int, int], tuple[int, float]] = {}  # latent shape -> (tokens, FLOPs)

    def on_fit_start(self, trainer, pl_module) -> None:
        from dit_video.pipeline import _dit_config

        self.dit_cfg = _dit_config(pl_module.meta["dit_config"])
        self.text_len = int(getattr(pl_module.text_encoder, "max_length", 0) or 0)
        self.tokens_per_sample, self.flops_per_sample = self.cost(tuple(pl_module.meta["latent_shape"]))
        precision = str(trainer.precision)
        dtype = torch.bfloat16 if "bf16" in precision else torch.float32
        if self.cfg.peak_tflops:
            self.peak, source = float(self.cfg.peak_tflops), "configured"
        else:
            self.peak, source = peak_tflops(pl_module.device, dtype)
        if trainer.is_global_zero:
            log.info("throughput: %.3g GFLOP per training sample, %d tokens; peak %.3g TFLOP/s per device (%s)",
                     self.flops_per_sample / 1e9, self.tokens_per_sample, self.peak, source)

    def cost(self, latent_shape: tuple[int, int, int]) -> tuple[int, float]:
        """(tokens, training FLOPs) of one sample with latents of this (T', H', W')."""
        if latent_shape not in self._cost:
            from dit_video.model.flops import dit_flops

            tokens = math.prod(self.dit_cfg.grid(latent_shape))
            self._cost[latent_shape] = (tokens, dit_flops(self.dit_cfg, latent_shape, self.text_len).training)
        return self._cost[latent_shape]

    def batch_cost(self, batch, pl_module) -> tuple[int, int, float]:
        """(samples, tokens, FLOPs) of this rank's batch at its real shapes: buckets, 1-frame image
        batches and packed batches cost what they cost, not the nominal clip's FLOPs."""
        if "latents" in batch:  # data=latents: [B, C, T', H', W']
            shapes = [tuple(batch["latents"].shape[2:])] * batch["latents"].shape[0]
        elif isinstance(batch["clip"], list):  # packed: clips [T, H, W, 3] of mixed shapes
            shapes = [tuple(pl_module.vae.latent_shape(*clip.shape[:3])) for clip in batch["clip"]]
        else:  # uint8 clips [B, T, H, W, 3], one shape
            shapes = [tuple(pl_module.vae.latent_shape(*batch["clip"].shape[1:4]))] * batch["clip"].shape[0]
        costs = [self.cost(shape) for shape in shapes]
        return len(shapes), sum(c[0] for c in costs), sum(c[1] for c in costs)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self.last is not None:  # the first step (compile, warm-up) is not timed
            samples, tokens, flops = self.batch_cost(batch, pl_module)
            # ranks of one sequence-parallel group share a batch: count it once per group
            sp = _group_size(getattr(pl_module, "sequence_group", None))
            replicas = trainer.world_size // sp
            self.window_time += now - self.last
            self.window_samples += samples * replicas
            self.window_tokens += tokens * replicas
            self.window_flops += flops * replicas
        self.last = now
        if trainer.global_step % self.cfg.log_every_n_steps != 0 or self.window_time == 0:
            return
        tflops = self.window_flops / self.window_time / trainer.world_size / 1e12  # per device
        metrics = {
            "perf/samples_per_sec": self.window_samples / self.window_time,
            "perf/tokens_per_sec": self.window_tokens / self.window_time,
            "perf/tflops_per_device": tflops,
            "perf/mfu": tflops / self.peak if self.peak > 0 else math.nan,
            **memory_gb(pl_module.device),
        }
        self.window_time, self.window_samples, self.window_tokens, self.window_flops = 0.0, 0, 0, 0.0
        _log_scalars(trainer, metrics)


def _group_size(group) -> int:
    return 1 if group is None else torch.distributed.get_world_size(group)
