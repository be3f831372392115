"""Training-time distributions of t (before the time shift): pure functions of a generator.

Which noise levels a model trains on matters as much as the loss: SD3 (Esser et al. 2024,
sec. 3.1) found logit-normal with m = 0, s = 1 best for rectified flow; EDM's log-normal sigma
is the same family (logit(t) = ln sigma for sigma = t / (1 - t)).
"""

from __future__ import annotations

import math

import torch

TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "mode")


def sample_timesteps(
    kind: str,
    batch_size: int,
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    device=None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """t [B] in (0, 1), float32.

    uniform       t ~ U(0, 1)
    logit_normal  t = sigmoid(n), n ~ N(logit_mean, logit_std^2)
    mode          t = f(u) = 1 - u - s (cos^2(pi u / 2) - 1 + u), u ~ U(0, 1) (SD3 eq. 20):
                  s > 0 favours mid-range t, s < 0 the ends, s = 0 is uniform
    """
    if kind == "uniform":
        return torch.rand(batch_size, device=device, generator=generator)
    if kind == "logit_normal":
        n = torch.randn(batch_size, device=device, generator=generator)
        return torch.sigmoid(logit_mean + logit_std * n)
    if kind == "mode":
        u = torch.rand(batch_size, device=device, generator=generator)
        return 1.0 - u - mode_scale * (torch.cos(math.pi / 2 * u) ** 2 - 1.0 + u)
    raise ValueError(f"objective.timestep_sampling={kind!r}: use one of {TIMESTEP_SAMPLINGS}")


# mode sampling is a monotone map of u (so a proper density on (0, 1)) only for s in this range
MODE_SCALE_RANGE = (-1.0, 2.0 / (math.pi - 2.0))
