"""Building blocks of the causal VAE: causal 3D convs (and streaming them chunk by chunk), per-frame
GroupNorm, res-blocks, causal down/upsampling, and the diagonal Gaussian posterior."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


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
