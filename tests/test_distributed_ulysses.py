"""Ulysses sequence-parallel attention on 2 gloo processes equals one-process attention, forward
and gradients (q, k, v), for the sdpa and math backends, with and without a key mask."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from spawn_ranks import spawn_ranks

WORLD = 2


def _case(seed: int, masked: bool):
    """Full-sequence q, k, v [B, H, N, hd], an output weighting and an optional key mask."""
    g = torch.Generator().manual_seed(seed)
    B, H, N, hd = 2, 4, 12, 8
    q, k, v, w = (torch.randn(B, H, N, hd, generator=g) for _ in range(4))
    mask = None
    if masked:
        mask = torch.ones(B, 1, 1, N, dtype=torch.bool)
        mask[1, ..., 7:] = False  # padding-like: the last keys of sample 1 are invisible
    return q, k, v, w, mask


def _reference(backend: str, seed: int, masked: bool):
    from dit_video.model.attention import attention

    q, k, v, w, mask = _case(seed, masked)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = attention(q, k, v, mask=mask, backend=backend)
    (out * w).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def _rank(rank: int, store: str, queue) -> None:
    from dit_video.distributed import ulysses_attention

    torch.set_num_threads(1)
    # A file rendezvous: no TCP port to race for with other jobs on the machine.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        results = []
        for backend in ("sdpa", "math"):
            for masked in (False, True):
                q, k, v, w, mask = _case(7, masked)
                n = q.shape[2] // WORLD
                mine = slice(rank * n, (rank + 1) * n)  # this rank's contiguous token slice
                q_l, k_l, v_l = (t[:, :, mine].clone().requires_grad_() for t in (q, k, v))
                out_l = ulysses_attention(q_l, k_l, v_l, backend=backend, mask=mask)  # [B, H, N/P, hd]
                (out_l * w[:, :, mine]).sum().backward()
                ref_out, ref_q, ref_k, ref_v = _reference(backend, 7, masked)
                for got, want in ((out_l, ref_out), (q_l.grad, ref_q), (k_l.grad, ref_k), (v_l.grad, ref_v)):
                    torch.testing.assert_close(got.detach(), want[:, :, mine], rtol=1e-5, atol=1e-5)
                results.append((backend, masked))
        with pytest.raises(ValueError, match="divisible"):  # 3 heads cannot split over 2 ranks
            three = torch.randn(1, 3, 4, 8)
            ulysses_attention(three, three, three)
        queue.put((rank, results))
    finally:
        dist.destroy_process_group()


def test_ulysses_attention_two_processes_equals_single_process(tmp_path):
    done = spawn_ranks(_rank, str(tmp_path / "store"), WORLD, timeout=120)
    assert all(len(v) == 4 for v in done.values())


def test_world_size_one_is_plain_attention(tmp_path):
    from dit_video.distributed import ulysses_attention

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        q, k, v, _, _ = _case(3, masked=False)
        torch.testing.assert_close(ulysses_attention(q, k, v), torch.nn.functional.scaled_dot_product_attention(q, k, v))
    finally:
        dist.destroy_process_group()
