"""CausalVAE: the trainable encoder/decoder pair (see the package docstring for the design)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from dit_video.encoders.causal_vae.config import CausalVAEConfig, check_video_size
from dit_video.encoders.causal_vae.layers import (
    CausalConv3d,
    DiagonalGaussian,
    Downsample,
    FrameGroupNorm,
    ResBlock,
    Upsample,
    causal_stream,
)
from dit_video.encoders.causal_vae.tiling import TilingConfig, temporal_chunks, tiled_map


class CausalVAE(nn.Module):
    """Trainable causal video VAE: video [B, 3, T, H, W] in [-1, 1] <-> raw latents [B, C, T', H', W']."""

    def __init__(self, config: CausalVAEConfig):
        super().__init__()
        self.config = config.validate()
        c, kt, g = config, config.temporal_kernel, config.norm_groups
        widths = [c.base_channels * m for m in c.channel_mult]
        n_levels = len(widths)
        # Temporal downsampling happens at the first (highest-resolution) levels: the fewer frames
        # the full-resolution convs see, the cheaper the model (as in CogVideoX's VAE).
        temporal = [i < c.num_temporal_downsamples for i in range(n_levels - 1)]
        spatial = [i < c.num_spatial_downsamples for i in range(n_levels - 1)]

        # Encoder
        pixel_channels = c.in_channels * c.patch_size**2
        self.enc_in = CausalConv3d(pixel_channels, widths[0], (kt, 3, 3))
        self.enc_levels = nn.ModuleList()
        w_prev = widths[0]
        for i, w in enumerate(widths):
            level = nn.Module()
            level.blocks = nn.Sequential(
                *[ResBlock(w_prev if j == 0 else w, w, kt, g) for j in range(c.num_res_blocks)]
            )
            level.down = (
                Downsample(w, spatial[i], temporal[i], c.shortcuts) if i < n_levels - 1 else nn.Identity()
            )
            self.enc_levels.append(level)
            w_prev = w
        self.enc_mid = ResBlock(widths[-1], widths[-1], kt, g)
        self.enc_norm = FrameGroupNorm(g, widths[-1])
        self.enc_out = CausalConv3d(widths[-1], 2 * c.latent_channels, (kt, 3, 3))
        # Start with a small posterior std (exp(0.5 * -6) = 0.05): at the default bias of 0 the
        # sampling noise (std 1) drowns the still-small means and the first few hundred steps
        # learn nothing but to shrink logvar.
        nn.init.constant_(self.enc_out.conv.bias[c.latent_channels :], -6.0)

        # Decoder (mirror image)
        self.dec_in = CausalConv3d(c.latent_channels, widths[-1], (kt, 3, 3))
        self.dec_mid = ResBlock(widths[-1], widths[-1], kt, g)
        self.dec_levels = nn.ModuleList()
        w_prev = widths[-1]
        for i in reversed(range(n_levels)):
            w = widths[i]
            level = nn.Module()
            level.blocks = nn.Sequential(
                *[ResBlock(w_prev if j == 0 else w, w, kt, g) for j in range(c.num_res_blocks)]
            )
            level.up = (
                Upsample(w, spatial[i - 1], temporal[i - 1], kt, c.shortcuts) if i > 0 else nn.Identity()
            )
            self.dec_levels.append(level)
            w_prev = w
        self.dec_norm = FrameGroupNorm(g, widths[0])
        self.dec_out = CausalConv3d(widths[0], pixel_channels, (kt, 3, 3))

    def encode(self, video: torch.Tensor, tiling: TilingConfig | None = None) -> DiagonalGaussian:
        """video [B, 3, T, H, W] in [-1, 1] -> posterior over raw latents [B, C, T', H', W'].

        `tiling` (optional): encode in spatial tiles and/or temporal chunks (TilingConfig)."""
        if video.ndim != 5 or video.shape[1] != self.config.in_channels:
            raise ValueError(
                f"video must be [B, {self.config.in_channels}, T, H, W], got {tuple(video.shape)}"
            )
        check_video_size(*video.shape[2:], self.config.temporal_factor, self.config.spatial_factor)
        if tiling is None or (tiling.tile_size is None and tiling.chunk_frames is None):
            return DiagonalGaussian(self._moments(video))
        tiling.validate(self.config)
        sf = self.config.spatial_factor

        def chunked(tile: torch.Tensor) -> torch.Tensor:  # [B, 3, T, h, w] -> [B, 2C, T', h/sf, w/sf]
            with causal_stream(self):
                return torch.cat([self._moments(tile[:, :, a:b]) for a, b in
                                  temporal_chunks(tile.shape[2], tiling.chunk_frames)], dim=2)

        if tiling.tile_size is None:
            return DiagonalGaussian(chunked(video))
        # Blend moments (mean and log-variance), not samples: the posterior stays one Gaussian.
        return DiagonalGaussian(tiled_map(video, chunked, tiling.tile_size, tiling.tile_overlap, 1 / sf))

    def _moments(self, video: torch.Tensor) -> torch.Tensor:
        """video [B, 3, T, H, W] -> posterior moments [B, 2 * latent_channels, T', H', W']."""
        p = self.config.patch_size
        x = rearrange(video, "b c t (h p) (w q) -> b (c p q) t h w", p=p, q=p)  # [B, 3*p*p, T, H/p, W/p]
        h = self.enc_in(x)  # [B, C0, T, H/p, W/p]
        for level in self.enc_levels:
            h = level.down(level.blocks(h))  # [B, Ci, T / 2, H / 2, W / 2] per downsample
        h = self.enc_mid(h)  # [B, C_last, T', H', W']
        moments = self.enc_out(F.silu(self.enc_norm(h)))  # [B, 2 * latent_channels, T', H', W']
        if self.config.shortcuts:
            # Mean of the latent += channel-group average of the features (DC-AE's space-to-channel
            # shortcut, here channel-to-channel): the latent starts as a summary of h, not noise.
            c = self.config.latent_channels
            short = h.float().unflatten(1, (c, -1)).mean(dim=2)  # [B, latent_channels, T', H', W']
            moments = torch.cat([moments[:, :c] + short, moments[:, c:]], dim=1)
        return moments

    def decode(self, z: torch.Tensor, tiling: TilingConfig | None = None) -> torch.Tensor:
        """raw latents [B, C, T', H', W'] -> video [B, 3, 1 + (T'-1)*tf, H'*sf, W'*sf] (about [-1, 1]).

        `tiling` (optional): decode in spatial tiles and/or temporal chunks (TilingConfig; its
        sizes are in pixels and frames, converted to latent units here)."""
        if tiling is None or (tiling.tile_size is None and tiling.chunk_frames is None):
            return self._decode(z)
        tiling.validate(self.config)
        tf, sf = self.config.temporal_factor, self.config.spatial_factor
        latent_chunk = None if tiling.chunk_frames is None else tiling.chunk_frames // tf

        def chunked(tile: torch.Tensor) -> torch.Tensor:  # [B, C, T', h, w] -> [B, 3, T, h*sf, w*sf]
            with causal_stream(self):
                return torch.cat([self._decode(tile[:, :, a:b]) for a, b in
                                  temporal_chunks(tile.shape[2], latent_chunk)], dim=2)

        if tiling.tile_size is None:
            return chunked(z)
        return tiled_map(z, chunked, tiling.tile_size // sf, tiling.tile_overlap // sf, sf).to(z.dtype)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        h = self.dec_in(z)  # [B, C_last, T', H', W']
        if self.config.shortcuts:
            h = h + z.repeat_interleave(h.shape[1] // z.shape[1], dim=1)  # mirror of the encoder's average
        h = self.dec_mid(h)
        for level in self.dec_levels:
            h = level.up(level.blocks(h))  # [B, Ci, 2T - 1, 2H, 2W] per upsample
        x = self.dec_out(F.silu(self.dec_norm(h)))  # [B, 3*p*p, T, H/p, W/p]
        p = self.config.patch_size
        return rearrange(x, "b (c p q) t h w -> b c t (h p) (w q)", p=p, q=p)  # [B, 3, T, H, W]

    def forward(
        self, video: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruct through a posterior sample: (recon [B, 3, T, H, W], posterior)."""
        posterior = self.encode(video)
        return self.decode(posterior.sample(generator)), posterior
