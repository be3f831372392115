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
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from dit_video.encoders.base import clip_to_video

VAE_WEIGHTS_FILE = "vae.safetensors"
VAE_CONFIG_FILE = "vae.json"
VAE_FORMAT = "dit_video.causal_vae/1"  # bump when the state-dict layout changes
TRAIN_HINT = "python train.py +experiment=vae_demo"


@dataclass
class CausalVAEConfig:
    in_channels: int = 3  # pixel channels (RGB)
    latent_channels: int = 4  # C of the latents the DiT diffuses
    base_channels: int = 32  # width of the full-resolution level; level i has base * channel_mult[i]
    channel_mult: tuple[int, ...] = (
        1,
        2,
        2,
    )  # one entry per resolution level; len - 1 = log2(spatial_factor)
    num_res_blocks: int = 1  # res-blocks per level in the encoder (the decoder uses the same count)
    temporal_factor: int = 4  # frames per latent frame after the first (1, 2 or 4)
    spatial_factor: int = 4  # pixels per latent pixel along H and W (4, 8 or 16)
    patch_size: int = (
        1  # pixels folded into channels (space-to-depth) before the first conv: 2 cuts full-res cost ~4x
    )
    temporal_kernel: int = 3  # time extent of the causal 3D convs (1 = per-frame 2D convs)
    norm_groups: int = 8  # GroupNorm groups; must divide every level's width
    shortcuts: bool = True  # parameter-free paths around down/up-sampling and the latent bottleneck (DC-AE)

    def validate(self) -> CausalVAEConfig:
        """Raise ValueError naming the bad field and the fix; returns self for chaining."""
        if self.temporal_factor not in (1, 2, 4):
            raise ValueError(f"vae.temporal_factor={self.temporal_factor}: must be 1, 2 or 4")
        if self.spatial_factor not in (4, 8, 16):
            raise ValueError(f"vae.spatial_factor={self.spatial_factor}: must be 4, 8 or 16")
        if self.patch_size not in (1, 2, 4) or self.patch_size > self.spatial_factor:
            raise ValueError(
                f"vae.patch_size={self.patch_size}: must be 1, 2 or 4 and <= spatial_factor={self.spatial_factor}"
            )
        n_levels = max(self.num_spatial_downsamples, self.num_temporal_downsamples) + 1
        if len(self.channel_mult) != n_levels:
            raise ValueError(
                f"vae.channel_mult={tuple(self.channel_mult)} has {len(self.channel_mult)} levels, but "
                f"spatial_factor={self.spatial_factor}, patch_size={self.patch_size}, temporal_factor="
                f"{self.temporal_factor} need {n_levels}: one per downsample (log2(spatial_factor/patch_size) "
                f"spatial, log2(temporal_factor) temporal, done together from the first level), plus the first level"
            )
        for name in ("in_channels", "latent_channels", "base_channels", "num_res_blocks", "temporal_kernel"):
            if getattr(self, name) < 1:
                raise ValueError(f"CausalVAEConfig.{name}={getattr(self, name)}: must be >= 1")
        for mult in self.channel_mult:
            width = self.base_channels * mult
            if mult < 1 or width % self.norm_groups:
                raise ValueError(
                    f"CausalVAEConfig: level width base_channels*mult = {self.base_channels}*{mult} = {width} "
                    f"must be positive and divisible by norm_groups={self.norm_groups}"
                )
        if self.shortcuts and (self.base_channels * self.channel_mult[-1]) % self.latent_channels:
            raise ValueError(
                f"vae.shortcuts=True needs the last level width "
                f"{self.base_channels * self.channel_mult[-1]} to be a multiple of latent_channels="
                f"{self.latent_channels} (or set shortcuts=False)"
            )
        return self

    @property
    def num_temporal_downsamples(self) -> int:
        return int(math.log2(self.temporal_factor))

    @property
    def num_spatial_downsamples(self) -> int:
        return int(math.log2(self.spatial_factor // self.patch_size))

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> CausalVAEConfig:
        """Build from a JSON dict, rejecting unknown keys (a typo must not silently become a default)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"{source}: unknown CausalVAEConfig keys {unknown}; known keys are {sorted(known)}"
            )
        d = dict(d)
        if "channel_mult" in d:
            d["channel_mult"] = tuple(d["channel_mult"])
        return cls(**d).validate()


# Named presets. "demo" is the VAE the demo DiT runs on (32x32, 17-frame coloured-shape clips ->
# latents [4, 5, 8, 8]; 1.85M params, ~0.55 s per bf16-autocast step at batch 8 on 2 idle cores).
# Measured on shape clips (l2, lr 2e-3, kl_weight 1e-4, batch 8): val PSNR ~19 dB after 100 steps,
# see the encoders report for the full curve; "tiny" is for unit tests.
VAE_PRESETS: dict[str, CausalVAEConfig] = {
    "demo": CausalVAEConfig(
        latent_channels=4,
        base_channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        temporal_factor=4,
        spatial_factor=4,
    ),
    "tiny": CausalVAEConfig(
        latent_channels=4,
        base_channels=8,
        channel_mult=(1, 1, 2),
        num_res_blocks=1,
        temporal_factor=4,
        spatial_factor=4,
        norm_groups=4,
    ),
}


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


def check_video_size(
    num_frames: int, height: int, width: int, temporal_factor: int, spatial_factor: int
) -> None:
    """Raise ValueError naming the rule if a video of this size cannot be encoded."""
    if num_frames < 1 or (num_frames - 1) % temporal_factor:
        k = max(0, round((num_frames - 1) / temporal_factor))
        raise ValueError(
            f"num_frames={num_frames} must be 1 + k*{temporal_factor} for this VAE "
            f"(e.g. {1 + k * temporal_factor} or {1 + (k + 1) * temporal_factor})"
        )
    for name, size in (("height", height), ("width", width)):
        if size < 1 or size % spatial_factor:
            raise ValueError(
                f"{name}={size} must be a positive multiple of spatial_factor={spatial_factor} for this VAE"
            )


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


class CausalConv3d(nn.Module):
    """3D conv that pads time only at the front (replicating frame 0) and space symmetrically.

    Replicating frame 0 (instead of zeros) makes a 1-frame input look like a static video, which is
    what makes the latent of an image equal the latent of frame 0 of a video.

    Streaming (inside `causal_stream`): the conv keeps the last kt - stride_t frames it was given
    and prepends them to the next chunk instead of the replicated frame 0, so a clip fed chunk by
    chunk gives exactly the outputs of the whole clip (kt - stride_t, not kt - 1: a stride-2 conv's
    next window starts stride_t frames after the last one it used).
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: tuple[int, int, int] = (3, 3, 3),
        stride_t: int = 1,
        stride_s: int = 1,
    ):
        super().__init__()
        kt, kh, kw = kernel
        self.pad_t = kt - 1
        self.keep_t = kt - stride_t  # frames carried to the next chunk when streaming
        self.conv = nn.Conv3d(
            c_in, c_out, kernel, stride=(stride_t, stride_s, stride_s), padding=(0, kh // 2, kw // 2)
        )
        self.streaming = False  # set by causal_stream(); never saved (not a buffer)
        self.cache: torch.Tensor | None = None  # [B, C, keep_t, H, W]: the previous chunk's last frames

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cache is not None:
            x = torch.cat([self.cache, x], dim=2)  # [B, C, keep_t + T, H, W]
        elif self.pad_t:
            x = torch.cat(
                [x[:, :, :1].expand(-1, -1, self.pad_t, -1, -1), x], dim=2
            )  # [B, C, T + kt - 1, H, W]
        if self.streaming:
            self.cache = x[:, :, x.shape[2] - self.keep_t :]  # [B, C, keep_t, H, W]
        return self.conv(x)


@contextmanager
def causal_stream(module: nn.Module) -> Iterator[None]:
    """Within this block, every CausalConv3d in `module` carries its last frames from one call to
    the next: feed a clip as frame 0 alone, then chunks of k*temporal_factor frames, and the
    concatenated outputs equal those of the whole clip (see CausalVAE.encode/decode `tiling`)."""
    convs = [m for m in module.modules() if isinstance(m, CausalConv3d)]
    for conv in convs:
        conv.streaming, conv.cache = True, None
    try:
        yield
    finally:
        for conv in convs:
            conv.streaming, conv.cache = False, None


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm with statistics per frame (over C/G, H, W), so normalisation stays causal."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[2]
        x = rearrange(x, "b c t h w -> (b t) c h w")
        # fp32 statistics: bf16 variance over a few thousand values loses ~2 digits.
        x = F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps).to(x.dtype)
        return rearrange(x, "(b t) c h w -> b c t h w", t=t)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, kt: int, groups: int):
        super().__init__()
        self.norm1 = FrameGroupNorm(groups, c_in)
        self.conv1 = CausalConv3d(c_in, c_out, (kt, 3, 3))
        self.norm2 = FrameGroupNorm(groups, c_out)
        self.conv2 = CausalConv3d(c_out, c_out, (kt, 3, 3))
        self.skip = nn.Conv3d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    """2x down in H, W and/or in time, causally.

    Time: a stride-2 causal conv with kernel 3 and 2 replicated front frames; output frame j sees
    input frames 2j-2 .. 2j, so output 0 sees frame 0 alone and T = 1 + 2k maps to 1 + k.
    """

    def __init__(self, channels: int, spatial: bool, temporal: bool, shortcut: bool):
        super().__init__()
        self.spatial, self.temporal, self.shortcut = spatial, temporal, shortcut
        kt = 3 if temporal else 1
        self.conv = CausalConv3d(
            channels, channels, (kt, 3, 3), stride_t=2 if temporal else 1, stride_s=2 if spatial else 1
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.conv.cache is None  # this input starts with frame 0 (always, unless streaming)
        h = self.conv(x)  # [B, C, T', H', W']
        if not self.shortcut:
            return h
        # Causal average pooling as a parameter-free residual (DC-AE, Chen et al. 2024): the block
        # starts near a plain pooling, so information reaches the latent from step 0.
        if self.temporal:
            if first:
                x = torch.cat([x[:, :, :1], x], dim=2)  # [B, C, T + 1, H, W]: frame 0 pairs with itself
            x = (x[:, :, 0::2] + x[:, :, 1::2]) * 0.5  # [B, C, T', H, W]
        if self.spatial:
            x = F.avg_pool3d(x, (1, 2, 2))  # [B, C, T', H/2, W/2]
        return h + x


class Upsample(nn.Module):
    """2x up in H, W and/or in time, mirroring Downsample.

    Time: a causal conv predicts 2 frames per latent frame ("depth to time"); the first of the
    pair for latent frame 0 is dropped, so 1 + k frames become 1 + 2k and frame 0 decodes alone.
    """

    def __init__(self, channels: int, spatial: bool, temporal: bool, kt: int, shortcut: bool):
        super().__init__()
        self.spatial, self.temporal, self.shortcut = spatial, temporal, shortcut
        if temporal:
            self.time_conv = CausalConv3d(channels, 2 * channels, (kt, 1, 1))
        self.conv = CausalConv3d(channels, channels, (kt, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x
        if self.temporal:
            drop = 1 if self.time_conv.cache is None else 0  # only the chunk holding frame 0 drops one
            x = self.time_conv(x)  # [B, 2C, T, H, W]
            x = rearrange(x, "b (r c) t h w -> b c (t r) h w", r=2)[:, :, drop:]  # [B, C, 2T - 1, H, W]
            skip = skip.repeat_interleave(2, dim=2)[:, :, drop:]  # [B, C, 2T - 1, H, W] (causal nearest)
        if self.spatial:
            x = x.repeat_interleave(2, dim=3).repeat_interleave(2, dim=4)  # [B, C, T, 2H, 2W] (nearest)
            skip = skip.repeat_interleave(2, dim=3).repeat_interleave(2, dim=4)
        h = self.conv(x)
        # Nearest upsampling as a parameter-free residual, mirroring Downsample's pooling.
        return h + skip if self.shortcut else h


class DiagonalGaussian:
    """Posterior N(mean, diag(exp(logvar))) over latents [B, C, T', H', W']."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.float().chunk(2, dim=1)  # [B, C, T', H', W'] each
        # Clamp: exp(logvar) overflows fp32 past ~88 and a collapsed channel drives logvar to -inf.
        self.logvar = logvar.clamp(-30.0, 20.0)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + torch.exp(0.5 * self.logvar) * noise

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) averaged over latent elements, per sample: [B]."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).flatten(1).mean(dim=1)


# --------------------------------------------------------------------------------------------
# Tiles and chunks
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# The VAE
# --------------------------------------------------------------------------------------------


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


def vae_loss(
    model: CausalVAE,
    video: torch.Tensor,
    kl_weight: float,
    recon: str = "l1",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Beta-VAE objective on a batch of videos [B, 3, T, H, W] in [-1, 1].

    loss = mean |x - x_hat| (or squared) + kl_weight * KL, with KL averaged per latent element, so
    kl_weight does not change meaning with resolution or clip length. Logs (detached): recon, kl,
    psnr (dB, peak-to-peak 2 for the [-1, 1] range, on the clamped reconstruction).
    """
    _, recon_loss, kl, logs = vae_loss_terms(model, video, recon, generator)
    return recon_loss + kl_weight * kl, logs


def vae_loss_terms(
    model: CausalVAE, video: torch.Tensor, recon: str = "l1", generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The pieces of `vae_loss`: (reconstruction [B, 3, T, H, W], recon loss, KL, detached logs).
    Shared with VAELoss (vae_losses.py), which adds perceptual and adversarial terms."""
    if recon not in ("l1", "l2"):
        raise ValueError(f"vae_loss recon={recon!r}: must be 'l1' or 'l2'")
    video_hat, posterior = model(video, generator)
    diff = video_hat.float() - video.float()
    recon_loss = diff.abs().mean() if recon == "l1" else diff.pow(2).mean()
    kl = posterior.kl().mean()
    with torch.no_grad():
        mse = (video_hat.float().clamp(-1, 1) - video.float()).pow(2).mean()
        psnr = 10.0 * torch.log10(4.0 / mse.clamp_min(1e-10))
    return video_hat, recon_loss, kl, {"recon": recon_loss.detach(), "kl": kl.detach(), "psnr": psnr}


# --------------------------------------------------------------------------------------------
# Frozen adapter (the VideoAutoencoder protocol) and latent normalisation
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Save / load (safetensors only: never unpickle weights)
# --------------------------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _atomic_write(path: Path, write) -> None:
    # Write beside the target then rename: a reader (or a preempted job) never sees half a file.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_vae(
    out_dir: str | os.PathLike,
    vae: CausalVAE,
    config: CausalVAEConfig,
    shift: torch.Tensor,
    scale: torch.Tensor,
) -> Path:
    """Write out_dir/vae.safetensors (weights + latent shift/scale) and out_dir/vae.json (config).

    Returns the weights path. Both files are written atomically; the JSON goes last, so a
    directory with a vae.json always has matching weights.
    """
    from safetensors.torch import save_file

    if asdict(config) != asdict(vae.config):
        raise ValueError("save_vae: `config` differs from the config the VAE was built with (vae.config)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"vae.{k}": v.detach().cpu().contiguous() for k, v in vae.state_dict().items()}
    tensors["latent.shift"] = shift.detach().float().cpu().contiguous()
    tensors["latent.scale"] = scale.detach().float().cpu().contiguous()
    weights = out / VAE_WEIGHTS_FILE
    _atomic_write(weights, lambda p: save_file(tensors, str(p), metadata={"format": VAE_FORMAT}))
    meta = {"format": VAE_FORMAT, "config": asdict(config)}
    _atomic_write(out / VAE_CONFIG_FILE, lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
    return weights


def load_vae(
    path: str | os.PathLike, device: str | torch.device = "cpu", tiling: TilingConfig | None = None
) -> CausalVideoAutoencoder:
    """Load a frozen CausalVideoAutoencoder from a directory holding vae.safetensors + vae.json
    (or from the vae.safetensors path itself); `tiling` makes its encode/decode tiled/chunked."""
    from safetensors.torch import load_file

    p = Path(path)
    weights = p if p.suffix == ".safetensors" else p / VAE_WEIGHTS_FILE
    config_path = weights.with_name(VAE_CONFIG_FILE)
    for f in (weights, config_path):
        if not f.is_file():
            raise FileNotFoundError(f"VAE file {f} not found: train and save a VAE first with `{TRAIN_HINT}`")
    meta = json.loads(config_path.read_text())
    if meta.get("format") != VAE_FORMAT or "config" not in meta:
        raise ValueError(
            f"{config_path}: expected format {VAE_FORMAT!r} with a 'config' entry, got {meta.get('format')!r}"
        )
    config = CausalVAEConfig.from_dict(meta["config"], source=str(config_path))
    tensors = load_file(str(weights))
    try:
        shift, scale = tensors.pop("latent.shift"), tensors.pop("latent.scale")
    except KeyError as e:
        raise ValueError(
            f"{weights}: missing latent normalisation tensor {e}; re-save it with save_vae"
        ) from None
    state = {k.removeprefix("vae."): v for k, v in tensors.items()}
    vae = CausalVAE(config)
    missing, unexpected = vae.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{weights} does not match the config in {config_path}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return CausalVideoAutoencoder(vae, shift, scale, weights_path=str(weights), tiling=tiling).to(device)
