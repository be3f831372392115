"""DiT building blocks: timestep embedding, attention layers, the adaLN-Zero block, the final layer.

Conditioning follows PixArt-alpha's adaLN-single (also Open-Sora 1.3 and Wan): the timestep
embedding is projected ONCE per sample to six modulation vectors (shift/scale/gate for
self-attention and MLP, the DiT paper's adaLN-Zero terms), and each block adds its own learned
[6, D] table. Versus DiT's per-block Linear(D, 6D) this saves 6*D^2 parameters per block (27% of
an XL block with cross-attention) and its modulation costs one add per block. Text enters
through cross-attention. `modulation="adaln_zero"` gives each block the DiT paper's own
Linear(c -> 6D) instead; `conditioning="mmdit"` swaps these blocks for the joint-attention
ones in mmdit.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention import attention
from .fused import layer_norm_modulate, qkv_heads, rms_norm
from .rope import apply_rope

RopeTable = tuple[torch.Tensor, torch.Tensor]


def maybe_rope(x: torch.Tensor, rope: RopeTable | None) -> torch.Tensor:
    """apply_rope, or x unchanged when positions come from an absolute embedding (rope None)."""
    return x if rope is None else apply_rope(x, rope)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (Transformer / DDPM): t [B] float (already scaled) -> [B, dim] float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # [B, dim/2]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, dim]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x [B, N, D] * (1 + scale [B, 1, D]) + shift [B, 1, D]; '1 +' makes zero-init the identity."""
    return torch.addcmul(shift, x, 1 + scale)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim whose weight follows the input dtype.

    nn.RMSNorm with a float32 weight and bf16 input (autocast) falls off the fused kernel and warns.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fused.py: computed in float32 and rounded once; saves x and rstd only for backward.
        return rms_norm(x, self.weight, self.eps)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class TimestepEmbedder(nn.Module):
    """t [B] in [0, 1] -> conditioning vector c [B, D] (sinusoid of t * time_scale, then an MLP)."""

    def __init__(self, hidden_size: int, freq_dim: int, time_scale: float):
        super().__init__()
        self.freq_dim = freq_dim
        # Sinusoid periods were tuned for integer DDPM steps 0..1000, hence time_scale ~ 1000.
        self.time_scale = time_scale
        self.mlp = nn.Sequential(
            nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t * self.time_scale, self.freq_dim)  # [B, freq_dim]
        return self.mlp(freq.to(self.mlp[0].weight.dtype))  # [B, D]


class Mlp(nn.Module):
    """Linear -> GELU(tanh) -> Linear (the ViT/DiT MLP; also PixArt's caption projection)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # [B, N, out_dim]


def qk_norms(hidden_size: int, num_heads: int, qk_norm: bool, across_heads: bool, eps: float) -> tuple[nn.Module, nn.Module]:
    """(q_norm, k_norm): RMSNorm per head (weight [hd]), over all heads at once (weight [D]; Wan), or none."""
    if not qk_norm:
        return nn.Identity(), nn.Identity()
    dim = hidden_size if across_heads else hidden_size // num_heads
    return RMSNorm(dim, eps), RMSNorm(dim, eps)


class SelfAttention(nn.Module):
    """Multi-head self-attention over video tokens: fused QKV, QK RMSNorm (per head, or across heads), 3D RoPE."""

    def __init__(self, hidden_size: int, num_heads: int, qk_norm: bool, eps: float, backend: str,
                 across_heads: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.backend = backend
        self.qk_norm = qk_norm
        self.across_heads = across_heads
        # The attention function; dit_video/parallel.py swaps in a sequence-parallel one (Ulysses
        # or ring attention over a token-sharded sequence), so this file never sees a process group.
        self.attend = attention
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)  # one GEMM instead of three
        self.q_norm, self.k_norm = qk_norms(hidden_size, num_heads, qk_norm, across_heads, eps)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, rope: RopeTable | None, mask=None) -> torch.Tensor:
        """x [B, N, D] -> [B, N, D]; mask: None (full attention) or a PackedMask (packed clips)."""
        # Norm before RoPE (SD3/Flux order): RMSNorm bounds the logits, RoPE then only rotates.
        if self.qk_norm and not self.across_heads:  # head split, both norms and RoPE in one autograd Function (fused.py)
            q, k, v = qkv_heads(
                self.qkv(x), self.q_norm.weight, self.k_norm.weight, rope, self.q_norm.eps, self.num_heads
            )  # each [B, H, N, hd], token-major memory: SDPA's output then is too, and merging heads is a view
        elif self.across_heads:  # Wan: one RMS over all heads of a token, taken before the head split
            q, k, v = self.qkv(x).chunk(3, dim=-1)  # each [B, N, D]
            q, k, v = (rearrange(y, "b n (h d) -> b h n d", h=self.num_heads) for y in (self.q_norm(q), self.k_norm(k), v))
            q, k = maybe_rope(q, rope), maybe_rope(k, rope)  # each [B, H, N, hd]
        else:
            # One copy into head-major layout: RoPE and SDPA then run on contiguous memory (on
            # strided views they measured 2-3x slower on CPU).
            qkv = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
            q, k, v = qkv.contiguous().unbind(0)  # each [B, H, N, hd]
            q, k = maybe_rope(q, rope), maybe_rope(k, rope)
        out = self.attend(q, k, v, mask=mask, backend=self.backend)  # [B, H, N, hd]
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))  # [B, N, D]


class CrossAttention(nn.Module):
    """Video tokens attend to text tokens; padded text positions are masked out. No RoPE on text."""

    def __init__(self, hidden_size: int, num_heads: int, qk_norm: bool, eps: float, backend: str,
                 across_heads: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.backend = backend
        self.across_heads = across_heads
        self.q = nn.Linear(hidden_size, hidden_size)
        self.kv = nn.Linear(hidden_size, 2 * hidden_size)
        self.q_norm, self.k_norm = qk_norms(hidden_size, num_heads, qk_norm, across_heads, eps)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None) -> torch.Tensor:
        """x [B, N, D], text [B, L, D], text_mask bool [B, 1, 1, L] (True = real token) or a
        PackedMask (packed clips and captions) -> [B, N, D]."""
        H = self.num_heads
        if self.across_heads:  # Wan: one RMS over all heads of a token, taken before the head split
            k, v = self.kv(text).chunk(2, dim=-1)  # each [B, L, D]
            q = rearrange(self.q_norm(self.q(x)), "b n (h d) -> b h n d", h=H)  # [B, H, N, hd]
            k, v = (rearrange(y, "b l (h d) -> b h l d", h=H) for y in (self.k_norm(k), v))  # each [B, H, L, hd]
        else:
            # A view of token-major memory: the norm keeps its layout, SDPA's output follows q's, so merging
            # the heads below is a view (no copy, and proj saves no second copy of SDPA's saved output).
            q = rearrange(self.q(x), "b n (h d) -> b h n d", h=H)  # [B, H, N, hd]
            kv = rearrange(self.kv(text), "b l (two h d) -> two b h l d", two=2, h=H)
            k, v = kv.contiguous().unbind(0)  # each [B, H, L, hd]
            q, k = self.q_norm(q), self.k_norm(k)
        out = attention(q, k, v, mask=text_mask, backend=self.backend)  # [B, H, N, hd]
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))  # [B, N, D]


class DiTBlock(nn.Module):
    """One DiT block: adaLN-Zero self-attention, ungated cross-attention to text, adaLN-Zero MLP.

    Cross-attention has its own (affine) LayerNorm (or none: cross_attn_norm=False) and no
    timestep gate, as in PixArt-alpha and Wan: the caption matters at every noise level, a t-gate
    could learn to shut it off (weakening classifier-free guidance), and the t-modulated branches
    around it already adapt to t. Its output projection is zero-initialised, so the whole block is
    the identity at init. qk_norm_across_heads: Wan's QK RMSNorm over all heads (see qk_norms).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float,
        qk_norm: bool,
        eps: float,
        backend: str,
        adaln_single: bool = True,
        qk_norm_across_heads: bool = False,
        cross_attn_norm: bool = True,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=eps, elementwise_affine=False)  # affine comes from adaLN
        self.attn = SelfAttention(hidden_size, num_heads, qk_norm, eps, backend, qk_norm_across_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(hidden_size, num_heads, qk_norm, eps, backend, qk_norm_across_heads)
        self.norm3 = nn.LayerNorm(hidden_size, eps=eps, elementwise_affine=False)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), hidden_size)
        if adaln_single:
            # adaLN-single: this block's learned offsets to the shared timestep modulation (PixArt's
            # scale_shift_table). Zero init: gates are 0, so the block starts as the identity.
            self.modulation = nn.Parameter(torch.zeros(6, hidden_size))
        else:
            # adaLN-Zero (DiT): this block's own projection of c, zero-initialised like the table.
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(
        self,
        x: torch.Tensor,
        t_mod: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None,
        rope: RopeTable | None,
        *,
        self_mask=None,
    ) -> torch.Tensor:
        """x [B, N, D], t_mod [B, 6, D] (or [B, N, 6, D]: per token, as for packed clips of different t;
        with adaLN-Zero it is c [B, D] or [B, N, D]), text [B, L, D], text_mask bool [B, 1, 1, L],
        rope ([N, hd], [N, hd]) or None (absolute positions); self_mask None or a
        PackedMask for self-attention (dit_video/model/packing.py)."""
        if hasattr(self, "modulation"):
            if t_mod.dim() == 3:
                t_mod = t_mod[:, None]  # [B, 1, 6, D]: one modulation for every token of a sample
            mod = self.modulation + t_mod  # [B, 1 or N, 6, D]
        else:  # adaLN-Zero: t_mod is c [B, D] (or [B, N, D] per token)
            mod = self.adaLN_modulation(t_mod).unflatten(-1, (6, -1))  # [B, 6, D] or [B, N, 6, D]
            if mod.dim() == 3:
                mod = mod[:, None]  # [B, 1, 6, D]
        shift_sa, scale_sa, gate_sa, shift_mlp, scale_mlp, gate_mlp = mod.unbind(-2)  # each [B, 1 or N, D]
        # layer_norm_modulate == modulate(norm(x), shift, scale), fused (fused.py); norm1/norm3 hold eps.
        x = torch.addcmul(x, gate_sa, self.attn(layer_norm_modulate(x, shift_sa, scale_sa, self.norm1.eps), rope, self_mask))
        x = x + self.cross_attn(self.norm2(x), text, text_mask)
        x = torch.addcmul(x, gate_mlp, self.mlp(layer_norm_modulate(x, shift_mlp, scale_mlp, self.norm3.eps)))
        return x  # [B, N, D]


class FinalLayer(nn.Module):
    """adaLN (shift, scale from c) + Linear to patch values; both zero-initialised (DiT).

    modulation="linear": shift, scale = Linear(SiLU(c)) (DiT). "table": shift, scale = a learned
    [2, D] table + c, with no projection (Wan's head; its table is zero-initialised here).
    """

    def __init__(self, hidden_size: int, patch_out_dim: int, eps: float, modulation: str = "linear"):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, eps=eps, elementwise_affine=False)
        if modulation == "table":
            self.modulation = nn.Parameter(torch.zeros(2, hidden_size))
        else:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.linear = nn.Linear(hidden_size, patch_out_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x [B, N, D], c [B, D] (or [B, N, D] per token, for packed clips) -> [B, N, C_out*pt*ph*pw]."""
        if hasattr(self, "modulation"):
            mod = (self.modulation + c[..., None, :]).flatten(-2)  # [B, 2D] or [B, N, 2D]
        else:
            mod = self.adaLN_modulation(c)  # [B, 2D] or [B, N, 2D]
        if mod.dim() == 2:
            mod = mod[:, None]  # [B, 1, 2D]: one modulation for every token of a sample
        shift, scale = mod.chunk(2, dim=-1)  # each [B, 1 or N, D]
        return self.linear(layer_norm_modulate(x, shift, scale, self.norm.eps))  # [B, N, patch_out_dim]
