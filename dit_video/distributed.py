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

Ring attention (Liu et al. 2023) is the other choice: K/V blocks travel around the group while
each rank merges blockwise softmax results (log-sum-exp), so it needs no head split (any head
count works) and holds only one remote K/V block at a time. Ulysses moves less data (4 all-to-alls
vs P-1 K/V hops), so it is the default; ring is for head counts the group size does not divide.

These are pure functions of tensors and a process group: the model code stays free of
torch.distributed; dit_video/parallel.py puts them behind each self-attention's `attend`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from dit_video.errors import ConfigError
from dit_video.files import private_folder_problem
from dit_video.model.attention import attention


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

    P = dist.get_world_size(group)
    if q.shape[1] % P:
        raise ValueError(f"Ulysses needs the head count ({q.shape[1]}) divisible by the sequence-parallel size ({P})")
    q, k, v = (seq_to_heads(t, group) for t in (q, k, v))  # each [B, H/P, N, hd]
    out = attention(q, k, v, mask=mask, backend=backend)  # [B, H/P, N, hd]
    return heads_to_seq(out, group)  # [B, H, N/P, hd]



def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without torch.distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1

# ----------------------------------------------------------------------------- the token split


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad):
        # The gradient of an all-gather is a reduce-scatter: every rank's loss may use every
        # shard. (gloo has no reduce_scatter, so all-reduce and keep my slice.)
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        n = grad.shape[1] // dist.get_world_size(ctx.group)
        rank = dist.get_rank(ctx.group)
        return grad[:, rank * n:(rank + 1) * n], None


def gather_sequence(x: torch.Tensor, group=None) -> torch.Tensor:
    """Differentiable [B, N/P, ...] (this rank's contiguous tokens) -> [B, N, ...] (all tokens, rank order).

    Backward sums the P ranks' gradients of the full sequence, so with every rank of the group
    computing the same loss, each parameter's gradient comes out P times its share: exactly what
    the data-parallel mean over all dp x sp ranks (DDP, FSDP) divides back out.
    """
    return _GatherSequence.apply(x, group)


def share_rng(group=None) -> None:
    """Copy the torch CPU (and current CUDA) RNG state of the group's first rank to all its ranks:
    ranks of one sequence-parallel group must draw the same noise, t and caption dropout."""
    state = [torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None]
    dist.broadcast_object_list(state, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1])


# ----------------------------------------------------------------------------- ring attention


def _ring_pass(tensor: torch.Tensor, group) -> torch.Tensor:
    """Send `tensor` to the next rank of the ring and return the previous rank's (same shape)."""
    P, rank = dist.get_world_size(group), dist.get_rank(group)
    peer = (lambda r: dist.get_global_rank(group, r)) if group is not None else (lambda r: r)
    received = torch.empty_like(tensor)
    ops = [dist.P2POp(dist.isend, tensor.contiguous(), peer((rank + 1) % P), group),
           dist.P2POp(dist.irecv, received, peer((rank - 1) % P), group)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


def _block_softmax(q, k, v, scale):
    """One K/V block: (softmax(q k^T scale) v, log-sum-exp of the scores), in float32.

    q [B, H, n, hd], k and v [B, H, m, hd] -> out [B, H, n, hd], lse [B, H, n].
    """
    scores = q @ k.transpose(-2, -1) * scale  # [B, H, n, m]
    lse = scores.logsumexp(dim=-1)  # [B, H, n]
    return (scores - lse[..., None]).exp() @ v, lse


class _RingAttention(torch.autograd.Function):
    """Exact attention over K/V blocks that circle the group; backward is a second ring pass
    (FlashAttention's backward per block, with dK/dV riding along with their K/V back home)."""

    @staticmethod
    def forward(ctx, q, k, v, group):
        P = dist.get_world_size(group)
        scale = 1.0 / math.sqrt(q.shape[-1])
        q32, kv = q.float(), torch.stack([k, v]).float()  # kv [2, B, H, n, hd]: one message per hop
        out = torch.zeros_like(q32)  # [B, H, n, hd]
        lse = torch.full(q.shape[:-1], float("-inf"), device=q.device)  # [B, H, n]
        for step in range(P):
            block_out, block_lse = _block_softmax(q32, kv[0], kv[1], scale)
            # Online softmax: rescale both partial results to the merged normaliser.
            merged = torch.logaddexp(lse, block_lse)  # [B, H, n]
            out = out * (lse - merged).exp()[..., None] + block_out * (block_lse - merged).exp()[..., None]
            lse = merged
            if step < P - 1:
                kv = _ring_pass(kv, group)  # the block of rank (rank - step - 1) mod P
        ctx.group, ctx.scale = group, scale
        ctx.save_for_backward(q, k, v, out, lse)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        group, scale, P = ctx.group, ctx.scale, dist.get_world_size(ctx.group)
        q32, dout = q.float(), grad_out.float()
        delta = (dout * out).sum(-1, keepdim=True)  # [B, H, n, 1]: rowsum(dO * O), FlashAttention's D
        dq = torch.zeros_like(q32)
        kv = torch.stack([k, v]).float()  # [2, B, H, n, hd]
        dkv = torch.zeros_like(kv)  # gradient of the block currently held; travels with it
        for step in range(P):
            probs = (q32 @ kv[0].transpose(-2, -1) * scale - lse[..., None]).exp()  # [B, H, n, m] final softmax
            dprobs = dout @ kv[1].transpose(-2, -1)  # [B, H, n, m]
            dscores = probs * (dprobs - delta) * scale  # [B, H, n, m]
            dq += dscores @ kv[0]
            dkv = dkv + torch.stack([dscores.transpose(-2, -1) @ q32, probs.transpose(-2, -1) @ dout])
            if step < P - 1:
                kv = _ring_pass(kv, group)
            # P hops in all bring every block's accumulated dK/dV back to the rank that owns it.
            dkv = _ring_pass(dkv, group) if P > 1 else dkv
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None, backend: str = "sdpa",
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """Self-attention over a sequence sharded across `group`, equal to attention on the whole sequence.

    q, k, v [B, H, N/P, hd]: this rank's contiguous slice of the tokens (as for `ulysses_attention`).
    Returns [B, H, N/P, hd]. Any head count works. Blocks are computed in float32 by explicit
    matmuls (`backend` is accepted for a common signature and not used); key masks are not supported.
    Memory per rank: one [B, H, N/P, N/P] score block at a time.
    """
    if mask is not None:
        raise ValueError("ring attention takes no mask: use strategy.sp_attention=ulysses for masked self-attention")
    return _RingAttention.apply(q, k, v, group)


# ----------------------------------------------------------------------------- once per node

# Node-local (on clusters /tmp is per node): what one process computed here, others read. One
# private folder per user: in a shared, world-writable temp dir another user could otherwise plant
# results (a forged encoder hash in the run's identity record) or symlinks there.
NODE_CACHE = Path(tempfile.gettempdir()) / f"dit_video-node-cache-{os.getuid()}"


def private_dir(path: Path) -> Path:
    """`path` as a folder only this user can read or write: created with mode 0700, or, if it
    exists, refused unless it is a real directory (not a symlink) owned by us and closed to others."""
    path = Path(path)
    problem = private_folder_problem(path)
    if problem:
        raise ConfigError(f"node cache folder '{path}' is {problem}: another user could plant results in it; "
                          "remove it (it is only a cache) and run again")
    return path


def once_per_node(key: str, compute: Callable[[], dict], cache_dir: Path | None = None) -> dict:
    """compute() in the first process on this node to ask for `key`; the others wait and read its result.

    For work every rank would otherwise repeat before any process group exists, such as hashing
    a frozen encoder's weights (20 GB for T5-XXL) for the run's identity record: the first process
    reads the files once (which also warms the page cache the other ranks load them from). A
    file lock in `cache_dir` orders the node's processes; the JSON result stays there, so `key`
    must name everything the result depends on (paths, sizes, mtimes: see `files_key`).
    `cache_dir` (default NODE_CACHE) must be this user's private folder (see `private_dir`).
    """
    cache_dir = private_dir(NODE_CACHE if cache_dir is None else cache_dir)
    name = hashlib.sha256(key.encode()).hexdigest()[:32]
    result_path = cache_dir / f"{name}.json"
    with open(cache_dir / f"{name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if compute() raises
        if result_path.is_file():
            return json.loads(result_path.read_text())["result"]
        result = compute()
        tmp = result_path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "result": result}))
        tmp.replace(result_path)  # atomic: a reader sees all of it or none
        return result


def files_key(paths) -> list:
    """(path, size, mtime_ns) of every file under `paths` (files, or folders searched recursively):
    changes whenever a file is rewritten, as make's rebuild test does."""
    files = []
    for p in map(Path, paths):
        files.extend(sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p])
    return [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
