"""The flash backend's dispatch, against a `flash_attn` stand-in in sys.modules (flash-attn needs
CUDA to build; tests/fake_flash_attn.py keeps its contracts and records every call).

Before: with no mask the backend built an all-ones mask, copied K/V through `nonzero` +
`index_select` and called the varlen kernel, and every call read `k_lens.max()` back from the GPU.
Now no mask means `flash_attn_func` on views of q, k, v, and a key-padding mask packs the keys with
a static-size sort, max_seqlen_k = Nk: no host sync either way. What this cannot reach: the real
CUDA kernels (their numerics and their acceptance of max_seqlen_k as an upper bound).
"""

from __future__ import annotations

import pytest
import torch
from fake_flash_attn import install_fake_flash  # flash_attn stand-in in sys.modules
from host_syncs import HostSyncCounter

from dit_video.model import attention as attn_mod
from dit_video.model.attention import attention


def qkv(B=3, H=2, Nq=10, Nk=6, hd=16, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, n, hd, generator=gen).to(dtype) for n in (Nq, Nk, Nk))


def padding_mask(B=3, Nk=6):
    mask = torch.ones(B, Nk, dtype=torch.bool)
    mask[1, 2:] = False
    mask[2, :] = False  # no real key at all
    return mask[:, None, None, :]  # [B, 1, 1, Nk]


def same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def test_without_a_mask_flash_attn_func_gets_views_of_q_k_v(monkeypatch):
    calls = install_fake_flash(monkeypatch)
    q, k, v = qkv()
    with HostSyncCounter() as syncs:
        out = attention(q, k, v, None, backend="flash")
    assert [name for name, _ in calls] == ["flash_attn_func"]
    args = calls[0][1]["args"]
    assert [tuple(x.shape) for x in args] == [(3, 10, 2, 16), (3, 6, 2, 16), (3, 6, 2, 16)]  # [B, N, H, hd]
    assert all(same_storage(a, b) for a, b in zip(args, (q, k, v), strict=True))  # no all-ones mask, no K/V copy
    assert syncs.total == 0, syncs.counts
    torch.testing.assert_close(out.float(), attention(q, k, v, None, backend="math").float(), atol=2e-2, rtol=2e-2)


def test_a_key_padding_mask_goes_to_varlen_with_no_host_sync(monkeypatch):
    calls = install_fake_flash(monkeypatch)
    q, k, v = qkv()
    mask = padding_mask()
    with HostSyncCounter() as syncs:
        out = attention(q, k, v, mask, backend="flash")
    assert syncs.total == 0, syncs.counts  # before: nonzero (the unpadding) and int(k_lens.max())
    assert [name for name, _ in calls] == ["flash_attn_varlen_func"]
    call = calls[0][1]
    assert call["cu_seqlens_k"].tolist() == [0, 6, 8, 8] and call["cu_seqlens_q"].tolist() == [0, 10, 20, 30]
    assert (call["max_seqlen_q"], call["max_seqlen_k"]) == (10, 6)  # static bounds, not read from the GPU
    packed_k = call["args"][1]  # [B*Nk, H, hd]: the 8 real keys first, in sample order
    real_k = torch.cat([k[0].transpose(0, 1), k[1, :, :2].transpose(0, 1)])  # [8, H, hd]
    assert torch.equal(packed_k[:8], real_k)
    torch.testing.assert_close(out.float(), attention(q, k, v, mask, backend="math").float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("masked", [False, True])
def test_flash_paths_give_the_math_gradients(monkeypatch, masked):
    """fp32 through the fake kernels (flash_can_run forced: the dispatch rule itself is tested
    above): the key packing's backward returns every key's gradient to its place."""
    install_fake_flash(monkeypatch)
    monkeypatch.setattr(attn_mod, "flash_can_run", lambda q: True)
    q, k, v = (x.requires_grad_() for x in qkv(dtype=torch.float32))
    mask = padding_mask() if masked else None
    grads = {}
    for backend in ("flash", "math"):
        out = attention(q, k, v, mask, backend=backend)
        grads[backend] = torch.autograd.grad(out.square().sum(), (q, k, v))
    for a, b in zip(grads["flash"], grads["math"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
