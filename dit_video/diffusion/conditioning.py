"""Conditioning frames: image-to-video, video extension and random frame masking.

A conditioning frame is a latent frame that is given, not generated. In training it is kept
clean (never noised) and left out of the loss; in sampling it is held at the given latents at
every model call and copied into the output, so it is reproduced exactly. One bool mask over
latent frames, cond_mask [B, T], covers every mode (Open-Sora 1.2's frame masks work the same):

    text-to-video     all False
    image-to-video    frame 0 True
    video extension   frames 0..k-1 True
    random masking    an arbitrary subset True (always leaving at least one frame to generate)
"""

from __future__ import annotations

import torch


def draw_cond_mask(
    batch_size: int,
    num_frames: int,
    *,
    p_first_frame: float = 0.0,
    p_prefix: float = 0.0,
    p_random: float = 0.0,
    random_frame_prob: float = 0.5,
    device=None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Training-time conditioning masks, bool [B, T], one mode per sample.

    Each sample is image-to-video with probability p_first_frame, video extension (first k
    frames, k uniform in 1..T-1) with p_prefix, random masking (each frame with probability
    random_frame_prob) with p_random, and text-to-video otherwise. At least one frame of every
    sample stays unmasked; a 1-frame sample (an image) is never conditioned.
    """
    mask = torch.zeros(batch_size, num_frames, dtype=torch.bool, device=device)
    if num_frames < 2:
        return mask
    u = torch.rand(batch_size, device=device, generator=generator)  # which mode
    k = torch.randint(1, num_frames, (batch_size,), device=device, generator=generator)  # prefix length
    frames = torch.rand(batch_size, num_frames, device=device, generator=generator) < random_frame_prob
    frame_idx = torch.arange(num_frames, device=device)  # [T]
    first = u < p_first_frame
    prefix = (u >= p_first_frame) & (u < p_first_frame + p_prefix)
    random = (u >= p_first_frame + p_prefix) & (u < p_first_frame + p_prefix + p_random)
    mask[first, 0] = True
    mask |= prefix[:, None] & (frame_idx[None] < k[:, None])
    mask |= random[:, None] & frames
    # a fully masked sample has nothing to learn from: give it back its last frame
    full = mask.all(1)
    mask[full, -1] = False
    return mask


def prefix_cond_mask(batch_size: int, num_frames: int, num_cond_frames: int, device=None) -> torch.Tensor:
    """bool [B, T] marking the first `num_cond_frames` latent frames (1 = image-to-video)."""
    mask = torch.zeros(batch_size, num_frames, dtype=torch.bool, device=device)
    mask[:, :num_cond_frames] = True
    return mask


def hold_cond_frames(x: torch.Tensor, cond_latents: torch.Tensor, cond_mask: torch.Tensor) -> torch.Tensor:
    """x [B, C, T, H, W] with the frames marked in cond_mask [B, T] replaced by cond_latents."""
    return torch.where(cond_mask[:, None, :, None, None], cond_latents.to(x.dtype), x)
