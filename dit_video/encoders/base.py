"""The two encoder interfaces every pipeline stage talks to.

Naming used across dit-video:
  clip     uint8 frames   [B, T, H, W, 3]  (what the loader yields and what we write to mp4)
  video    float pixels   [B, 3, T, H, W]  in [-1, 1] (what autoencoders take and return)
  latents  float          [B, C, T', H', W'] normalised: roughly zero mean, unit std per channel
  text_emb float          [B, L, D];  text_mask bool [B, L] (True = real token)
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


def clip_to_video(clip: torch.Tensor) -> torch.Tensor:
    """uint8 [B, T, H, W, 3] -> float [B, 3, T, H, W] in [-1, 1]."""
    return clip.permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)


def video_to_clip(video: torch.Tensor) -> torch.Tensor:
    """float [B, 3, T, H, W] in [-1, 1] -> uint8 [B, T, H, W, 3] (values outside [-1, 1] are clamped)."""
    clip = video.float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)
    return clip.permute(0, 2, 3, 4, 1).contiguous()


@runtime_checkable
class VideoAutoencoder(Protocol):
    """A frozen video autoencoder as the DiT sees it: pixels <-> normalised latents.

    `encode` applies the latent normalisation ((z - shift) * scale) and `decode` undoes it, so
    the diffusion model only ever sees normalised latents.
    """

    latent_channels: int
    temporal_factor: int  # frames per latent frame (after the first, which is encoded alone if causal)
    spatial_factor: int  # pixels per latent pixel along H and W

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(T', H', W') of the latents for a video of this size; raises ValueError naming the rule."""
        ...

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """video [B, 3, T, H, W] in [-1, 1] -> latents [B, C, T', H', W']."""
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, C, T', H', W'] -> video [B, 3, T, H, W] in about [-1, 1]."""
        ...

    def identity(self) -> dict:
        """JSON-able description (name, weights path, weights hash, config) recorded in DiT checkpoints."""
        ...


@runtime_checkable
class TextEncoder(Protocol):
    """A frozen text encoder: captions -> token embeddings and padding mask (and, for encoders
    like CLIP, one pooled vector per caption)."""

    dim: int  # D of text_emb
    pooled_dim: int  # P of the pooled vector; 0 when the encoder has none

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """captions -> (text_emb [B, L, D] float, text_mask [B, L] bool, True = real token)."""
        ...

    def encode_pooled(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """captions -> (text_emb, text_mask as `encode`, pooled [B, P] float, or None when pooled_dim == 0)."""
        ...

    def identity(self) -> dict:
        """JSON-able description (name, path, weights hash, max_length) recorded in DiT checkpoints."""
        ...
