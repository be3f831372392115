"""The one attention function every block calls; backends plug in behind the `backend` argument.

- "sdpa": torch's scaled_dot_product_attention (fused flash kernel on CPU and GPU). The default.
- "math": the plain softmax(q k^T / sqrt(d)) v reference, computed in float32, that faster backends
  are tested against.
- "flash": flash-attn 2 (Dao 2023) when the package is installed and q is a CUDA fp16/bf16 tensor;
  elsewhere (CPU, fp32, no flash-attn) it runs "sdpa", so one config trains on a GPU node and runs
  its tests on a laptop. No mask: `flash_attn_func` on the dense [B, N, H, hd] layout. Key-padding
  masks (text): `flash_attn_varlen_func` with cu_seqlens, the padded keys dropped instead of masked,
  which is where varlen beats a masked dense kernel. Masks that are not key-padding masks (e.g.
  block-diagonal packing masks given densely) go to sdpa. Neither path reads a value back from
  the GPU (no `nonzero`, no `.item()`): the keys are reordered into a buffer of static size and
  max_seqlen_k is the padded length, an upper bound flash-attn accepts.

Packed sequences (NaViT, Dehghani et al. 2023; dit_video/model/packing.py) pass a `PackedMask`:
several clips concatenated along the token axis, each attending only to its own segment. flash
runs it as varlen with the segments' cu_seqlens (no ΣN x ΣN matrix at all); sdpa and math get the
equivalent dense block-diagonal bool mask, built once per forward and shared by every layer.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "math", "flash")
FLASH_DEVICES = ("cuda",)  # device types flash-attn has kernels for


@functools.cache
def flash_attn_module():
    """The `flash_attn` package, or None when it is not installed (it needs CUDA to build; an
    optional extra: pip install .[gpu]). Imported on the first flash call on a GPU, then cached."""
    try:
        import flash_attn
    except ImportError:  # pragma: no cover - depends on the machine
        return None
    return flash_attn


class PackedMask:
    """Block-diagonal attention over packed segments: query segment s sees key segment s only.

    q_lens [S] and k_lens [S]: tokens per segment along the query and the key axis (both packed
    contiguously, segment 0 first). A segment with no keys (e.g. a caption with no real token)
    gets zero output, as a fully masked query row does everywhere else.
    max_seqlen: (q, k) upper bounds of the segment lengths known on the host (flash-attn sizes its
    grid by them); None reads the maxima back from the device, a host sync.
    """

    def __init__(self, q_lens: torch.Tensor, k_lens: torch.Tensor, max_seqlen: tuple[int, int] | None = None):
        self.q_lens, self.k_lens = q_lens, k_lens  # [S], [S]
        self.cu_seqlens_q, self.cu_seqlens_k = _cu_seqlens(q_lens), _cu_seqlens(k_lens)  # [S+1] int32
        self.max_seqlen_q, self.max_seqlen_k = max_seqlen or (int(q_lens.max()), int(k_lens.max()))
        self._dense: torch.Tensor | None = None

    def dense(self, n_q: int | None = None, n_k: int | None = None) -> torch.Tensor:
        """The same mask as a bool [1, 1, ΣNq, ΣNk] tensor (True = may attend), built on first use.
        n_q, n_k: ΣNq and ΣNk when the caller knows them (else read back from the device)."""
        if self._dense is None:
            segments = torch.arange(len(self.q_lens), device=self.q_lens.device)  # [S]
            q_seg = segments.repeat_interleave(self.q_lens, output_size=n_q)  # [ΣNq] segment of each query
            k_seg = segments.repeat_interleave(self.k_lens, output_size=n_k)  # [ΣNk] segment of each key
            self._dense = (q_seg[:, None] == k_seg[None, :])[None, None]  # [1, 1, ΣNq, ΣNk]
        return self._dense


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, backend: str = "sdpa"
) -> torch.Tensor:
    """Softmax attention.

    q [B, heads, Nq, head_dim], k and v [B, heads, Nk, head_dim] -> [B, heads, Nq, head_dim].
    mask: optional bool broadcastable to [B, heads, Nq, Nk], True = may attend. A query whose keys
    are all masked out gets a zero output (what CPU SDPA returns; the math path matches it).
    Or a PackedMask (B = 1, segments packed along Nq and Nk): block-diagonal attention.
    """
    if isinstance(mask, PackedMask):
        if backend == "flash" and flash_can_run(q):
            return _flash_packed_attention(q, k, v, mask)
        mask = mask.dense(q.shape[2], k.shape[2])  # [1, 1, Nq, Nk]
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if backend == "math":
        return _math_attention(q, k, v, mask)
    if backend == "flash":
        if flash_can_run(q) and mask is None:
            return _flash_dense_attention(q, k, v)
        if flash_can_run(q) and is_key_padding_mask(mask, q.shape[0], k.shape[2]):
            return _flash_varlen_attention(q, k, v, mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    raise ValueError(f"attention backend {backend!r} is unknown; known: {', '.join(BACKENDS)}")


def flash_can_run(q: torch.Tensor) -> bool:
    """q is a CUDA half-precision tensor (flash-attn's only supported inputs) and flash-attn is installed."""
    return (q.device.type in FLASH_DEVICES and q.dtype in (torch.float16, torch.bfloat16)
            and flash_attn_module() is not None)


def is_key_padding_mask(mask: torch.Tensor | None, batch: int, n_k: int) -> bool:
    """True for None or a [B, 1, 1, Nk] mask: the only masks the varlen path expresses exactly."""
    return mask is None or (mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1 and mask.shape[3] == n_k
                            and mask.shape[0] in (1, batch))


def _cu_seqlens(lengths: torch.Tensor) -> torch.Tensor:
    """Per-sequence lengths [B] -> cumulative offsets [B+1] int32 (flash-attn's varlen index)."""
    return F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


def _flash_dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """No mask: flash_attn_func on [B, N, H, hd] views, no packing and no copies of K/V."""
    out = flash_attn_module().flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=1.0 / math.sqrt(q.shape[3]),
    )  # [B, Nq, H, hd]
    return out.transpose(1, 2)  # [B, H, Nq, hd]


def _flash_varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Key-padding mask [B or 1, 1, 1, Nk] -> varlen with the real keys of each sample contiguous.

    Everything stays on the device with static shapes: a stable sort puts every real key (in
    sample order) before every padded one, so the first sum(k_lens) rows of the [B*Nk] buffer are
    the packed keys and the rest is never read (cu_seqlens_k ends before it)."""
    B, H, Nq, hd = q.shape
    Nk = k.shape[2]
    q_packed = q.transpose(1, 2).reshape(B * Nq, H, hd)  # [B*Nq, H, hd]: every query is real
    keep = mask[:, 0, 0, :].expand(B, Nk)  # [B, Nk]
    order = torch.argsort((~keep).reshape(-1).to(torch.uint8), stable=True)  # [B*Nk] real keys first
    k_packed = k.transpose(1, 2).reshape(B * Nk, H, hd).index_select(0, order)  # [B*Nk, H, hd]
    v_packed = v.transpose(1, 2).reshape(B * Nk, H, hd).index_select(0, order)  # [B*Nk, H, hd]
    k_lens = keep.sum(1, dtype=torch.int32)  # [B]
    q_lens = torch.full((B,), Nq, dtype=torch.int32, device=q.device)  # [B]
    out = flash_attn_module().flash_attn_varlen_func(
        q_packed, k_packed, v_packed,
        cu_seqlens_q=_cu_seqlens(q_lens), cu_seqlens_k=_cu_seqlens(k_lens),
        max_seqlen_q=Nq, max_seqlen_k=Nk,  # Nk bounds every sample's real keys: no read-back of k_lens.max()
        softmax_scale=1.0 / math.sqrt(hd),
    )  # [B*Nq, H, hd]
    # A sample with no real key: flash-attn returns zeros for an empty segment, as sdpa does.
    return out.reshape(B, Nq, H, hd).transpose(1, 2)  # [B, H, Nq, hd]


def _flash_packed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: PackedMask
) -> torch.Tensor:
    hd = q.shape[3]
    q_tok, k_tok, v_tok = (x[0].transpose(0, 1).contiguous() for x in (q, k, v))  # [ΣN, H, hd]: already packed
    out = flash_attn_module().flash_attn_varlen_func(
        q_tok, k_tok, v_tok,
        cu_seqlens_q=mask.cu_seqlens_q, cu_seqlens_k=mask.cu_seqlens_k,
        max_seqlen_q=mask.max_seqlen_q, max_seqlen_k=mask.max_seqlen_k,
        softmax_scale=1.0 / math.sqrt(hd),
    )  # [ΣNq, H, hd]
    return out.transpose(0, 1)[None]  # [1, H, ΣNq, hd]


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
