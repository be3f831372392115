"""A trained CausalVAE frozen behind the VideoAutoencoder protocol, and the per-channel latent
normalisation (shift, scale) it applies."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict

import torch
from torch import nn

from dit_video.encoders.base import clip_to_video
from dit_video.encoders.causal_vae.config import check_video_size
from dit_video.encoders.causal_vae.model import CausalVAE
from dit_video.encoders.causal_vae.tiling import TilingConfig
from dit_video.files import sha256_file


class CausalVideoAutoencoder(nn.Module):
    """A trained CausalVAE, frozen, as the DiT sees it (implements `VideoAutoencoder`).

    encode: video -> (posterior mean - shift) * scale; decode: latents / scale + shift -> video.
    The posterior mean (not a sample) makes encoding deterministic, so precomputed latents are
    reproducible. `tiling` (a TilingConfig, or None) makes encode/decode tiled and chunked.
    """

    def __init__(
        self,
        vae: CausalVAE,
        shift: torch.Tensor,
        scale: torch.Tensor,
        weights_path: str | None = None,
        name: str = "causal_vae",
        tiling: TilingConfig | None = None,
    ):
        super().__init__()
        c = vae.config.latent_channels
        if shift.shape != (c,) or scale.shape != (c,):
            raise ValueError(
                f"shift/scale must have shape [{c}] (latent_channels), got {tuple(shift.shape)}, {tuple(scale.shape)}"
            )
        self.vae = vae.eval().requires_grad_(False)
        self.register_buffer("shift", shift.detach().float().clone())  # [C]
        self.register_buffer("scale", scale.detach().float().clone())  # [C]
        self.latent_channels = c
        self.temporal_factor = vae.config.temporal_factor
        self.spatial_factor = vae.config.spatial_factor
        self.weights_path = weights_path
        self.name = name
        self.tiling = None if tiling is None else tiling.validate(vae.config)
        self._sha256: str | None = None
        self.eval()

    def train(self, mode: bool = True) -> CausalVideoAutoencoder:
        # Frozen: a parent module's .train() must not put GroupNorm/dropout-free blocks in a
        # different mode than the one the latents were computed in.
        return super().train(False)

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        check_video_size(num_frames, height, width, self.temporal_factor, self.spatial_factor)
        return (
            1 + (num_frames - 1) // self.temporal_factor,
            height // self.spatial_factor,
            width // self.spatial_factor,
        )

    def _param_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """video [B, 3, T, H, W] in [-1, 1] -> normalised latents [B, C, T', H', W'] (float32)."""
        mean = self.vae.encode(video.to(self._param_dtype()), self.tiling).mean  # [B, C, T', H', W']
        return (mean - self.shift.view(1, -1, 1, 1, 1)) * self.scale.view(1, -1, 1, 1, 1)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """normalised latents [B, C, T', H', W'] -> video [B, 3, T, H, W] (float32, about [-1, 1])."""
        z = latents.float() / self.scale.view(1, -1, 1, 1, 1) + self.shift.view(1, -1, 1, 1, 1)
        return self.vae.decode(z.to(self._param_dtype()), self.tiling).float()

    def identity(self) -> dict:
        if self._sha256 is None and self.weights_path is not None:
            self._sha256 = sha256_file(self.weights_path)
        return {
            "name": self.name,
            "weights": self.weights_path,
            "sha256": self._sha256,
            "config": asdict(self.vae.config),
        }


@torch.no_grad()
def compute_latent_stats(vae: CausalVAE, clips: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (shift, scale) = (mean, 1/std) of posterior means over uint8 clips [B, T, H, W, 3].

    Run once after VAE training so the DiT sees roughly unit-variance latents whatever the KL weight
    left them at (SD's 0.18215 factor, per channel). Sums are accumulated in float64.
    """
    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    was_training = vae.training
    vae.eval()
    total = total_sq = None
    count = 0
    for clip in clips:
        if clip.dtype != torch.uint8 or clip.ndim != 5 or clip.shape[-1] != 3:
            raise ValueError(
                f"compute_latent_stats expects uint8 clips [B, T, H, W, 3], got {clip.dtype} {tuple(clip.shape)}"
            )
        mean = vae.encode(clip_to_video(clip.to(device)).to(dtype)).mean.double()  # [B, C, T', H', W']
        per_channel = mean.transpose(0, 1).flatten(1)  # [C, N]
        s, sq = per_channel.sum(dim=1), per_channel.pow(2).sum(dim=1)
        total = s if total is None else total + s
        total_sq = sq if total_sq is None else total_sq + sq
        count += per_channel.shape[1]
    vae.train(was_training)
    if count == 0:
        raise ValueError("compute_latent_stats got no clips: pass a non-empty iterable of uint8 clips")
    mu = total / count
    std = (total_sq / count - mu.pow(2)).clamp_min(1e-12).sqrt()
    return mu.float().cpu(), (1.0 / std).float().cpu()
