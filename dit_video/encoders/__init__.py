"""Video autoencoders and text encoders (frozen during DiT training)."""

from dit_video.encoders.base import TextEncoder, VideoAutoencoder, clip_to_video, video_to_clip
from dit_video.encoders.causal_vae import (
    VAE_PRESETS,
    CausalVAE,
    CausalVAEConfig,
    CausalVideoAutoencoder,
    DiagonalGaussian,
    compute_latent_stats,
    load_vae,
    save_vae,
    vae_loss,
)
from dit_video.encoders.text import HFTextEncoder, minilm_path

__all__ = [
    "TextEncoder",
    "VideoAutoencoder",
    "clip_to_video",
    "video_to_clip",
    "HFTextEncoder",
    "minilm_path",
    "VAE_PRESETS",
    "CausalVAE",
    "CausalVAEConfig",
    "CausalVideoAutoencoder",
    "DiagonalGaussian",
    "compute_latent_stats",
    "load_vae",
    "save_vae",
    "vae_loss",
]
