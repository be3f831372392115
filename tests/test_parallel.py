"""parallelize: checkpointing / compile / FSDP2 applied from outside leave outputs and grads unchanged."""

from __future__ import annotations

import copy

import pytest
import torch

from dit_video.model import DiT, DiTConfig
from dit_video.parallel import ParallelConfig, parallelize


def model_and_inputs():
    torch.manual_seed(0)
    cfg = DiTConfig(in_channels=4, text_dim=24, hidden_size=64, depth=2, num_heads=4)
    model = DiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.1)  # leave adaLN-Zero so outputs and grads are not trivially zero
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 3, 6, 8, generator=gen)
    t, text = torch.rand(2, generator=gen), torch.randn(2, 5, 24, generator=gen)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    return model, (x, t, text, mask)


def output_and_grads(model, args):
    model.zero_grad(set_to_none=True)
    out = model(*args)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(reference, other, atol=1e-6):
    out_a, grads_a = reference
    out_b, grads_b = other
    torch.testing.assert_close(out_b, out_a, atol=atol, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=atol, rtol=1e-4, msg=name)


def test_activation_checkpointing_keeps_outputs_grads_and_names():
    model, args = model_and_inputs()
    reference = output_and_grads(model, args)
    wrapped = parallelize(copy.deepcopy(model), ParallelConfig(activation_checkpointing=True))
    assert wrapped.state_dict().keys() == model.state_dict().keys()
    assert_same(reference, output_and_grads(wrapped, args))
    # It really recomputes: the block forward runs twice per step.
    calls = []
    wrapped.blocks[0].attn.register_forward_hook(lambda *a: calls.append(1))
    output_and_grads(wrapped, args)
    assert len(calls) == 2


def test_checkpointing_saves_less_memory():
    model, args = model_and_inputs()
    sizes = {}
    for ckpt in (False, True):
        m = parallelize(copy.deepcopy(model), ParallelConfig(activation_checkpointing=ckpt))
        saved: list[int] = []

        def pack(tensor, saved=saved):
            saved.append(tensor.numel())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m(*args)
        sizes[ckpt] = sum(saved)
    assert sizes[True] < 0.5 * sizes[False]


@pytest.mark.slow
def test_compile_keeps_outputs_and_grads():
    model, args = model_and_inputs()
    reference = output_and_grads(model, args)
    compiled = parallelize(copy.deepcopy(model), ParallelConfig(activation_checkpointing=True, compile=True))
    assert compiled.state_dict().keys() == model.state_dict().keys()
    assert_same(reference, output_and_grads(compiled, args), atol=1e-5)


def test_fsdp_single_rank_keeps_outputs_and_grads(tmp_path):
    import torch.distributed as dist

    model, args = model_and_inputs()
    reference = output_and_grads(model, args)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        sharded = parallelize(copy.deepcopy(model), ParallelConfig(fsdp=True, fsdp_param_dtype=None))
        out, grads = output_and_grads(sharded, args)
        grads = {n: g.full_tensor() for n, g in grads.items()}  # DTensor shards -> full
        assert_same(reference, (out, grads))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("variant", ["cross_attn", "cross_attn+adaln_zero", "mmdit", "mmdit+single_only"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_dit_traces_for_compile_without_graph_breaks(variant, precision):
    """`compile: true` compiles each block; a graph break splits it into pieces inductor cannot fuse
    across (model/fused.py's Functions once wrote into views with out=: 9 breaks per block, and a
    compiled step ran slower than diffusers' compiled one). dynamo.explain traces the forward and the
    Functions' backward without compiling."""
    import torch._dynamo
    from test_model import randomize_zero_init, tiny_config
    from test_model_variants import VARIANTS, inputs

    cfg = tiny_config(**({} if variant == "cross_attn" else VARIANTS[variant]))  # cross_attn: the defaults
    model, args = randomize_zero_init(DiT(cfg)), inputs(cfg)
    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        explanation = torch._dynamo.explain(model)(**args)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_fsdp_bf16_weights_give_the_timestep_embedding_fp32_t_as_ddp_does(tmp_path):
    """FSDP2's MixedPrecisionPolicy(param_dtype=bf16) cast every floating input of the root, t
    included (~128 distinct values in [0.5, 1)), while the objective and sampler use fp32 t. The
    timestep embedding must see what it sees under DDP: the same fp32 t. (One gloo process: the
    casting is per process; the bf16 compute runs on CPU kernels here, CUDA's on a GPU.)"""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model, args = model_and_inputs()
    t = torch.linspace(0.5, 1.0, 2) + torch.tensor([1e-4, -3e-4])  # between bf16 steps (1/128 apart here)
    args = (args[0], t, *args[2:])
    seen: dict[str, torch.Tensor] = {}

    def record(name):
        return lambda module, inputs: seen.setdefault(name, inputs[0].detach().clone())

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        ddp_model = copy.deepcopy(model)
        ddp_model.t_embedder.register_forward_pre_hook(record("ddp"))
        DistributedDataParallel(ddp_model)(*args)
        sharded = parallelize(copy.deepcopy(model), ParallelConfig(fsdp=True, fsdp_param_dtype="bfloat16"))
        sharded.t_embedder.register_forward_pre_hook(record("fsdp"))
        out = sharded(*args)
    finally:
        dist.destroy_process_group()
    assert seen["fsdp"].dtype == seen["ddp"].dtype == torch.float32
    assert torch.equal(seen["fsdp"], seen["ddp"])
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()  # the rest still computes in bf16
