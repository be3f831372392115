"""A stand-in for the `flash_attn` package (it needs CUDA to build), injected into sys.modules.

`install_fake_flash(monkeypatch)` puts a module named `flash_attn` with `flash_attn_func` and
`flash_attn_varlen_func` in sys.modules, lets the flash backend run on CPU tensors, and returns
the list of calls it records: (function name, kwargs with the tensors as given). The functions
keep flash-attn's contracts ([B, N, H, hd] dense, [total, H, hd] + int32 cu_seqlens varlen,
max_seqlen as Python ints, last dim contiguous) and compute plain attention without reading a
value back from the tensors (so they add no host sync to what tests count).
"""

from __future__ import annotations

import functools
import math
import sys
import types

import torch

from dit_video.model import attention as attn_mod


def _check_layout(*tensors: torch.Tensor) -> None:
    for x in tensors:
        assert x.stride(-1) == 1, "flash-attn needs the head dim contiguous"
        assert x.dtype in (torch.float16, torch.bfloat16, torch.float32), x.dtype


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
    """q [B, Nq, H, hd], k and v [B, Nk, H, hd] -> [B, Nq, H, hd]."""
    _check_layout(q, k, v)
    assert q.dim() == 4 and k.shape == v.shape and not causal
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale  # [B, H, Nq, Nk]
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.float()).to(q.dtype)  # [B, Nq, H, hd]


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False):
    """q [total_q, H, hd], k and v [total_k, H, hd] (rows past cu_seqlens[-1] are never read) -> [total_q, H, hd]."""
    _check_layout(q, k, v)
    assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32 and not causal
    assert isinstance(max_seqlen_q, int) and isinstance(max_seqlen_k, int), "max_seqlen must be Python ints"
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    # Segment of every row: rows at or past cu[-1] get segment S (no query/key segment matches it).
    seg_q = torch.searchsorted(cu_seqlens_q[1:].long(), torch.arange(q.shape[0], device=q.device), right=True)
    seg_k = torch.searchsorted(cu_seqlens_k[1:].long(), torch.arange(k.shape[0], device=k.device), right=True)
    allowed = (seg_q[:, None] == seg_k[None, :])[None]  # [1, total_q, total_k]
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale  # [H, total_q, total_k]
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)  # empty segment -> 0
    return torch.einsum("hqk,khd->qhd", probs, v.float()).to(q.dtype)  # [total_q, H, hd]


def install_fake_flash(monkeypatch, on_cpu: bool = True, **replace) -> list[tuple[str, dict]]:
    """Inject the fake `flash_attn` (functions in `replace` override the default fakes) and, with
    `on_cpu`, let the flash backend run on CPU tensors; returns the recorded calls. Undone with the
    monkeypatch."""
    calls: list[tuple[str, dict]] = []
    module = types.ModuleType("flash_attn")
    for name, fn in {"flash_attn_func": flash_attn_func, "flash_attn_varlen_func": flash_attn_varlen_func,
                     **replace}.items():
        def recorded(*args, _fn=fn, _name=name, **kwargs):
            calls.append((_name, {"args": args, **kwargs}))
            return _fn(*args, **kwargs)
        setattr(module, name, recorded)
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    # A fresh cache around the real import, so the fake is found by `import flash_attn` and the
    # original (cached) lookup comes back when the monkeypatch is undone.
    monkeypatch.setattr(attn_mod, "flash_attn_module", functools.cache(attn_mod.flash_attn_module.__wrapped__))
    if on_cpu:
        monkeypatch.setattr(attn_mod, "FLASH_DEVICES", (*attn_mod.FLASH_DEVICES, "cpu"))
    return calls
