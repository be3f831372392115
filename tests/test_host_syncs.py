"""No host syncs in the step: the DiT's forward + backward, for every model variant and attention
backend, reads no value back from the device (0 `aten._local_scalar_dense` and no op whose output
size depends on tensor values; tests/host_syncs.py says why both are counted on CPU).

A host sync stalls the CUDA stream every layer; on 8 GPUs it also desynchronises the ranks'
NCCL launches. flash runs through the flash_attn stand-in (tests/fake_flash_attn.py) under bf16
autocast, as on a GPU; the real kernels are beyond a CPU test. `DiT.forward` (unpacked batches,
per-sample or per-frame t) has none; `DiT.forward_packed` has exactly one per step, by design: it
compacts the captions to their real tokens, a count only the text mask knows.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from fake_flash_attn import install_fake_flash  # flash_attn stand-in in sys.modules
from host_syncs import HostSyncCounter
from test_model import tiny_config
from test_model_variants import VARIANTS, inputs
from test_packing import batch, tiny_dit

from dit_video.model import DiT

CONFIGS = {"cross_attn": {}, **VARIANTS}
BACKENDS = ("sdpa", "math", "flash")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", [*CONFIGS, "per_frame_t"])
def test_no_host_syncs_in_the_dit_forward_and_backward(monkeypatch, name, backend):
    calls = install_fake_flash(monkeypatch) if backend == "flash" else []
    cfg = tiny_config(**CONFIGS.get(name, {}), attn_backend=backend)
    torch.manual_seed(0)
    model = DiT(cfg)
    args = inputs(cfg)  # the second caption is padded: key-padding masks in cross/joint attention
    if name == "per_frame_t":  # diffusion forcing: one t per latent frame
        args["t"] = torch.rand(args["x"].shape[0], args["x"].shape[2])  # [B, T]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if backend == "flash" else contextlib.nullcontext()
    with HostSyncCounter() as syncs, autocast:
        model(**args).float().square().mean().backward()
    assert syncs.total == 0, dict(syncs.counts)
    assert all(p.grad is not None for p in model.parameters())
    if backend == "flash":  # the flash kernels ran (not an sdpa fallback): dense self-attention, varlen text
        used = {fn for fn, _ in calls}
        assert used == ({"flash_attn_varlen_func"} if cfg.conditioning == "mmdit"
                        else {"flash_attn_func", "flash_attn_varlen_func"}), used


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["cross_attn", "mmdit"])
def test_a_packed_step_syncs_once_for_the_caption_lengths(monkeypatch, name, backend):
    """Before: 11 per packed step (each clip's lengths and maxima read back to build the masks)."""
    calls = install_fake_flash(monkeypatch) if backend == "flash" else []
    model = tiny_dit(backend, **({} if name == "cross_attn" else VARIANTS["mmdit"]))
    latents, t, text_emb, text_mask = batch()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if backend == "flash" else contextlib.nullcontext()
    with HostSyncCounter() as syncs, autocast:
        out = model.forward_packed(latents, t, text_emb, text_mask)
        sum(o.float().square().mean() for o in out).backward()
    assert dict(syncs.counts) == {"aten.nonzero.default": 1}
    assert bool(calls) == (backend == "flash")
