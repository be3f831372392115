"""Attention backends: sdpa, math and flash-attn (varlen) dispatch behind one function."""

from __future__ import annotations

import math

import pytest
import torch
from fake_flash_attn import install_fake_flash  # flash_attn stand-in in sys.modules

from dit_video.model import attention as attn_mod
from dit_video.model.attention import attention, flash_can_run, is_key_padding_mask


def qkv(B=3, H=2, Nq=10, Nk=6, hd=16, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, n, hd, generator=gen, dtype=dtype) for n in (Nq, Nk, Nk))


def padding_mask(B=3, Nk=6):
    mask = torch.ones(B, Nk, dtype=torch.bool)
    mask[1, 2:] = False
    mask[2, :] = False  # no real key at all
    return mask[:, None, None, :]  # [B, 1, 1, Nk]


def fake_flash_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale):
    """A pure-torch stand-in with flash_attn_varlen_func's contract ([total, H, hd] + cu_seqlens)."""
    out = torch.zeros_like(q)
    for i in range(len(cu_seqlens_q) - 1):
        qs, qe = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])
        ks, ke = int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1])
        assert qe - qs <= max_seqlen_q and ke - ks <= max_seqlen_k
        if ke == ks:
            continue  # empty key segment -> zeros
        scores = torch.einsum("qhd,khd->hqk", q[qs:qe].float(), k[ks:ke].float()) * softmax_scale
        out[qs:qe] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[ks:ke].float()).to(q.dtype)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_and_flash_fallback_agree_with_math(dtype, masked):
    q, k, v = qkv(dtype=dtype)
    mask = padding_mask() if masked else None
    ref = attention(q, k, v, mask, backend="math")
    for backend in ("sdpa", "flash"):  # flash on CPU runs sdpa
        torch.testing.assert_close(attention(q, k, v, mask, backend=backend), ref, atol=1e-5, rtol=1e-5)


def test_backends_agree_on_gradients():
    q, k, v = (x.requires_grad_() for x in qkv())
    mask = padding_mask()
    grads = {}
    for backend in ("sdpa", "math"):
        out = attention(q, k, v, mask, backend=backend)
        grads[backend] = torch.autograd.grad(out.square().sum(), (q, k, v))
    for a, b in zip(grads["sdpa"], grads["math"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_flash_dispatch_rules(monkeypatch):
    q, _, _ = qkv()
    # No CUDA here (and usually no flash-attn): the flash backend must not be chosen.
    assert not flash_can_run(q)
    install_fake_flash(monkeypatch, on_cpu=False, flash_attn_varlen_func=fake_flash_varlen)
    assert not flash_can_run(q)  # installed, but q is on CPU
    assert not flash_can_run(q.cuda() if torch.cuda.is_available() else q.half())
    assert is_key_padding_mask(None, 3, 6)
    assert is_key_padding_mask(padding_mask(), 3, 6)
    assert not is_key_padding_mask(torch.ones(3, 1, 10, 6, dtype=torch.bool), 3, 6)  # per-query mask
    assert not is_key_padding_mask(torch.ones(1, 1, 10, 10, dtype=torch.bool), 3, 10)  # block-diagonal


def test_flash_varlen_path_matches_math(monkeypatch):
    """Pretend flash-attn can run: the unpadding to cu_seqlens must reproduce masked attention.
    (Without a mask the flash backend calls flash_attn_func: tests/test_flash_attention.py.)"""
    install_fake_flash(monkeypatch, flash_attn_varlen_func=fake_flash_varlen)
    monkeypatch.setattr(attn_mod, "flash_can_run", lambda q: True)
    calls = []
    real = attn_mod._flash_varlen_attention
    monkeypatch.setattr(attn_mod, "_flash_varlen_attention", lambda *a: calls.append(1) or real(*a))
    q, k, v = qkv()
    mask = padding_mask()
    out = attention(q, k, v, mask, backend="flash")
    assert calls, "the varlen path was not taken"
    torch.testing.assert_close(out, attention(q, k, v, mask, backend="math"), atol=1e-5, rtol=1e-5)
    # A dense non-padding mask is beyond varlen: it goes to sdpa, still correct.
    calls.clear()
    dense = torch.rand(3, 1, 10, 6, generator=torch.Generator().manual_seed(1)) > 0.3
    torch.testing.assert_close(
        attention(q, k, v, dense, backend="flash"), attention(q, k, v, dense, backend="math"), atol=1e-5, rtol=1e-5
    )
    assert not calls


def test_cu_seqlens():
    assert attn_mod._cu_seqlens(torch.tensor([3, 0, 5])).tolist() == [0, 3, 3, 8]
    assert attn_mod._cu_seqlens(torch.tensor([3, 0, 5])).dtype == torch.int32


def test_math_reference_is_the_formula():
    q, k, v = qkv(B=1, H=1, Nq=4, Nk=3, hd=8, dtype=torch.float64)
    probs = torch.softmax(q[0, 0] @ k[0, 0].T / math.sqrt(8), dim=-1)
    torch.testing.assert_close(attention(q, k, v, backend="math")[0, 0], probs @ v[0, 0])
