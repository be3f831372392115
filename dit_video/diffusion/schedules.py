"""Noise schedules and sampling time grids: pure functions of their arguments.

Time convention of dit-video (every objective, every sampler): t in [0, 1], t = 0 is clean data,
t = 1 is (almost) pure noise, and x_t = alpha(t) x_0 + sigma(t) eps.

    rectified flow / EDM   alpha = 1 - t,        sigma = t
    VP (DDPM)              alpha = sqrt(abar),   sigma = sqrt(1 - abar),  abar from a beta table

A VP table has N entries abar[0..N-1] (N = num_train_timesteps, diffusers' `alphas_cumprod`);
entry i sits at t = (i + 1) / N and t = 0 is abar = 1 (diffusers' `set_alpha_to_one`), so the
integer timestep i of DDPM/diffusers and our t are related by t = (i + 1) / N.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# ----------------------------------------------------------------------------- time shift


def shift_time(t: torch.Tensor, shift) -> torch.Tensor:
    """SD3 time shift t' = s t / (1 + (s - 1) t); identity for s = 1, keeps 0 -> 0 and 1 -> 1.

    `shift` is a float or a tensor broadcastable to t (one shift per sample, see `token_shift`).
    """
    if not isinstance(shift, torch.Tensor) and shift == 1.0:
        return t
    return shift * t / (1.0 + (shift - 1.0) * t)


def token_shift(num_tokens, shift: float, base_tokens: int):
    """Resolution/length-dependent shift s = shift * sqrt(num_tokens / base_tokens).

    SD3 (Esser et al. 2024, eq. 23) keeps the per-token signal-to-noise of a reference
    resolution by scaling the shift with sqrt(m / n); Open-Sora 2.0 does the same in training.
    num_tokens is an int or a tensor [B] (a mixed-size batch gets one shift per sample).
    """
    if isinstance(num_tokens, torch.Tensor):
        return shift * torch.sqrt(num_tokens.double() / base_tokens)
    return shift * math.sqrt(num_tokens / base_tokens)


# ----------------------------------------------------------------------------- VP tables


def vp_alphas_cumprod(
    schedule: str = "linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    zero_terminal_snr: bool = False,
) -> torch.Tensor:
    """abar[i] = prod_{j <= i} (1 - beta_j) for i = 0..N-1, float64 [N].

    linear        betas evenly spaced in [beta_start, beta_end] (Ho et al. 2020)
    scaled_linear sqrt(betas) evenly spaced (Stable Diffusion's "scaled_linear")
    cosine        abar(t) = cos^2((t + s)/(1 + s) pi/2), s = 0.008, betas capped at 0.999
                  (Nichol & Dhariwal 2021; diffusers' "squaredcos_cap_v2")
    zero_terminal_snr rescales sqrt(abar) so abar[N-1] = 0 exactly (Lin et al. 2024, alg. 1):
    the last training step then sees pure noise, as sampling from t = 1 assumes.
    """
    n = num_train_timesteps
    if schedule == "linear":
        betas = np.linspace(beta_start, beta_end, n, dtype=np.float64)
    elif schedule == "scaled_linear":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
    elif schedule == "cosine":

        def abar(u):
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        # the cap keeps the last betas < 1 (abar(1) = 0 would make beta_{N-1} = 1)
        betas = np.array([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)])
    else:
        raise ValueError(f"objective.beta_schedule={schedule!r}: use 'linear', 'scaled_linear' or 'cosine'")
    alphas_cumprod = torch.from_numpy(np.cumprod(1.0 - betas))  # [N]
    if zero_terminal_snr:
        alphas_cumprod = rescale_zero_terminal_snr(alphas_cumprod)
    return alphas_cumprod


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(abar) so its last entry is 0 and its first is unchanged (Lin et al. 2024)."""
    s = alphas_cumprod.sqrt()
    s0, s_last = s[0].clone(), s[-1].clone()
    s = (s - s_last) * s0 / (s0 - s_last)
    return s**2


def vp_alpha_sigma(t: torch.Tensor, alphas_cumprod: torch.Tensor):
    """(alpha, sigma) at continuous t for a VP table; exact at the grid t = (i + 1) / N.

    Between grid points abar is interpolated linearly, with abar = 1 at t = 0, so training can
    draw any t in (0, 1) and samplers on the grid see exactly the table values.
    """
    n = alphas_cumprod.shape[0]
    table = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod]).to(
        t.device
    )  # [N + 1], index k <-> t = k / N
    k = (t.double() * n).clamp(0, n)
    k0 = k.floor().clamp(max=n - 1)
    frac = k - k0
    abar = table[k0.long()] * (1 - frac) + table[k0.long() + 1] * frac
    abar = abar.clamp(0.0, 1.0)
    return abar.sqrt().to(t.dtype), (1 - abar).sqrt().to(t.dtype)


# ----------------------------------------------------------------------------- EDM


def edm_preconditioning(t: torch.Tensor, sigma_data: float):
    """EDM's (c_in, c_skip, c_out) (Karras et al. 2022, table 1) written for the flow state x_t.

    EDM noises x_sigma = x_0 + sigma eps; with sigma = t / (1 - t) this is x_t / (1 - t), the
    rectified-flow state rescaled. Folding the 1 / (1 - t) into the coefficients keeps every one
    finite on the whole of [0, 1] (sigma = inf at t = 1):
        D = sqrt(t^2 + sigma_data^2 (1 - t)^2)
        network input  x_t / D                              (= c_in x_sigma)
        x_0 = sigma_data^2 (1 - t) / D^2 * x_t + t sigma_data / D * F   (= c_skip x_sigma + c_out F)
    Returns (c_in, c_skip, c_out), each to be multiplied with x_t, x_t and F.
    """
    d = torch.sqrt(t**2 + sigma_data**2 * (1 - t) ** 2)
    return 1.0 / d, sigma_data**2 * (1 - t) / d**2, t * sigma_data / d


# ----------------------------------------------------------------------------- sampling grids


def flow_timesteps(
    steps: int, shift: float = 1.0, device=None, t_max: float = 1.0, t_last: float | None = None
):
    """steps + 1 sampling times from t_max down to 0 [steps + 1], float64.

    The first `steps` times are linspace(t_max, t_last) shifted by `shift`; the final time is 0.
    The default t_last = t_max / steps makes the unshifted grid uniform down to 0. diffusers'
    grids are special cases (see tests/test_diffusion_reference.py):
        FlowMatchEuler/HeunDiscreteScheduler(shift=s)      t_last = shift_time(1 / N, s)
        DPMSolverMultistepScheduler(use_flow_sigmas=True)  t_max = 1 - 1 / N
    """
    if t_last is None:
        return shift_time(torch.linspace(t_max, 0.0, steps + 1, dtype=torch.float64, device=device), shift)
    ts = shift_time(torch.linspace(t_max, t_last, steps, dtype=torch.float64, device=device), shift)
    return torch.cat([ts, ts.new_zeros(1)])


def vp_timesteps(steps: int, num_train_timesteps: int = 1000, spacing: str = "trailing") -> torch.Tensor:
    """steps + 1 sampling times on a VP table's grid, from high noise down to t = 0, float64.

    spacing (Lin et al. 2024, table 2, names as in diffusers):
        trailing  indices N-1, N-1-N/steps, ...: starts at the last training step (use with zero SNR)
        leading   indices (steps-1) k, ..., k, 0 with k = N // steps (DDIM; DDIMScheduler's default)
        linspace  round(linspace(0, N-1, steps+1)) without its 0 (DPMSolverMultistepScheduler's default)
    """
    n = num_train_timesteps
    if spacing == "trailing":
        idx = np.round(np.arange(n, 0, -n / steps)).astype(np.int64) - 1
    elif spacing == "leading":
        idx = (np.arange(0, steps) * (n // steps))[::-1].astype(np.int64)
    elif spacing == "linspace":
        idx = np.linspace(0, n - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    else:
        raise ValueError(f"spacing={spacing!r}: use 'trailing', 'leading' or 'linspace'")
    ts = torch.from_numpy((idx + 1) / n)  # index i <-> t = (i + 1) / N
    return torch.cat([ts, ts.new_zeros(1)])
