"""Rectified flow (Liu et al. 2022; SD3, Esser et al. 2024): the objective owns the noise.

Convention used everywhere in dit-video:
    x_t = (1 - t) * x_0 + t * eps,   t in [0, 1],  t = 0 is data, t = 1 is pure noise
    v   = d x_t / d t = eps - x_0    (the network predicts v)
Sampling integrates dx/dt = v from t = 1 down to t = 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class FlowConfig:
    timestep_sampling: str = "logit_normal"  # "logit_normal" (SD3: t = sigmoid(n), n ~ N(mean, std)) or "uniform"
    logit_mean: float = 0.0  # mean of n for logit-normal sampling; > 0 puts more weight on noisy t
    logit_std: float = 1.0  # std of n for logit-normal sampling
    shift: float = 1.0  # time shift s: t' = s t / (1 + (s - 1) t); s > 1 spends more steps at high noise
    caption_dropout: float = 0.1  # probability of training with the empty caption, for classifier-free guidance

    def validate(self) -> None:
        if self.timestep_sampling not in ("logit_normal", "uniform"):
            raise ValueError(
                f"objective.timestep_sampling={self.timestep_sampling!r}: use 'logit_normal' or 'uniform'"
            )
        if self.logit_std <= 0:
            raise ValueError(f"objective.logit_std={self.logit_std} must be > 0")
        if self.shift <= 0:
            raise ValueError(f"objective.shift={self.shift} must be > 0")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"objective.caption_dropout={self.caption_dropout} must be in [0, 1)")


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3 time shift t' = s t / (1 + (s - 1) t); identity for s = 1, keeps 0 -> 0 and 1 -> 1."""
    if shift == 1.0:
        return t
    return shift * t / (1.0 + (shift - 1.0) * t)


class RectifiedFlow:
    """Noising, velocity target, timestep sampling and the training loss of rectified flow."""

    def __init__(self, cfg: FlowConfig):
        cfg.validate()
        self.cfg = cfg

    def sample_t(self, batch_size: int, device: torch.device, generator: torch.Generator | None = None):
        """Training times t [B] in (0, 1)."""
        if self.cfg.timestep_sampling == "uniform":
            t = torch.rand(batch_size, device=device, generator=generator)
        else:
            n = torch.randn(batch_size, device=device, generator=generator)
            t = torch.sigmoid(self.cfg.logit_mean + self.cfg.logit_std * n)
        return shift_time(t, self.cfg.shift)

    @staticmethod
    def interpolate(latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = (1 - t) x_0 + t eps with t [B] broadcast over [B, C, T, H, W]."""
        t = t.view(-1, *([1] * (latents.dim() - 1)))  # [B, 1, 1, 1, 1]
        return (1.0 - t) * latents + t * noise

    def loss(self, model, latents, text_emb, text_mask, generator: torch.Generator | None = None):
        """Mean squared velocity error.

        latents [B, C, T, H, W] (clean, normalised); returns (loss scalar, aux) where aux holds
        `t` [B] and `loss_per_sample` [B] (float32, detached) for per-timestep logging.
        """
        noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype, generator=generator)
        t = self.sample_t(latents.shape[0], latents.device, generator)  # [B]
        x_t = self.interpolate(latents, noise, t)  # [B, C, T, H, W]
        v_pred = model(x_t, t, text_emb, text_mask)  # [B, C, T, H, W]
        # The loss is computed in fp32: under bf16 autocast the prediction is bf16, and a bf16
        # mean over ~1e4 elements loses the small differences late training cares about.
        err = F.mse_loss(v_pred.float(), (noise - latents).float(), reduction="none")
        loss_per_sample = err.flatten(1).mean(1)  # [B]
        return loss_per_sample.mean(), {"t": t.detach(), "loss_per_sample": loss_per_sample.detach()}
