"""Prompt -> text embedding -> sampler -> latents -> VAE decode -> clips, from a checkpoint.

Usable from notebooks and scripts without Lightning:

    pipe = Pipeline.from_checkpoint("outputs/demo/dit/checkpoints/last.ckpt")
    clips = pipe.generate(["a red square moving left"], seeds=[0])   # uint8 [N, T, H, W, 3]
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from dit_video.diffusion import sample
from dit_video.encoders.base import video_to_clip


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the file and what is wrong."""


def load_checkpoint(path: str | Path) -> dict:
    """Load a Lightning checkpoint written by dit-video, never unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist (look in <run_dir>/checkpoints/)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # never fall back to full unpickling
        raise CheckpointError(
            f"checkpoint '{path}' cannot be loaded safely (weights_only=True): {str(err).splitlines()[0]}"
        ) from None
    if "dit_video" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"checkpoint '{path}' was not written by dit-video's DiT training")
    return ckpt


def _dit_config(values: dict):
    from dit_video.model import DiTConfig

    fields = {f.name: f for f in dataclasses.fields(DiTConfig)}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in fields}
    return DiTConfig(**kwargs)


class Pipeline:
    """A trained DiT with its frozen VAE and text encoder, ready to sample."""

    def __init__(self, dit, vae, text_encoder, objective, meta: dict):
        self.dit, self.vae, self.text_encoder, self.meta = dit, vae, text_encoder, meta
        self.objective = objective  # the training objective fixes what the DiT predicts
        self.latent_shape = tuple(meta["latent_shape"])  # (T', H', W')
        data = meta["config"]["data"]
        self.fps = float(data.get("fps") or 8)

    @classmethod
    def from_checkpoint(cls, path: str | Path, weights: str = "ema") -> Pipeline:
        from omegaconf import OmegaConf

        from dit_video.encoders.vae import load_vae
        from dit_video.model import DiT
        from dit_video.run import build_objective_from, build_text_encoder

        if weights not in ("ema", "raw"):
            raise ValueError(f"weights={weights!r}: use 'ema' or 'raw'")
        ckpt = load_checkpoint(path)
        meta = ckpt["dit_video"]
        dit = DiT(_dit_config(meta["dit_config"]))
        prefix = "ema." if weights == "ema" else "dit."
        state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
        dit.load_state_dict(state)
        dit.eval().requires_grad_(False)
        cfg = OmegaConf.create(meta["config"])
        vae = load_vae(str(cfg.vae.path))
        text_encoder = build_text_encoder(cfg)
        return cls(dit, vae, text_encoder, build_objective_from(cfg), meta)

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        seeds: list[int] | None = None,
        *,
        steps: int = 30,
        cfg: float = 5.0,
        shift: float | None = None,
        sampler: str = "euler",
        negative_prompt: str = "",
        batch_size: int = 16,
        autocast: bool = True,
    ) -> np.ndarray:
        """One clip per (prompt, seed) pair: uint8 [N, T, H, W, 3]. seeds default to 0, 1, 2, ...

        shift=None samples with the time shift the model was trained with (objective.shift).
        """
        if shift is None:
            shift = float(self.objective.cfg.shift)
        seeds = list(range(len(prompts))) if seeds is None else list(seeds)
        if len(seeds) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
        null_emb, null_mask = self.text_encoder.encode([negative_prompt])  # [1, L, D], [1, L]
        c = self.meta["dit_config"]["in_channels"]
        clips = []
        for i in range(0, len(prompts), batch_size):
            chunk, chunk_seeds = prompts[i : i + batch_size], seeds[i : i + batch_size]
            # Per-sample generators: a sample depends on its seed only, not on its batch neighbours.
            noise = torch.stack(
                [torch.randn((c, *self.latent_shape), generator=torch.Generator().manual_seed(s)) for s in chunk_seeds]
            )  # [b, C, T', H', W']
            text_emb, text_mask = self.text_encoder.encode(chunk)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                latents = sample(
                    self.dit, text_emb, text_mask, tuple(noise.shape), null_text_emb=null_emb,
                    null_text_mask=null_mask, sampler=sampler, steps=steps, cfg=cfg, shift=shift, noise=noise,
                    objective=self.objective,
                )
                video = self.vae.decode(latents)  # [b, 3, T, H, W]
            clips.append(video_to_clip(video.float()))
        return torch.cat(clips).numpy()
