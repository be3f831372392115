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

Packed clips (NaViT, DiT.forward_packed): the streams are [1, ΣL, D] (captions without padding) and
[1, ΣN, D], c comes per token, and a JointPacking reorders the joint sequence into one [text_i,
video_i] segment per clip, so a block-diagonal PackedMask (flash-attn: varlen) gives every clip
exactly its own joint attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention import PackedMask, attention
from .blocks import Mlp, RMSNorm, RopeTable, maybe_rope, modulate


class AdaLN(nn.Module):
    """One block's (or stream's) n modulation vectors (shift/scale/gate ...) under either scheme.

    adaln_single: cond is the shared t_block output [B, 6, D]; this adds a learned [n, D] table to
    its first n rows (PixArt-alpha). adaln_zero: cond is c [B, D] and this owns SiLU + Linear(D, nD)
    (DiT). Both are zero-initialised by DiT.initialize_weights, so every gate starts at 0.
    Either cond may carry a token axis ([B, M, 6, D] or [B, M, D]): packed clips of different t
    modulate each token with its own clip's c.
    """

    def __init__(self, hidden_size: int, n: int, single: bool):
        super().__init__()
        self.n = n
        if single:
            self.table = nn.Parameter(torch.zeros(n, hidden_size))
        else:
            self.proj = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, n * hidden_size))

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        """cond [B, 6, D] (adaln_single) or [B, D] (adaln_zero) -> [B, 1, n, D], one modulation for
        every token; per token, cond [B, M, 6, D] or [B, M, D] -> [B, M, n, D]."""
        if hasattr(self, "table"):
            if cond.dim() == 3:
                cond = cond[:, None]  # [B, 1, 6, D]
            return self.table + cond[..., : self.n, :]  # [B, 1 or M, n, D]
        mod = self.proj(cond).unflatten(-1, (self.n, -1))  # [B, n, D] or [B, M, n, D]
        return mod[:, None] if cond.dim() == 2 else mod  # [B, 1 or M, n, D]

    def per_token(self, cond: torch.Tensor) -> bool:
        """Whether cond carries a token axis ([B, M, 6, D] / [B, M, D]) rather than one row per sample."""
        return cond.dim() == (4 if hasattr(self, "table") else 3)

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
        """x [B, n, D], mod [B, 1 or n, 6, D] (AdaLN) -> q, k (normed), v, each [B, H, n, hd]."""
        shift, scale = mod[:, :, 0], mod[:, :, 1]  # each [B, 1 or n, D]
        qkv = rearrange(self.qkv(modulate(self.norm1(x), shift, scale)), "b n (three h d) -> three b h n d",
                        three=3, h=self.num_heads)
        q, k, v = qkv.contiguous().unbind(0)  # each [B, H, n, hd]
        return self.q_norm(q), self.k_norm(k), v

    def after_attention(self, x: torch.Tensor, attn: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        """x [B, n, D] + gated projection of its attention output attn [B, n, D], then the gated MLP."""
        gate_sa, shift_mlp, scale_mlp, gate_mlp = mod[:, :, 2:].unbind(2)  # each [B, 1 or n, D]
        x = torch.addcmul(x, gate_sa, self.proj(attn))
        return torch.addcmul(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))  # [B, n, D]


class JointPacking:
    """Packed clips in joint attention: clip i's queries and keys are exactly [text_i, video_i].

    The blocks concatenate the packed streams as [all text, all video] (ΣL + ΣN tokens); `order`
    gathers that into clip-contiguous segments [text_0, video_0, text_1, video_1, ...], so one
    block-diagonal PackedMask covers the joint attention (flash-attn runs it as varlen with
    cu_seqlens, no ΣS x ΣS mask), and `inverse` puts the output back. Built once per forward.
    """

    def __init__(self, text_lens: torch.Tensor, video_lens: torch.Tensor, sizes: tuple[int, int] | None = None,
                 max_seqlen: int | None = None):
        """text_lens [B] real caption tokens, video_lens [B] video tokens of each clip; sizes (ΣL, ΣN)
        and max_seqlen (a bound of L_i + N_i) when the caller knows them on the host (else read back)."""
        clips = torch.arange(len(video_lens), device=video_lens.device)  # [B]
        n_text, n_video = sizes or (None, None)
        # Sort key 2 * clip (+ 1 for video): a stable sort keeps the tokens' order within each part.
        key = torch.cat([2 * clips.repeat_interleave(text_lens, output_size=n_text),
                         2 * clips.repeat_interleave(video_lens, output_size=n_video) + 1])  # [ΣL+ΣN]
        self.order = key.argsort(stable=True)  # [ΣL+ΣN] joint position of each segment-ordered token
        self.inverse = self.order.argsort()  # [ΣL+ΣN]
        bounds = None if max_seqlen is None else (max_seqlen, max_seqlen)
        self.mask = PackedMask(text_lens + video_lens, text_lens + video_lens, bounds)  # one segment per clip


def joint_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | JointPacking | None, backend: str
) -> torch.Tensor:
    """q, k, v [B, H, L+N, hd] in [text, video] order; mask bool [B, 1, 1, L+N] (True = real key),
    None, or a JointPacking (B = 1, packed clips) -> [B, L+N, H*hd] in the same order."""
    if isinstance(mask, JointPacking):
        q, k, v = (x[:, :, mask.order] for x in (q, k, v))  # [1, H, ΣL+ΣN, hd] as [text_i, video_i] segments
        out = attention(q, k, v, mask=mask.mask, backend=backend)  # [1, H, ΣL+ΣN, hd]
        return rearrange(out, "b h n d -> b n (h d)")[:, mask.inverse]  # [1, ΣL+ΣN, D] back in [text, video] order
    return rearrange(attention(q, k, v, mask=mask, backend=backend), "b h n d -> b n (h d)")  # [B, L+N, D]


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
        joint_mask: torch.Tensor | JointPacking | None,
        rope: RopeTable | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, N, D] video, cond [B, 6, D] (adaln_single) or c [B, D] (adaln_zero), or either per
        token of the joint sequence ([B, L+N, 6, D] / [B, L+N, D], text first: packed clips),
        text [B, L, D], joint_mask bool [B, 1, 1, L+N] (True = real key), None or a JointPacking,
        rope ([N, hd], [N, hd]) or None -> (x [B, N, D], text [B, L, D])."""
        L = text.shape[1]
        cond_t, cond_v = (cond[:, :L], cond[:, L:]) if self.video.adaln.per_token(cond) else (cond, cond)
        mod_v, mod_t = self.video.adaln(cond_v), self.text.adaln(cond_t)  # [B, 1 or N, 6, D], [B, 1 or L, 6, D]
        qv, kv, vv = self.video.qkv_heads(x, mod_v)  # each [B, H, N, hd]
        qt, kt, vt = self.text.qkv_heads(text, mod_t)  # each [B, H, L, hd]
        q = torch.cat([qt, maybe_rope(qv, rope)], dim=2)  # [B, H, L+N, hd]
        k = torch.cat([kt, maybe_rope(kv, rope)], dim=2)  # [B, H, L+N, hd]
        v = torch.cat([vt, vv], dim=2)  # [B, H, L+N, hd]
        out = joint_attention(q, k, v, joint_mask, self.backend)  # [B, L+N, D]
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
        joint_mask: torch.Tensor | JointPacking | None,
        rope: RopeTable | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Same arguments and results as DualStreamBlock.forward."""
        L, D = text.shape[1], x.shape[2]
        shift, scale, gate = self.adaln(cond).unbind(2)  # each [B, 1 or L+N, D]
        joint = torch.cat([text, x], dim=1)  # [B, L+N, D]
        qkv, hidden = self.linear1(modulate(self.norm(joint), shift, scale)).split([3 * D, self.mlp_hidden], dim=-1)
        q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.num_heads).contiguous().unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)  # each [B, H, L+N, hd]
        q = torch.cat([q[:, :, :L], maybe_rope(q[:, :, L:], rope)], dim=2)  # RoPE on the video part only
        k = torch.cat([k[:, :, :L], maybe_rope(k[:, :, L:], rope)], dim=2)
        attn = joint_attention(q, k, v, joint_mask, self.backend)  # [B, L+N, D]
        out = self.linear2(torch.cat([attn, F.gelu(hidden, approximate="tanh")], dim=-1))  # [B, L+N, D]
        joint = torch.addcmul(joint, gate, out)  # [B, L+N, D]
        return joint[:, L:], joint[:, :L]  # video [B, N, D], text [B, L, D]
