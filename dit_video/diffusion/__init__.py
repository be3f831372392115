"""Objectives (noising, targets, timestep sampling, loss) and samplers.

Time convention everywhere: t in [0, 1], t = 0 is data, t = 1 is noise, x_t = alpha(t) x_0 + sigma(t) eps.
    objective.py          ObjectiveConfig and the shared loss (targets, weighting, conditioning frames)
    flow.py, vp.py, edm.py  rectified flow, DDPM/VP, EDM preconditioning
    build.py              build_objective(cfg_dict): `kind` -> class
    schedules.py          pure schedule functions: time shift, VP tables, EDM coefficients, sampling grids
    timestep_sampling.py  training distributions of t: uniform, logit-normal, mode
    weighting.py          min-SNR-gamma, per-t-bucket loss for logging
    conditioning.py       conditioning-frame masks (image-to-video, extension, random masking)
    sampling.py           euler, heun, ddim, dpmpp_2m, classifier-free guidance, sample()
"""

from dit_video.diffusion.build import OBJECTIVES, build_objective
from dit_video.diffusion.conditioning import draw_cond_mask, hold_cond_frames, prefix_cond_mask
from dit_video.diffusion.edm import EDM, EDMConfig
from dit_video.diffusion.flow import FlowConfig, RectifiedFlow
from dit_video.diffusion.objective import Objective, ObjectiveConfig
from dit_video.diffusion.sampling import SAMPLERS, Denoiser, GuidedModel, sample
from dit_video.diffusion.schedules import (
    edm_preconditioning,
    flow_timesteps,
    shift_time,
    token_shift,
    vp_alpha_sigma,
    vp_alphas_cumprod,
    vp_timesteps,
)
from dit_video.diffusion.timestep_sampling import sample_timesteps
from dit_video.diffusion.vp import VPConfig, VPDiffusion
from dit_video.diffusion.weighting import loss_by_t_bucket, t_bucket_names

__all__ = [
    "EDM",
    "OBJECTIVES",
    "SAMPLERS",
    "Denoiser",
    "EDMConfig",
    "FlowConfig",
    "GuidedModel",
    "Objective",
    "ObjectiveConfig",
    "RectifiedFlow",
    "VPConfig",
    "VPDiffusion",
    "build_objective",
    "draw_cond_mask",
    "edm_preconditioning",
    "flow_timesteps",
    "hold_cond_frames",
    "loss_by_t_bucket",
    "prefix_cond_mask",
    "sample",
    "sample_timesteps",
    "shift_time",
    "t_bucket_names",
    "token_shift",
    "vp_alpha_sigma",
    "vp_alphas_cumprod",
    "vp_timesteps",
]
