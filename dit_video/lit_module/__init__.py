"""Thin LightningModules: the pipeline in `training_step`, everything else injected.

Model code (dit_video/model, dit_video/encoders) knows nothing about Lightning, devices or
distribution; the objective (dit_video/diffusion) owns the noise. What remains here is the
wiring: frozen encoders in, loss out, EMA, optimiser and what goes into a checkpoint.

  dit.py     DiTModule: stage 2 (frozen VAE and text encoder in, the objective's loss out, EMA)
  vae.py     VAEModule: stage 1 (our causal VAE; optional discriminator with manual optimisation)
  frozen.py  frozen encoders kept outside the module tree (no strategy shards or saves them)
  optim.py   OptimConfig, AdamW with warmup
  ema.py     the fp32 EMA of the DiT, outside the module tree, in every checkpoint as ema.*
"""

from dit_video.lit_module.dit import DiTModule
from dit_video.lit_module.ema import EMAWeights, ema_decay_at, ema_update
from dit_video.lit_module.frozen import FrozenEncoders, FrozenEncodersMixin
from dit_video.lit_module.optim import OptimConfig, build_optimizer
from dit_video.lit_module.vae import VAEModule

__all__ = ["DiTModule", "VAEModule", "FrozenEncoders", "FrozenEncodersMixin", "OptimConfig", "build_optimizer",
           "ema_decay_at", "ema_update", "EMAWeights"]
