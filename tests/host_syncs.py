"""Count the operations that make the host wait for the GPU, on CPU.

On CUDA, `.item()`, `int(t)`, `bool(t)` and every op whose output size depends on tensor values
(`nonzero`, boolean-mask indexing, `masked_select`, `repeat_interleave` without `output_size`,
`unique`) copy a value to the host and stall the stream; they all end in
`aten._local_scalar_dense` there. On CPU only the first group dispatches `_local_scalar_dense`
(the others read memory directly), so `HostSyncCounter` counts both: `_local_scalar_dense` and
the data-dependent-size ops by name. It is a TorchDispatchMode, so it sees forward and backward.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_ALWAYS = {"_local_scalar_dense", "nonzero", "nonzero_static", "masked_select", "unique", "_unique",
           "_unique2", "unique_consecutive", "unique_dim", "equal", "is_nonzero"}
_TENSOR_REPEATS = {"aten.repeat_interleave.Tensor", "aten.repeat_interleave.self_Tensor"}  # repeats read from a tensor


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (indices or ()))


class HostSyncCounter(TorchDispatchMode):
    """`with HostSyncCounter() as syncs: ...` then `syncs.counts` ({op name: calls}) and `syncs.total`."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        syncs = (name in _ALWAYS
                 or (name in ("index", "index_put", "index_put_", "_index_put_impl_") and _has_bool_index(args))
                 or (str(func) in _TENSOR_REPEATS and kwargs.get("output_size") is None))
        if syncs:
            self.counts[str(func)] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.counts.values())
