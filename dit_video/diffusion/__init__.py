"""Objectives (noising, targets, timestep sampling, loss) and samplers."""

from dit_video.diffusion.flow import FlowConfig, RectifiedFlow, shift_time
from dit_video.diffusion.sampling import SAMPLERS, flow_timesteps, sample

__all__ = ["FlowConfig", "RectifiedFlow", "SAMPLERS", "flow_timesteps", "sample", "shift_time"]
