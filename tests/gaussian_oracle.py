"""The exact network for Gaussian data, for checking samplers without a trained model.

The network is replaced by the exact denoiser of elementwise Gaussian data x_0 ~ N(mu, s^2):
    E[x_0 | x_t] = mu + alpha s^2 / (alpha^2 s^2 + sigma^2) (x_t - alpha mu)
    E[eps | x_t] = sigma / (alpha^2 s^2 + sigma^2) (x_t - alpha mu)
and the probability-flow ODE maps x(t0) affinely between the Gaussian marginals:
    x(t) = alpha(t) mu + r(t) / r(t0) (x(t0) - alpha(t0) mu),  r = sqrt(alpha^2 s^2 + sigma^2).

Used by tests/test_diffusion_samplers.py (exact solution) and tests/test_diffusion_samplers_diffusers.py.
"""

import math

import torch

from dit_video.diffusion import sample
from dit_video.diffusion.schedules import edm_preconditioning

MU, STD = 0.3, 0.6  # Gaussian data; STD != 1 so no sampler is exact by accident
SHAPE = (2, 3, 2, 4, 4)  # B, C, T, H, W


def gaussian_x0_eps(x, alpha, sigma):
    var = alpha**2 * STD**2 + sigma**2
    return MU + alpha * STD**2 / var * (x - alpha * MU), sigma / var * (x - alpha * MU)


def exact_pf_ode(x_start, objective, t_start, t_end=0.0):
    a0, s0 = (float(c) for c in objective.alpha_sigma(torch.tensor(t_start, dtype=torch.float64)))
    a1, s1 = (float(c) for c in objective.alpha_sigma(torch.tensor(t_end, dtype=torch.float64)))
    r0, r1 = math.sqrt(a0**2 * STD**2 + s0**2), math.sqrt(a1**2 * STD**2 + s1**2)
    return a1 * MU + r1 / r0 * (x_start - a0 * MU)


class GaussianOracle(torch.nn.Module):
    """The exact network for Gaussian data, in the objective's target space; records its inputs."""

    def __init__(self, objective):
        super().__init__()
        self.objective, self.inputs = objective, []

    def forward(self, x_in, t, text_emb, text_mask):
        obj, name = self.objective, self.objective.cfg.target
        t = t.double()
        x = x_in
        if name == "edm":  # undo the input scaling c_in
            c_in, c_skip, c_out = (c.view(-1, 1, 1, 1, 1) for c in edm_preconditioning(t, obj.cfg.sigma_data))
            x = x_in / c_in
        self.inputs.append(x.clone())
        alpha, sigma = (c.view(-1, 1, 1, 1, 1) for c in obj.alpha_sigma(t))
        x0, eps = gaussian_x0_eps(x, alpha, sigma)
        return {
            "eps": eps,
            "x0": x0,
            "v": alpha * eps - sigma * x0,
            "velocity": eps - x0,
            "edm": (x0 - c_skip * x) / c_out if name == "edm" else None,
        }[name]


def _text(b=SHAPE[0]):
    return torch.zeros(b, 2, 4, dtype=torch.float64), torch.ones(b, 2, dtype=torch.bool)


def _noise(seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def ours(objective, sampler, timesteps, noise, **kw):
    oracle = GaussianOracle(objective)
    out = sample(
        oracle,
        *_text(),
        SHAPE,
        noise=noise,
        sampler=sampler,
        timesteps=timesteps,
        cfg=1.0,
        objective=objective,
        **kw,
    )
    return out, oracle.inputs
