"""Tiled and chunked encode/decode: where the tiles and chunks go and how tile outputs are blended."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dit_video.encoders.causal_vae.config import CausalVAEConfig


@dataclass
class TilingConfig:
    """Tiled / chunked encode and decode, so long or large videos fit in memory (off by default).

    Temporal chunks are exact: frame 0 alone, then `chunk_frames` frames at a time, with every
    causal conv carrying its last frames across chunks (`causal_stream`). Spatial tiles are not:
    each tile's convs see zero padding at its border instead of the neighbouring pixels, so tiles
    overlap by `tile_overlap` pixels and are blended with linear ramps there (on the latent side
    when encoding, the pixel side when decoding), which hides the seams.
    """

    tile_size: int | None = None  # pixel edge of a square spatial tile (multiple of spatial_factor); None = whole frames
    tile_overlap: int = 8  # pixels two neighbouring tiles share (multiple of spatial_factor, < tile_size)
    chunk_frames: int | None = None  # frames per temporal chunk after frame 0 (multiple of temporal_factor); None = whole clip

    def validate(self, vae: CausalVAEConfig) -> TilingConfig:
        """Raise ValueError naming the bad vae.tiling field and the fix; returns self."""
        sf, tf = vae.spatial_factor, vae.temporal_factor
        if self.tile_size is not None:
            if self.tile_size < sf or self.tile_size % sf:
                raise ValueError(f"vae.tiling.tile_size={self.tile_size}: must be a positive multiple of "
                                 f"spatial_factor={sf} (or null for whole frames)")
            if self.tile_overlap < 0 or self.tile_overlap % sf or self.tile_overlap >= self.tile_size:
                raise ValueError(f"vae.tiling.tile_overlap={self.tile_overlap}: must be a multiple of "
                                 f"spatial_factor={sf} in [0, tile_size={self.tile_size})")
        if self.chunk_frames is not None and (self.chunk_frames < tf or self.chunk_frames % tf):
            raise ValueError(f"vae.tiling.chunk_frames={self.chunk_frames}: must be a positive multiple of "
                             f"temporal_factor={tf} (or null for the whole clip)")
        return self


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of `tile` with stride tile - overlap covering [0, size); the last
    tile is moved back to end at `size`, so every tile is full-sized (one tile if size <= tile)."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, tile - overlap))
    return starts + [size - tile]


def blend_ramp(length: int, overlap: int) -> torch.Tensor:
    """1-D blending weights [length]: rising linearly over the first `overlap` positions, falling
    over the last, 1 between; strictly positive, so a position covered by one tile keeps it."""
    i = torch.arange(length, dtype=torch.float32)
    return (torch.minimum(i + 1, length - i) / (overlap + 1)).clamp(max=1.0)


def tiled_map(
    x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], tile: int, overlap: int, scale: float
) -> torch.Tensor:
    """Apply `fn` to overlapping square spatial tiles of x [B, C, T, H, W] and blend the outputs.

    `fn` maps a tile [B, C, T, tile, tile] to [B, C', T', tile*scale, tile*scale]; outputs are
    averaged where tiles overlap, weighted by linear ramps over the overlap (tile*scale and
    overlap*scale on the output side). Returns [B, C', T', H*scale, W*scale] in float32.
    """
    H, W = x.shape[-2:]
    th, tw = min(tile, H), min(tile, W)
    out = weight = None
    for y0 in tile_starts(H, th, overlap):
        for x0 in tile_starts(W, tw, overlap):
            y = fn(x[..., y0 : y0 + th, x0 : x0 + tw]).float()  # [B, C', T', th*scale, tw*scale]
            oh, ow = y.shape[-2:]
            if out is None:
                out = y.new_zeros(*y.shape[:-2], round(H * scale), round(W * scale))  # [B, C', T', H', W']
                weight = y.new_zeros(round(H * scale), round(W * scale))  # [H', W']
            ov = round(overlap * scale)
            w = blend_ramp(oh, ov).to(y.device)[:, None] * blend_ramp(ow, ov).to(y.device)[None, :]  # [oh, ow]
            oy, ox = round(y0 * scale), round(x0 * scale)
            out[..., oy : oy + oh, ox : ox + ow] += y * w
            weight[oy : oy + oh, ox : ox + ow] += w
    return out / weight


def temporal_chunks(num_frames: int, chunk: int | None) -> list[tuple[int, int]]:
    """(start, end) frame ranges: frame 0 alone, then `chunk` frames at a time (None: one range)."""
    if chunk is None or num_frames <= 1:
        return [(0, num_frames)]
    return [(0, 1)] + [(s, min(s + chunk, num_frames)) for s in range(1, num_frames, chunk)]
