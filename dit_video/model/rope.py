"""3D rotary position embedding (RoFormer, Su et al. 2021) over the (t, h, w) token grid.

The head dim is split into three chunks (dt, dh, dw); chunk a rotates by angles pos_a * freq_a,
so <rope(q, i), rope(k, j)> depends only on the offset i - j along each axis (HunyuanVideo,
Open-Sora 2.0 and Wan use the same split). Layout is "rotate-half": channel c is paired with
channel c + head_dim/2, and the angle table is [angles, angles] along the last dim.
"""

from __future__ import annotations

import torch


def rope_angles(positions: torch.Tensor, axes_dim: tuple[int, int, int], theta: float) -> torch.Tensor:
    """positions [N, 3] float (t, h, w) -> rotation angles [N, head_dim/2] in radians, float32."""
    angles = []
    for axis, dim in enumerate(axes_dim):
        # freq_i = theta^(-2i/dim), i < dim/2: the RoFormer frequencies, one set per axis.
        exponent = torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim
        freqs = theta ** (-exponent)  # [dim/2]
        angles.append(positions[:, axis, None].float() * freqs)  # [N, dim/2]
    return torch.cat(angles, dim=-1)  # [N, head_dim/2]


def rope_table(
    grid: tuple[int, int, int],
    axes_dim: tuple[int, int, int],
    theta: float,
    device: torch.device | None = None,
    offset: tuple[int, int, int] = (0, 0, 0),
    scale: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each [N, head_dim] float32, for the raster-ordered (T', H', W') token grid.

    `offset` shifts every position (used to test that scores only see relative positions);
    positions are then divided by `scale` per axis (position interpolation for longer/larger videos).
    """
    axes = [
        (torch.arange(n, dtype=torch.float32, device=device) + o) / s
        for n, o, s in zip(grid, offset, scale, strict=True)
    ]
    positions = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)  # [N, 3]
    angles = rope_angles(positions, axes_dim, theta)  # [N, head_dim/2]
    angles = torch.cat([angles, angles], dim=-1)  # [N, head_dim] rotate-half layout
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dim: a 90-degree turn of every channel pair."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, table: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """q or k [B, heads, N, head_dim] -> same shape, rotated by the (cos, sin) table [N, head_dim].

    Computed in x's dtype (the table is cast to it): under bf16 autocast the angles lose a few
    bits, but q and k then feed a bf16 attention anyway, and a float32 detour would cost two copies.
    """
    cos, sin = (c.to(x.dtype) for c in table)
    return x * cos + rotate_half(x) * sin


def packed_rope_table(
    grids,
    axes_dim: tuple[int, int, int],
    theta: float,
    device: torch.device | None = None,
    scale: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each [ΣN, head_dim], for clips packed one after another (NaViT).

    grids: the (T', H', W') token grid of each clip in packing order. Every clip's positions
    start at 0, as if it ran alone, so a packed clip sees exactly the rotations of its solo run.
    """
    tables = [rope_table(tuple(g), axes_dim, theta, device=device, scale=scale) for g in grids]
    return torch.cat([cos for cos, _ in tables]), torch.cat([sin for _, sin in tables])  # [ΣN, hd] each
