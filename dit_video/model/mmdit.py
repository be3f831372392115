"""MMDiT blocks: text and video tokens in one joint attention (SD3, Flux, HunyuanVideo, Open-Sora 2.0).

Instead of cross-attention, the text tokens run through the transformer next to the video tokens:

- DualStreamBlock (SD3's MM-DiT block): text and video keep their own weights (adaLN, QKV,
  QK-norm, output projection, MLP) and meet only inside one attention over the concatenation
  [text, video].
- SingleStreamBlock (Flux / HunyuanVideo's "single stream"): one set of weights for the joint
  sequence, with attention and MLP computed in parallel from one fused input projection
  (ViT-22B's parallel block): linear1 -> (qkv, MLP hidden), linear2 over [attention, GELU(hidden)].
  The fused GEMMs are why Flux and HunyuanVideo use it for their later, cheaper-per-parameter half.

Both take and return (video tokens, text tokens) separately, so one ModuleList holds both kinds
and checkpointing / FSDP / compile wrap each from outside (dit_video/parallel.py). RoPE rotates
only the video tokens (text has no spatial position); padded text tokens are masked as keys, so
nothing real ever reads them. The text stream is modulated by the same c as the video stream.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention import attention
from .blocks import Mlp, RMSNorm, RopeTable, maybe_rope, modulate


class AdaLN(nn.Module):
    """One block's (or stream's) n modulation vectors (shift/scale/gate ...) under either scheme.

    adaln_single: cond is the shared t_block output [B, 6, D]; this adds a learned [n, D] table to
    its first n rows (PixArt-alpha). adaln_zero: cond is c [B, D] and this owns SiLU + Linear(D, nD)
    (DiT). Both are zero-initialised by DiT.initialize_weights, so every gate starts at 0.
    """

    def __init__(self, hidden_size: int, n: int, single: bool):
        super().__init__()
        self.n = n
        if single:
            self.table = nn.Parameter(torch.zeros(n, hidden_size))
        else:
            self.proj = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, n * hidden_size))

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        """cond [B, 6, D] (adaln_single) or [B, D] (adaln_zero) -> [B, n, D]."""
        if hasattr(self, "table"):
            return self.table + cond[:, : self.n]  # [B, n, D]
        return self.proj(cond).unflatten(1, (self.n, -1))  # [B, n, D]

    def zero_(self) -> None:
        if hasattr(self, "table"):
            nn.init.zeros_(self.table)
        else:
            nn.init.zeros_(self.proj[1].weight)
            nn.init.zeros_(self.proj[1].bias)


class Stream(nn.Module):
    """The per-modality weights of a dual-stream block: adaLN, QKV + QK-norm, output projection, MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: bool, eps: float, single: bool):
        super().__init__()
        self.num_heads = num_heads
        head_dim = hidden_size // num_heads
        self.adaln = AdaLN(hidden_size, 6, single)
        self.norm1 = nn.LayerNorm(hidden_size, eps=eps, elementwise_affine=False)  # affine comes from adaLN
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.q_norm = RMSNorm(head_dim, eps) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(head_dim, eps) if qk_norm else nn.Identity()
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size, eps=eps, elementwise_affine=False)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), hidden_size)

    def qkv_heads(self, x: torch.Tensor, mod: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, n, D], mod [B, 6, D] -> q, k (normed), v, each [B, H, n, hd]."""
        shift, scale = mod[:, 0:1], mod[:, 1:2]  # each [B, 1, D]
        qkv = rearrange(self.qkv(modulate(self.norm1(x), shift, scale)), "b n (three h d) -> three b h n d",
                        three=3, h=self.num_heads)
        q, k, v = qkv.contiguous().unbind(0)  # each [B, H, n, hd]
        return self.q_norm(q), self.k_norm(k), v

    def after_attention(self, x: torch.Tensor, attn: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        """x [B, n, D] + gated projection of its attention output attn [B, n, D], then the gated MLP."""
        gate_sa, shift_mlp, scale_mlp, gate_mlp = mod[:, 2:3], mod[:, 3:4], mod[:, 4:5], mod[:, 5:6]  # [B, 1, D]
        x = torch.addcmul(x, gate_sa, self.proj(attn))
        return torch.addcmul(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))  # [B, n, D]


class DualStreamBlock(nn.Module):
    """Separate text/video weights, one joint attention over [text, video] (SD3 MM-DiT)."""

    def __init__(
        self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: bool, eps: float, backend: str,
        adaln_single: bool = True,
    ):
        super().__init__()
        self.backend = backend
        self.video = Stream(hidden_size, num_heads, mlp_ratio, qk_norm, eps, adaln_single)
        self.text = Stream(hidden_size, num_heads, mlp_ratio, qk_norm, eps, adaln_single)

    def forward(
        self,
        x: torch.Tensor,
        cond: torch.Tensor,
        text: torch.Tensor,
        joint_mask: torch.Tensor | None,
        rope: RopeTable | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, N, D] video, cond [B, 6, D] (adaln_single) or c [B, D] (adaln_zero), text [B, L, D],
        joint_mask bool [B, 1, 1, L+N] (True = real key) or None, rope ([N, hd], [N, hd]) or None
        -> (x [B, N, D], text [B, L, D])."""
        L = text.shape[1]
        mod_v, mod_t = self.video.adaln(cond), self.text.adaln(cond)  # each [B, 6, D]
        qv, kv, vv = self.video.qkv_heads(x, mod_v)  # each [B, H, N, hd]
        qt, kt, vt = self.text.qkv_heads(text, mod_t)  # each [B, H, L, hd]
        q = torch.cat([qt, maybe_rope(qv, rope)], dim=2)  # [B, H, L+N, hd]
        k = torch.cat([kt, maybe_rope(kv, rope)], dim=2)  # [B, H, L+N, hd]
        v = torch.cat([vt, vv], dim=2)  # [B, H, L+N, hd]
        out = rearrange(attention(q, k, v, mask=joint_mask, backend=self.backend), "b h n d -> b n (h d)")
        text = self.text.after_attention(text, out[:, :L], mod_t)  # [B, L, D]
        x = self.video.after_attention(x, out[:, L:], mod_v)  # [B, N, D]
        return x, text


class SingleStreamBlock(nn.Module):
    """Shared weights over the joint [text, video] sequence; attention and MLP in parallel (Flux)."""

    def __init__(
        self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: bool, eps: float, backend: str,
        adaln_single: bool = True,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.backend = backend
        self.mlp_hidden = int(hidden_size * mlp_ratio)
        head_dim = hidden_size // num_heads
        self.adaln = AdaLN(hidden_size, 3, adaln_single)  # shift, scale, gate: one norm, one residual
        self.norm = nn.LayerNorm(hidden_size, eps=eps, elementwise_affine=False)
        self.linear1 = nn.Linear(hidden_size, 3 * hidden_size + self.mlp_hidden)  # qkv and MLP-in in one GEMM
        self.q_norm = RMSNorm(head_dim, eps) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(head_dim, eps) if qk_norm else nn.Identity()
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden, hidden_size)  # attention-out and MLP-out in one GEMM

    def forward(
        self,
        x: torch.Tensor,
        cond: torch.Tensor,
        text: torch.Tensor,
        joint_mask: torch.Tensor | None,
        rope: RopeTable | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Same arguments and results as DualStreamBlock.forward."""
        L, D = text.shape[1], x.shape[2]
        shift, scale, gate = self.adaln(cond).chunk(3, dim=1)  # each [B, 1, D]
        joint = torch.cat([text, x], dim=1)  # [B, L+N, D]
        qkv, hidden = self.linear1(modulate(self.norm(joint), shift, scale)).split([3 * D, self.mlp_hidden], dim=-1)
        q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.num_heads).contiguous().unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)  # each [B, H, L+N, hd]
        q = torch.cat([q[:, :, :L], maybe_rope(q[:, :, L:], rope)], dim=2)  # RoPE on the video part only
        k = torch.cat([k[:, :, :L], maybe_rope(k[:, :, L:], rope)], dim=2)
        attn = rearrange(attention(q, k, v, mask=joint_mask, backend=self.backend), "b h n d -> b n (h d)")
        out = self.linear2(torch.cat([attn, F.gelu(hidden, approximate="tanh")], dim=-1))  # [B, L+N, D]
        joint = torch.addcmul(joint, gate, out)  # [B, L+N, D]
        return joint[:, L:], joint[:, :L]  # video [B, N, D], text [B, L, D]
