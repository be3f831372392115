"""Spacetime patches: latents [B, C, T, H, W] <-> tokens [B, N, C*pt*ph*pw] (Sora's "spacetime patches").

Tokens are ordered (t, h, w) raster-wise, and the values inside a token are ordered (c, pt, ph, pw),
the same order as a Conv3d(kernel=stride=patch) weight flattened to [D, C*pt*ph*pw], so
conv-based checkpoints load into PatchEmbed with a `.view`.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn


def patchify(x: torch.Tensor, patch_size: tuple[int, int, int]) -> torch.Tensor:
    """latents [B, C, T, H, W] -> tokens [B, T'*H'*W', C*pt*ph*pw]; T, H, W must be divisible by the patch."""
    pt, ph, pw = patch_size
    return rearrange(x, "b c (t pt) (h ph) (w pw) -> b (t h w) (c pt ph pw)", pt=pt, ph=ph, pw=pw)


def unpatchify(
    tokens: torch.Tensor, patch_size: tuple[int, int, int], grid: tuple[int, int, int], channels: int
) -> torch.Tensor:
    """tokens [B, T'*H'*W', C*pt*ph*pw] -> latents [B, C, T'*pt, H'*ph, W'*pw] (the inverse of patchify)."""
    pt, ph, pw = patch_size
    t, h, w = grid
    return rearrange(
        tokens,
        "b (t h w) (c pt ph pw) -> b c (t pt) (h ph) (w pw)",
        t=t,
        h=h,
        w=w,
        c=channels,
        pt=pt,
        ph=ph,
        pw=pw,
    )


class PatchEmbed(nn.Module):
    """Latents [B, C, T, H, W] -> patch tokens [B, N, D] by a Linear on the patchified values.

    Equivalent to Conv3d(C, D, kernel=stride=patch) but faster on CPU: one rearrange copy plus
    one MKL GEMM, where Conv3d goes through a slower conv path (measured forward+backward, one
    thread: 0.45 vs 1.09 ms at demo size, 33 vs 49 ms at [2, 16, 8, 32, 32] -> 1152).
    """

    def __init__(self, in_channels: int, hidden_size: int, patch_size: tuple[int, int, int]):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Linear(in_channels * math.prod(patch_size), hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(patchify(x, self.patch_size))  # [B, N, D]
