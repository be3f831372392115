"""Sequence (context) parallelism: Ulysses all-to-all attention (Jacobs et al. 2023, DeepSpeed-Ulysses).

A long video's tokens are split along the sequence over the P ranks of a sequence-parallel group;
everything per-token (patch embedding, MLPs, norms, RoPE with each rank's rows of the table)
runs on the local shard. Self-attention needs every token, so around it one all-to-all trades
the sequence split for a head split:

    q, k, v [B, H, N/P, hd] (my tokens, all heads) --all-to-all--> [B, H/P, N, hd] (all tokens, my heads)
    attention per head, exactly as on one device
    out [B, H/P, N, hd] --all-to-all--> [B, H, N/P, hd] (my tokens again)

Communication per layer is 4 all-to-alls of N·D/P elements per rank (q, k, v, out), independent of
P in total volume per rank, which is why Ulysses scales with the head count (P must divide H).
The gradient of an all-to-all is the inverse all-to-all, so backward costs the same.

These are pure functions of tensors and a process group: the model code stays free of
torch.distributed; a block would call `ulysses_attention` in place of `attention` when a
sequence-parallel group is configured.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """x [P, ...]: chunk j goes to rank j; returns [P, ...] with chunk i from rank i."""
    x = x.contiguous()
    out = torch.empty_like(x)  # after .contiguous(): empty_like keeps a permuted input's strides
    dist.all_to_all_single(out, x, group=group)
    return out


def _seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """[B, H, N/P, hd] sequence shard -> [B, H/P, N, hd] head shard."""
    P = dist.get_world_size(group)
    B, H, n, hd = x.shape
    chunks = x.reshape(B, P, H // P, n, hd).transpose(0, 1)  # [P (head group -> rank), B, H/P, n, hd]
    received = _all_to_all(chunks, group)  # [P (sequence shard <- rank), B, H/P, n, hd]
    return received.permute(1, 2, 0, 3, 4).reshape(B, H // P, P * n, hd)  # [B, H/P, N, hd]


def _heads_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    """[B, H/P, N, hd] head shard -> [B, H, N/P, hd] sequence shard (inverse of _seq_to_heads)."""
    P = dist.get_world_size(group)
    B, h, N, hd = x.shape
    chunks = x.reshape(B, h, P, N // P, hd).permute(2, 0, 1, 3, 4)  # [P (sequence shard -> rank), B, H/P, n, hd]
    received = _all_to_all(chunks, group)  # [P (head group <- rank), B, H/P, n, hd]
    return received.transpose(0, 1).reshape(B, h * P, N // P, hd)  # [B, H, N/P, hd]


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _seq_to_heads(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_seq(grad, ctx.group), None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _heads_to_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_heads(grad, ctx.group), None


def seq_to_heads(x: torch.Tensor, group=None) -> torch.Tensor:
    """Differentiable [B, H, N/P, hd] -> [B, H/P, N, hd] over the P ranks of `group`."""
    return _SeqToHeads.apply(x, group)


def heads_to_seq(x: torch.Tensor, group=None) -> torch.Tensor:
    """Differentiable [B, H/P, N, hd] -> [B, H, N/P, hd] over the P ranks of `group`."""
    return _HeadsToSeq.apply(x, group)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None, backend: str = "sdpa",
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """Self-attention over a sequence sharded across `group`, equal to attention on the whole sequence.

    q, k, v [B, H, N/P, hd]: this rank's contiguous slice of the tokens (rank r holds tokens
    r·N/P ... (r+1)·N/P - 1), already QK-normed and RoPE-rotated with their global positions.
    mask: optional key mask broadcastable to [B, 1, 1, N] over the whole sequence.
    Returns [B, H, N/P, hd] for this rank's tokens. P must divide H.
    """
    from dit_video.model.attention import attention

    P = dist.get_world_size(group)
    if q.shape[1] % P:
        raise ValueError(f"Ulysses needs the head count ({q.shape[1]}) divisible by the sequence-parallel size ({P})")
    q, k, v = (seq_to_heads(t, group) for t in (q, k, v))  # each [B, H/P, N, hd]
    out = attention(q, k, v, mask=mask, backend=backend)  # [B, H/P, N, hd]
    return heads_to_seq(out, group)  # [B, H, N/P, hd]
