"""Autograd Functions for the elementwise chains of a DiT block: same math, fewer passes, less saved.

Eager autograd runs every small op as its own pass over a [B, N, D]-sized tensor and saves each
op's inputs. On CPU these passes are memory-bound and, under bf16 autocast, pay for dtype casts:
in a profile of the issue-3 benchmark's bf16 step they were about a third of the step. Each
Function here computes a chain in a few passes, saves only what backward cannot cheaply
recompute, and writes its own backward. tests/test_model_fused.py checks them against the
unfused torch composition (values, gradients) and with `torch.autograd.gradcheck` in float64.

- `layer_norm_modulate`: LayerNorm (no affine) then adaLN's x * (1 + scale) + shift. Saves x and
  the per-row mean/rstd (not the normalised tensor): backward recomputes it in one pass.
- `qkv_heads`: the fused QKV projection split into heads, per-head QK RMSNorm, rotate-half RoPE,
  all token-major (see the class). Saves q and k before the norm and their per-row rstd.
- `rms_norm`: RMSNorm (the per-head QK norm of cross-attention). Saves x and rstd only.
RMS statistics and backward math are float32 (float64 under gradcheck) whatever x's dtype."""

from __future__ import annotations

import torch
from torch.autograd import Function


class _LayerNormModulate(Function):
    @staticmethod
    def forward(ctx, x, shift, scale, eps: float):
        d = x.shape[-1]
        x_hat, mean, rstd = torch.native_layer_norm(x, (d,), None, None, eps)  # [B, N, D], [B, N, 1] x2
        ctx.save_for_backward(x, mean, rstd, scale)
        ctx.shift_shape = shift.shape
        return torch.addcmul(shift, x_hat, 1 + scale)  # [B, N, D]

    @staticmethod
    def backward(ctx, grad):
        x, mean, rstd, scale = ctx.saved_tensors
        need_x, need_shift, need_scale, _ = ctx.needs_input_grad
        grad_x = grad_shift = grad_scale = None
        if need_scale:
            # x_hat = x * rstd - mean * rstd: one pass instead of saving the [B, N, D] tensor.
            x_hat = torch.addcmul(-mean * rstd, x, rstd)  # [B, N, D] float32
            grad_scale = (grad * x_hat).sum_to_size(scale.shape).to(scale.dtype)
        if need_shift:
            grad_shift = grad.sum_to_size(ctx.shift_shape).to(scale.dtype)
        if need_x:
            grad_x_hat = grad * (1 + scale)  # [B, N, D]
            grad_x = torch.ops.aten.native_layer_norm_backward(
                grad_x_hat.to(x.dtype), x, (x.shape[-1],), mean, rstd, None, None, [True, False, False]
            )[0]
        return grad_x, grad_shift, grad_scale, None


def layer_norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """adaLN: LayerNorm(x) (no affine) * (1 + scale) + shift.

    x [B, N, D]; shift, scale [B, 1, D] or [B, N, D] -> [B, N, D] in the promoted dtype of x and shift.
    """
    return _LayerNormModulate.apply(x, shift, scale, eps)


def _rotate_tables(cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half as a channel flip: rotate_half(x) * sin == flip_halves(x) * sin_signed, where
    sin_signed = [-sin1, sin2] (the halves of a rotate-half table are equal, so flipping sin is a no-op).
    cos, sin [N, hd] -> [N, 1, hd] each, to broadcast over the heads of token-major [B, N, H, hd]."""
    half = cos.shape[-1] // 2
    sin_signed = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)  # [N, hd]
    return cos.to(dtype)[:, None], sin_signed.to(dtype)[:, None]


def _flip_halves(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (x2, x1) on the two halves of the last dim (one copy)."""
    return x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)


def _norm_rope_forward(x, weight, tables, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rope(rms_norm(x) * weight), rstd) over the last dim of x: y in x's dtype and memory layout,
    rstd float32 with x's shape but last dim 1.

    tables: None (no rotation) or (cos, sin_signed) from _rotate_tables, broadcastable to x.
    The statistic is float32; the elementwise passes run in x's dtype (these passes are memory-bound,
    so bf16 halves their cost; the unfused path also rotated in bf16 under autocast).
    """
    acc = torch.promote_types(x.dtype, torch.float32)  # float32, or float64 for gradcheck
    # vector_norm reads x once and accumulates in float32 (a bf16 x is never copied to float32).
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=acc)  # [..., 1]
    rstd = torch.rsqrt(norm.square_().div_(x.shape[-1]).add_(eps))  # [..., 1]
    w = weight.to(acc)
    if tables is None:
        y = x * w.to(x.dtype)
    else:
        cos, sin_s = tables
        # The norm weight folded into the tables: rope(u * w) = u * (w cos) + flip(u) * (flip(w) sin_s).
        a, b = (w * cos).to(x.dtype), (_flip_halves(w) * sin_s).to(x.dtype)
        y = torch.addcmul(x * a, _flip_halves(x), b)
    # rstd applied last, in place on y (a fresh tensor). No `out=` into a caller's buffer: dynamo
    # cannot trace out= into a strided view, and each such graph break splits a compiled block.
    return y.mul_(rstd.to(x.dtype)), rstd


def _norm_rope_backward(grad, x, weight, rstd, tables, need_x: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(d loss / d x (None unless need_x), d loss / d weight summed to weight's shape).

    float32 math on x's and grad's own dtype (no converted copies), in place where it can be.
    """
    acc = rstd.dtype
    if tables is None:
        grad_v = grad.to(acc, copy=True)
    else:
        cos, sin_s = tables
        # Inverse rotation: the transpose of v -> v cos + flip(v) sin_s is g -> g cos - flip(g) sin_s.
        grad_v = (grad * cos).addcmul_(_flip_halves(grad), sin_s, value=-1)  # d loss / d (u * weight)
    u = x * rstd  # the normalised x, recomputed (one pass) instead of saved
    prod = grad_v * u
    w = weight.to(acc)
    grad_weight = prod.sum_to_size(weight.shape).to(weight.dtype)
    if not need_x:
        return None, grad_weight
    with torch.autocast(x.device.type, enabled=False):  # a backward run under autocast stays float32
        dot = prod.reshape(-1, x.shape[-1]) @ w  # [rows] = sum_c grad_v w u, as a GEMV (weight is [hd])
    grad_u = grad_v.mul_(w)
    # d/dx of x * rstd(x) applied to grad_u: rstd * (grad_u - u * mean(grad_u * u)).
    grad_u.addcmul_(u, dot.reshape(rstd.shape), value=-1.0 / x.shape[-1])
    return grad_u.mul_(rstd), grad_weight  # float32


class _RMSNorm(Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        # Elementwise ops keep x's memory layout (e.g. token-major q viewed as [B, H, N, hd]).
        out, rstd = _norm_rope_forward(x, weight, None, eps)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        grad_x, grad_weight = _norm_rope_backward(grad, x, weight, rstd, None, ctx.needs_input_grad[0])
        return None if grad_x is None else grad_x.to(x.dtype), grad_weight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim times weight [hd]: x [..., hd] -> same shape, dtype and memory layout.

    The RMS statistic and backward are float32; backward recomputes the normalised x from x and rstd.
    """
    return _RMSNorm.apply(x, weight, eps)


class _QKVHeads(Function):
    """Fused-QKV linear output -> q, k (RMSNorm + RoPE), v, with the head split folded in.

    Replaces rearrange + .contiguous() + unbind + two norms + two RoPEs. Works token-major
    ([B, N, H, hd], the linear's own order, so the split is one copy of whole token rows) and
    returns [B, H, N, hd] views of token-major memory: CPU SDPA then returns its output in the
    same layout, so merging the heads for the output projection is a view, not a copy (and the
    projection does not save a second copy of what SDPA already saved). Backward stacks the three
    gradients into one [B, N, 3D] tensor, the layout the QKV linear's backward reads. Nothing
    writes into a view with `out=`, so torch.compile traces the whole block without a break.
    """

    @staticmethod
    def forward(ctx, qkv, q_weight, k_weight, cos, sin, eps: float, num_heads: int):
        acc = torch.promote_types(qkv.dtype, torch.float32)
        heads = qkv.unflatten(-1, (3, num_heads, -1)).movedim(2, 0)  # [3, B, N, H, hd] view
        qk = heads[:2].contiguous()  # [2, B, N, H, hd]: every pass below runs on contiguous memory
        v = heads[2].contiguous()  # [B, N, H, hd]
        tables = None if cos is None else _rotate_tables(cos, sin, acc)  # each [N, 1, hd]
        q, rstd_q = _norm_rope_forward(qk[0], q_weight, tables, eps)  # [B, N, H, hd], [B, N, H, 1]
        k, rstd_k = _norm_rope_forward(qk[1], k_weight, tables, eps)
        ctx.save_for_backward(qk, q_weight, k_weight, rstd_q, rstd_k, cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # each [B, H, N, hd]

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        qk, q_weight, k_weight, rstd_q, rstd_k, cos, sin = ctx.saved_tensors
        _, B, N, H, hd = qk.shape
        tables = None if cos is None else _rotate_tables(cos, sin, rstd_q.dtype)
        # An output that did not reach the loss has no gradient: it contributes zeros.
        grad_q, grad_k, grad_v = (
            qk.new_zeros(B, N, H, hd) if g is None else g.transpose(1, 2) for g in (grad_q, grad_k, grad_v)
        )  # each [B, N, H, hd]
        grad_qx, grad_qw = _norm_rope_backward(grad_q, qk[0], q_weight, rstd_q, tables, True)  # float32
        grad_kx, grad_kw = _norm_rope_backward(grad_k, qk[1], k_weight, rstd_k, tables, True)
        # q's and k's float32 gradients rounded to v's dtype, then one stack writes the (three, heads,
        # hd) layout the QKV linear's backward reads.
        dtype = grad_v.dtype
        grad_qkv = torch.stack([grad_qx.to(dtype), grad_kx.to(dtype), grad_v], dim=2)  # [B, N, 3, H, hd]
        return grad_qkv.flatten(2), grad_qw, grad_kw, None, None, None, None  # grad_qkv [B, N, 3D]


def qkv_heads(
    qkv: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor] | None,
    eps: float,
    num_heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a fused QKV projection into heads, RMSNorm q and k (weights [hd]), rotate them by RoPE.

    qkv [B, N, 3D] laid out (three, heads, hd) along the last dim, rope (cos, sin) [N, hd] in the
    rotate-half layout of rope.py, or None (no rotation) -> q, k, v each [B, H, N, hd] (views of
    token-major memory). Equals rearrange, then apply_rope(rms_norm(q) * q_weight) and the same for k.
    """
    cos, sin = (None, None) if rope is None else rope
    return _QKVHeads.apply(qkv, q_weight, k_weight, cos, sin, eps, num_heads)
