"""Rectified flow (Liu et al. 2022; SD3, Esser et al. 2024): the objective owns the noise.

Convention used everywhere in dit-video:
    x_t = (1 - t) * x_0 + t * eps,   t in [0, 1],  t = 0 is data, t = 1 is pure noise
    v   = d x_t / d t = eps - x_0    (the network predicts v: target "velocity")
Sampling integrates dx/dt = v from t = 1 down to t = 0.
(Open-Sora 2.0 / Movie Gen use v = (1 - sigma_min) eps - x_0; with sigma_min = 0 it is ours.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dit_video.diffusion.objective import Objective, ObjectiveConfig
from dit_video.diffusion.schedules import shift_time

__all__ = ["FlowConfig", "RectifiedFlow", "shift_time"]


@dataclass
class FlowConfig(ObjectiveConfig):
    """Rectified flow; all fields are ObjectiveConfig's (target: velocity | x0 | eps)."""

    kind: str = "rectified_flow"  # fixed for this class
    target: str = "velocity"  # "velocity" (eps - x_0, SD3), "x0" or "eps" (eps cannot be sampled from t = 1, where alpha = 0)


class RectifiedFlow(Objective):
    """Noising, velocity target, timestep sampling and the training loss of rectified flow."""

    kind = "rectified_flow"
    targets = ("velocity", "x0", "eps")
    native_target = "velocity"  # SD3's loss: plain MSE on the velocity
    flow_path = True

    def alpha_sigma(self, t):
        return 1.0 - t, t

    @staticmethod
    def interpolate(latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = (1 - t) x_0 + t eps with t [B] broadcast over [B, C, T, H, W]."""
        t = t.view(-1, *([1] * (latents.dim() - 1)))  # [B, 1, 1, 1, 1]
        return (1.0 - t) * latents + t * noise
