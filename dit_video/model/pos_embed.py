"""Absolute position embeddings added to the video tokens: the alternatives to 3D RoPE.

- sincos: fixed 3D sine-cosine (the ViT/MAE 2D recipe with a third axis, as in Latte and
  Open-Sora 1.0): the width D is split over (t, h, w) and each chunk holds sin/cos of that axis'
  position at geometric frequencies. Computed per grid, so any video size works.
- learned: one trained vector per (t, h, w) position of a `max_grid` table (ViT); a smaller grid
  uses the table's top-left-front corner, a larger one is an error (nothing was learned there).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import check_max_grid


def sincos_axes_dim(dim: int) -> tuple[int, int, int]:
    """(dt, dh, dw) split of the width for sincos: 3/8 to each spatial axis, the rest to time (all even)."""
    d_spatial = 2 * (3 * dim // 16)
    return (dim - 2 * d_spatial, d_spatial, d_spatial)


def sincos_1d(positions: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """positions [N] float -> [N, dim] float32: [sin(p * f_i), cos(p * f_i)] with f_i = max_period^(-2i/dim)."""
    freqs = max_period ** (-torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim)  # [dim/2]
    args = positions.float()[:, None] * freqs  # [N, dim/2]
    return torch.cat([args.sin(), args.cos()], dim=-1)  # [N, dim]


def sincos_3d(grid: tuple[int, int, int], dim: int, device: torch.device | None = None) -> torch.Tensor:
    """Fixed position embedding [T'*H'*W', dim] float32 for the raster-ordered (t, h, w) token grid."""
    axes = [torch.arange(n, dtype=torch.float32, device=device) for n in grid]
    positions = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)  # [N, 3]
    chunks = [sincos_1d(positions[:, a], d) for a, d in enumerate(sincos_axes_dim(dim)) if d > 0]
    return torch.cat(chunks, dim=-1)  # [N, dim]


class LearnedPosEmbed(nn.Module):
    """A trained [T'max, H'max, W'max, D] table; forward(grid) -> [T'*H'*W', D] for a grid that fits."""

    def __init__(self, max_grid: tuple[int, int, int], dim: int):
        super().__init__()
        self.max_grid = tuple(max_grid)
        self.table = nn.Parameter(torch.empty(*self.max_grid, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.table, std=0.02)  # ViT's init for its position embedding

    def forward(self, grid: tuple[int, int, int]) -> torch.Tensor:
        check_max_grid(grid, self.max_grid)
        t, h, w = grid
        return self.table[:t, :h, :w].reshape(t * h * w, -1)  # [N, D]
