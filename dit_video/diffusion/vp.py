"""Variance-preserving diffusion (DDPM, Ho et al. 2020) with eps, v or x0 targets.

x_t = sqrt(abar(t)) x_0 + sqrt(1 - abar(t)) eps, with abar from a discrete beta table of
num_train_timesteps entries (schedules.vp_alphas_cumprod): entry i sits at t = (i + 1) / N
and t = 0 is clean data, so DDPM's integer timestep i is our t = (i + 1) / N. The network is
given the continuous t, like every other objective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dit_video.diffusion.objective import Objective, ObjectiveConfig
from dit_video.diffusion.schedules import vp_alpha_sigma, vp_alphas_cumprod


@dataclass
class VPConfig(ObjectiveConfig):
    """DDPM / VP diffusion: ObjectiveConfig plus the beta table."""

    kind: str = "vp"  # fixed for this class
    target: str = "eps"  # "eps" (DDPM), "v" (Salimans & Ho 2022; needed with zero_terminal_snr) or "x0"
    timestep_sampling: str = "uniform"  # DDPM trains on uniformly drawn timesteps
    beta_schedule: str = (
        "linear"  # "linear" (DDPM), "scaled_linear" (Stable Diffusion) or "cosine" (Nichol & Dhariwal)
    )
    beta_start: float = 1e-4  # first beta of the linear schedules
    beta_end: float = 0.02  # last beta of the linear schedules
    num_train_timesteps: int = 1000  # entries of the beta table (N)
    zero_terminal_snr: bool = (
        False  # rescale so t = 1 is pure noise (Lin et al. 2024); requires target v or x0
    )

    def validate(self) -> None:
        super().validate()
        if self.beta_schedule not in ("linear", "scaled_linear", "cosine"):
            raise ValueError(
                f"objective.beta_schedule={self.beta_schedule!r}: use 'linear', 'scaled_linear' or 'cosine'"
            )
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(
                f"objective.beta_start={self.beta_start}, beta_end={self.beta_end}: need 0 < start < end < 1"
            )
        if self.num_train_timesteps < 2:
            raise ValueError(f"objective.num_train_timesteps={self.num_train_timesteps} must be >= 2")
        if self.zero_terminal_snr and self.target == "eps":
            # at t = 1, alpha = 0: x_t is pure noise, predicting eps there tells nothing about x_0
            raise ValueError("objective.zero_terminal_snr=true needs objective.target 'v' or 'x0', not 'eps'")


class VPDiffusion(Objective):
    """DDPM-style objective on a discrete VP table, evaluated at continuous t."""

    kind = "vp"
    targets = ("eps", "v", "x0")
    native_target = "eps"  # DDPM's L_simple: plain MSE on eps

    def __init__(self, cfg: VPConfig):
        super().__init__(cfg)
        self.alphas_cumprod = vp_alphas_cumprod(
            cfg.beta_schedule, cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.zero_terminal_snr
        )  # [N] float64

    def alpha_sigma(self, t: torch.Tensor):
        return vp_alpha_sigma(t, self.alphas_cumprod)
