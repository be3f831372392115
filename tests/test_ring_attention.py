"""Ring attention (K/V blocks circling the group, log-sum-exp merge, ring backward) on 2 gloo
processes equals one-process attention, forward and gradients (q, k, v), also with a head count
the group size does not divide (what Ulysses cannot do), and in bfloat16 within bf16 rounding."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from spawn_ranks import spawn_ranks

WORLD = 2


def _case(seed: int, heads: int, dtype=torch.float32):
    """Full-sequence q, k, v [B, H, N, hd] and an output weighting (so dL/dout is not all ones)."""
    g = torch.Generator().manual_seed(seed)
    B, N, hd = 2, 12, 8
    return tuple(torch.randn(B, heads, N, hd, generator=g).to(dtype) for _ in range(4))


def _reference(q, k, v, w):
    from dit_video.model.attention import attention

    q, k, v = (t.detach().float().requires_grad_() for t in (q, k, v))
    out = attention(q, k, v, backend="math")  # float32 softmax reference
    (out * w.float()).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def _rank(rank: int, store: str, queue) -> None:
    from dit_video.distributed import ring_attention

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        done = []
        for heads, dtype, tol in ((4, torch.float32, 1e-5), (3, torch.float32, 1e-5), (2, torch.bfloat16, 2e-2)):
            q, k, v, w = _case(11, heads, dtype)
            n = q.shape[2] // WORLD
            mine = slice(rank * n, (rank + 1) * n)  # this rank's contiguous token slice
            q_l, k_l, v_l = (t[:, :, mine].clone().requires_grad_() for t in (q, k, v))
            out_l = ring_attention(q_l, k_l, v_l)  # [B, H, N/P, hd]
            (out_l * w[:, :, mine]).sum().backward()
            assert out_l.dtype == dtype and q_l.grad.dtype == dtype
            ref = _reference(q, k, v, w)
            for got, want in zip((out_l, q_l.grad, k_l.grad, v_l.grad), ref, strict=True):
                torch.testing.assert_close(got.detach().float(), want[:, :, mine], rtol=tol, atol=tol)
            done.append(heads)
        with pytest.raises(ValueError, match="ring attention takes no mask"):
            ring_attention(q_l, k_l, v_l, mask=torch.ones(1, 1, 1, 12, dtype=torch.bool))
        queue.put((rank, done))
    finally:
        dist.destroy_process_group()


def test_ring_attention_two_processes_equals_single_process(tmp_path):
    done = spawn_ranks(_rank, str(tmp_path / "store"), WORLD, timeout=120)
    assert done == {0: [4, 3, 2], 1: [4, 3, 2]}


def test_world_size_one_is_plain_attention(tmp_path):
    from dit_video.distributed import ring_attention

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        q, k, v, w = _case(3, heads=2)
        q_r, k_r, v_r = (t.clone().requires_grad_() for t in (q, k, v))
        out = ring_attention(q_r, k_r, v_r)
        (out * w).sum().backward()
        for got, want in zip((out, q_r.grad, k_r.grad, v_r.grad), _reference(q, k, v, w), strict=True):
            torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-5)
    finally:
        dist.destroy_process_group()
