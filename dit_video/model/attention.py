"""The one attention function every block calls; backends plug in behind the `backend` argument.

"sdpa" is torch's scaled_dot_product_attention (fused flash kernel on CPU and GPU). "math" is the
plain softmax(q k^T / sqrt(d)) v reference, computed in float32, that faster backends are tested
against. A later flash-attn backend goes here too, never into the blocks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "math")


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, backend: str = "sdpa"
) -> torch.Tensor:
    """Softmax attention.

    q [B, heads, Nq, head_dim], k and v [B, heads, Nk, head_dim] -> [B, heads, Nq, head_dim].
    mask: optional bool broadcastable to [B, heads, Nq, Nk], True = may attend. A query whose keys
    are all masked out gets a zero output (what CPU SDPA returns; the math path matches it).
    """
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if backend == "math":
        return _math_attention(q, k, v, mask)
    raise ValueError(f"attention backend {backend!r} is unknown; known: {', '.join(BACKENDS)}")


def _math_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    # A reference must not be silently lowered to bf16 by an enclosing autocast.
    with torch.autocast(q.device.type, enabled=False):
        scores = q.float() @ k.float().transpose(-2, -1) / math.sqrt(q.shape[-1])  # [B, heads, Nq, Nk]
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(dim=-1)
        if mask is not None:
            probs = probs.nan_to_num(0.0)  # fully masked rows: softmax of all -inf is NaN; make them zero
        out = probs @ v.float()  # [B, heads, Nq, head_dim]
    return out.to(q.dtype)
