"""Our small causal video VAE: model, loss, latent normalisation, safetensors save/load.

Design (after the causal VAEs of CogVideoX, Wan and HunyuanVideo, scaled down for CPU):
  * every convolution is causal in time: frames are padded only at the front, by replicating the
    first frame, so output frame k never depends on input frames > k;
  * temporal downsampling encodes the first frame alone, so a clip of 1 + k*temporal_factor frames
    maps to 1 + k latent frames and an image (T = 1) lands in the same latent space as frame 0
    of a video;
  * GroupNorm statistics are taken per frame: a norm over [C, T, H, W] would leak the future
    into the past and break both properties above;
  * parameter-free shortcuts (average pooling / nearest upsampling, channel averaging into the
    latent) around every resampling step, after DC-AE (Chen et al. 2024): in our CPU runs they
    lift PSNR at equal steps (18.7 vs 17.0 dB after 50 steps on shape clips).

    video [B, 3, 1 + k*tf, H, W] --encoder--> posterior N(mean, exp(logvar)) [B, C, 1 + k, H/sf, W/sf]
    latents = (mean - shift) * scale        (what the DiT sees: ~zero mean, unit std per channel)

Modules, bottom to top:
    config.py         CausalVAEConfig, VAE_PRESETS, check_video_size
    layers.py         causal convs (and causal_stream), per-frame GroupNorm, resampling, posterior
    tiling.py         TilingConfig and the tile/chunk arithmetic of encode/decode
    model.py          CausalVAE
    frozen.py         CausalVideoAutoencoder (the frozen VideoAutoencoder), compute_latent_stats
    io.py             save_vae / load_vae and the file-format constants
    discriminator.py  3D PatchGAN, adversarial losses, adaptive weight
    lpips.py          LPIPS-VGG16 perceptual distance
    losses.py         vae_loss, VAELoss / VAELossConfig
"""

from dit_video.encoders.causal_vae.config import VAE_PRESETS, CausalVAEConfig, check_video_size
from dit_video.encoders.causal_vae.frozen import CausalVideoAutoencoder, compute_latent_stats
from dit_video.encoders.causal_vae.io import VAE_CONFIG_FILE, VAE_FORMAT, VAE_WEIGHTS_FILE, load_vae, save_vae
from dit_video.encoders.causal_vae.layers import CausalConv3d, DiagonalGaussian, causal_stream
from dit_video.encoders.causal_vae.losses import VAELoss, VAELossConfig, vae_loss, vae_loss_terms
from dit_video.encoders.causal_vae.model import CausalVAE
from dit_video.encoders.causal_vae.tiling import TilingConfig

__all__ = [
    "VAE_PRESETS",
    "CausalVAEConfig",
    "check_video_size",
    "CausalVideoAutoencoder",
    "compute_latent_stats",
    "VAE_CONFIG_FILE",
    "VAE_FORMAT",
    "VAE_WEIGHTS_FILE",
    "load_vae",
    "save_vae",
    "CausalConv3d",
    "DiagonalGaussian",
    "causal_stream",
    "VAELoss",
    "VAELossConfig",
    "vae_loss",
    "vae_loss_terms",
    "CausalVAE",
    "TilingConfig",
]
