"""In-training samples: a fixed prompt set with fixed seeds, split across ranks, saved and logged.

Prompt i is sampled on rank i mod world_size (every rank works, none waits on rank 0, each prompt
exactly once); the clips are gathered, and rank 0 writes them to <run_dir>/samples/step-NNNNNNN/
(provenance-marked), logs them to wandb/TensorBoard, and logs the demo caption probe score or,
for prompts that name a camera motion, the scene and motion accuracy (eval/camera.py).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from PIL import Image

from dit_video.callbacks import log_scalars
from dit_video.distributed import rank_and_world
from dit_video.errors import ConfigError
from dit_video.eval.camera import CameraScorer, run_clip_shards
from dit_video.media import slug, write_samples
from dit_video.metrics.motion import motion_applies
from dit_video.metrics.probe import caption_faithfulness, probe_applies
from dit_video.pipeline import Pipeline
from dit_video.provenance import ProvenanceConfig, check_prompts, mark_clips


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
    probe: bool = True  # log eval/probe_* when every prompt is a demo caption, eval/motion_accuracy etc. when
    # every prompt names a camera motion


def rank_share(num_prompts: int, rank: int, world_size: int) -> list[int]:
    """Prompt indices rank `rank` samples: i with i mod world_size == rank (each exactly once)."""
    return list(range(rank, num_prompts, world_size))


def sample_across_ranks(generate, prompts: list[str], seeds: list[int]) -> tuple[np.ndarray, list[int]]:
    """Run `generate(prompts, seeds) -> uint8 [n, T, H, W, 3]` on this rank's share of the prompts
    and gather: returns (clips [N, T, H, W, 3] in prompt order, the rank that made each) on
    every rank. Without torch.distributed it is just generate(prompts, seeds).

    Every rank generates the same number of clips, ceil(N / world): under FSDP2 (or ZeRO-3 raw
    weights) each DiT forward is a collective, so a rank with fewer prompts (or none: 4 prompts
    on 8 GPUs) pads its share with repeats of a prompt and drops their clips. Padding costs no
    wall time: that rank would otherwise wait for the others at the gather."""
    rank, world = rank_and_world()
    if world == 1:
        return (generate(prompts, seeds) if prompts else None), [0] * len(prompts)
    mine = rank_share(len(prompts), rank, world)
    padded = mine + [mine[0] if mine else 0] * (-(-len(prompts) // world) - len(mine))
    local = generate([prompts[i] for i in padded], [seeds[i] for i in padded])[: len(mine)] if padded else None
    gathered: list = [None] * world
    torch.distributed.all_gather_object(gathered, (rank, mine, local))  # pickles numpy arrays (gloo and nccl)
    clips: list = [None] * len(prompts)
    owner = [-1] * len(prompts)
    for r, indices, arr in gathered:
        for j, i in enumerate(indices):
            clips[i], owner[i] = arr[j], r
    return np.stack(clips), owner


class InTrainingSamples(L.Callback):
    """Every `every_n_steps`: sample the fixed prompts with fixed seeds across ranks; log and save."""

    def __init__(self, cfg: SamplesConfig, run_dir: Path):
        self.cfg, self.run_dir = cfg, run_dir
        self.seeds = list(cfg.seeds) if cfg.seeds is not None else list(range(len(cfg.prompts)))
        if len(self.seeds) != len(cfg.prompts):
            raise ConfigError(f"eval.samples.seeds: {len(self.seeds)} seeds for {len(cfg.prompts)} prompts")

        check_prompts(list(cfg.prompts))  # the same prompt filter as sample.py, at start-up
        self.camera: CameraScorer | None = None  # scene references: the run's training clips, read on first use

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step > 0 and step % self.cfg.every_n_steps == 0:
            self.sample(trainer, pl_module)

    @torch.no_grad()
    def sample(self, trainer, pl_module) -> np.ndarray:
        c = self.cfg
        with pl_module.weights(c.weights) as dit:  # the EMA copy, or a LoRA run's DiT with its EMA adapters
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
            if self.camera is None and c.probe and motion_applies(list(c.prompts)):
                self.camera = CameraScorer(run_clip_shards(pl_module.meta["config"]["data"])[0])
            self._publish(trainer, clips, pipe.fps)
        return clips

    def _publish(self, trainer, clips: np.ndarray, fps: float) -> None:
        c, step = self.cfg, trainer.global_step
        if c.to_disk:
            settings = {"sampler": c.sampler, "steps": c.steps, "cfg": c.cfg, "shift": c.shift,
                        "weights": c.weights, "global_step": step}
            write_samples(clips, list(c.prompts), self.seeds, self.run_dir / "samples" / f"step-{step:07d}", fps,
                          settings, identity={"model": "dit-video DiT (in training)", "global_step": str(step)})
        if c.probe:
            if probe_applies(list(c.prompts)):
                report = caption_faithfulness(clips, list(c.prompts))
                log_scalars(trainer, {f"eval/probe_{k}": report[k] for k in ("score", "colour", "direction", "shape")})
            if self.camera is not None:  # eval/motion_accuracy, eval/scene_accuracy, eval/scene_and_motion
                scores = self.camera.score(clips, list(c.prompts))
                names = {"motion": "motion_accuracy", "scene": "scene_accuracy", "both": "scene_and_motion"}
                log_scalars(trainer, {f"eval/{v}": scores[k] for k, v in names.items() if k in scores})
        if c.to_logger:
            self._log_videos(trainer, clips, fps)

    def _log_videos(self, trainer, clips: np.ndarray, fps: float) -> None:
        """One animated GIF per prompt to every wandb / TensorBoard logger (tag `samples/NN_<prompt>`)."""

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
