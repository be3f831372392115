"""dit_video/model/fused.py: each autograd Function against gradcheck (float64) and against the
unfused composition of plain torch ops it replaces; the whole model against a reference forward
written here with those plain ops (the pre-fusion implementation)."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from test_model import inputs, randomize_zero_init, tiny_config

from dit_video.model import DiT
from dit_video.model.attention import attention
from dit_video.model.blocks import CrossAttention, DiTBlock, FinalLayer, SelfAttention, maybe_rope, modulate
from dit_video.model.fused import layer_norm_modulate, qkv_heads, rms_norm
from dit_video.model.rope import rope_table

EPS = 1e-6


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(*shape, seed=0, dtype=torch.float64, scale=1.0):
    return (torch.randn(*shape, generator=_gen(seed), dtype=torch.float64) * scale).to(dtype).requires_grad_()


# ---- reference compositions (what the Functions replace) ----


def ref_layer_norm_modulate(x, shift, scale, eps=EPS):
    return modulate(F.layer_norm(x, (x.shape[-1],), eps=eps), shift, scale)


def ref_rms_norm(x, weight, eps=EPS):
    return F.rms_norm(x, (x.shape[-1],), weight.to(x.dtype), eps)


def ref_qkv_heads(qkv, q_weight, k_weight, rope, eps, num_heads):
    q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=num_heads).unbind(0)
    return maybe_rope(ref_rms_norm(q, q_weight, eps), rope), maybe_rope(ref_rms_norm(k, k_weight, eps), rope), v


# ---- gradcheck in float64 ----


@pytest.mark.parametrize("per_token", [False, True])
def test_layer_norm_modulate_gradcheck(per_token):
    x = _rand(2, 5, 8)
    mod_shape = (2, 5, 8) if per_token else (2, 1, 8)
    shift, scale = _rand(*mod_shape, seed=1), _rand(*mod_shape, seed=2)
    assert torch.autograd.gradcheck(lambda a, b, c: layer_norm_modulate(a, b, c, EPS), (x, shift, scale))


def test_rms_norm_gradcheck_on_a_transposed_view():
    x = _rand(2, 5, 3, 8).transpose(1, 2)  # [B, H, N, hd] view of token-major memory, as CrossAttention passes
    weight = _rand(8, seed=1)
    assert torch.autograd.gradcheck(lambda a, w: rms_norm(a, w, EPS), (x, weight))


@pytest.mark.parametrize("with_rope", [True, False])
def test_qkv_heads_gradcheck(with_rope):
    B, N, H, hd = 1, 4, 2, 8
    qkv = _rand(B, N, 3 * H * hd)
    q_weight, k_weight = _rand(hd, seed=1), _rand(hd, seed=2)
    rope = None
    if with_rope:
        rope = tuple(t.double() for t in rope_table((1, 2, 2), (2, 2, 4), 10000.0))  # N = 4, hd = 8
    assert torch.autograd.gradcheck(lambda a, qw, kw: qkv_heads(a, qw, kw, rope, EPS, H), (qkv, q_weight, k_weight))


# ---- equality with the unfused composition, values and gradients ----


def assert_matches_unfused(fused_fn, ref_fn, args, atol, rtol):
    """Run both on copies of args; backward a random cotangent; compare outputs and input gradients."""
    outs = []
    for fn in (fused_fn, ref_fn):
        leaves = [a.detach().clone().requires_grad_() if a is not None else None for a in args]
        out = fn(*leaves)
        out = out if isinstance(out, tuple) else (out,)
        cot = [torch.randn(o.shape, generator=_gen(7)).to(o.dtype) for o in out]
        torch.autograd.backward(out, cot)
        outs.append(([o.detach().float() for o in out], [a.grad.float() for a in leaves if a is not None]))
    (fo, fg), (ro, rg) = outs
    for a, b in zip(fo + fg, ro + rg, strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_norm_modulate_equals_unfused(dtype):
    x = _rand(2, 16, 32, dtype=torch.float32)  # the residual stream stays float32 under autocast
    shift, scale = _rand(2, 1, 32, seed=1, dtype=torch.float32), _rand(2, 1, 32, seed=2, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        assert_matches_unfused(lambda *a: layer_norm_modulate(*a, EPS), ref_layer_norm_modulate, (x, shift, scale), 1e-5, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qkv_heads_equals_unfused(dtype):
    B, H, grid, hd = 2, 4, (2, 4, 4), 16
    N = grid[0] * grid[1] * grid[2]
    qkv = _rand(B, N, 3 * H * hd, dtype=dtype)
    q_weight, k_weight = _rand(hd, seed=1, dtype=torch.float32), _rand(hd, seed=2, dtype=torch.float32)
    rope = rope_table(grid, (4, 6, 6), 10000.0)
    # bf16: the fused path rounds once, the reference after every op; a few bf16 ulps apart.
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert_matches_unfused(
        lambda a, qw, kw: qkv_heads(a, qw, kw, rope, EPS, H),
        lambda a, qw, kw: ref_qkv_heads(a, qw, kw, rope, EPS, H),
        (qkv, q_weight, k_weight), tol, tol,
    )


def test_rms_norm_equals_unfused():
    x, weight = _rand(2, 3, 10, 16, dtype=torch.float32), _rand(16, seed=1, dtype=torch.float32)
    assert_matches_unfused(lambda a, w: rms_norm(a, w, EPS), ref_rms_norm, (x, weight), 1e-5, 1e-5)


def test_qkv_heads_returns_token_major_views_so_merging_heads_is_free():
    B, N, H, hd = 1, 12, 2, 8
    q, k, v = qkv_heads(torch.randn(B, N, 3 * H * hd), torch.ones(hd), torch.ones(hd), None, EPS, H)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # [B, H, N, hd]
    assert q.shape == (B, H, N, hd) and q.transpose(1, 2).is_contiguous()
    # CPU SDPA allocates its output in q's layout: the head merge before the projection is a view.
    assert out.transpose(1, 2).is_contiguous()


# ---- the whole model against the pre-fusion forward, written with plain ops ----


def _ref_self_attention(self, x, rope, mask=None):
    qkv = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
    q, k, v = qkv.contiguous().unbind(0)
    q = maybe_rope(ref_rms_norm(q, self.q_norm.weight, self.q_norm.eps), rope)
    k = maybe_rope(ref_rms_norm(k, self.k_norm.weight, self.k_norm.eps), rope)
    out = self.attend(q, k, v, mask=mask, backend=self.backend)
    return self.proj(rearrange(out, "b h n d -> b n (h d)"))


def _ref_cross_attention(self, x, text, text_mask):
    H = self.num_heads
    q = rearrange(self.q(x), "b n (h d) -> b h n d", h=H).contiguous()
    k, v = rearrange(self.kv(text), "b l (two h d) -> two b h l d", two=2, h=H).contiguous().unbind(0)
    q, k = ref_rms_norm(q, self.q_norm.weight, self.q_norm.eps), ref_rms_norm(k, self.k_norm.weight, self.k_norm.eps)
    out = attention(q, k, v, mask=text_mask, backend=self.backend)
    return self.proj(rearrange(out, "b h n d -> b n (h d)"))


def _ref_block(self, x, t_mod, text, text_mask, rope, *, self_mask=None):
    mod = self.modulation + t_mod[:, None]
    shift_sa, scale_sa, gate_sa, shift_mlp, scale_mlp, gate_mlp = mod.unbind(-2)
    x = torch.addcmul(x, gate_sa, self.attn(modulate(self.norm1(x), shift_sa, scale_sa), rope, self_mask))
    x = x + self.cross_attn(self.norm2(x), text, text_mask)
    return torch.addcmul(x, gate_mlp, self.mlp(modulate(self.norm3(x), shift_mlp, scale_mlp)))


def _ref_final_layer(self, x, c):
    shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)
    return self.linear(modulate(self.norm(x), shift, scale))


def _use_reference_forward(model: DiT) -> DiT:
    ref = {
        SelfAttention: _ref_self_attention, CrossAttention: _ref_cross_attention, DiTBlock: _ref_block,
        FinalLayer: _ref_final_layer,
    }
    for m in model.modules():
        if type(m) in ref:
            m.forward = types.MethodType(ref[type(m)], m)
    return model


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_model_outputs_and_gradients_equal_the_unfused_model(backend, precision):
    cfg = tiny_config(attn_backend=backend)
    models = []
    for reference in (False, True):
        torch.manual_seed(0)
        model = randomize_zero_init(DiT(cfg))
        models.append(_use_reference_forward(model) if reference else model)
    fused, ref = models
    assert fused.state_dict().keys() == ref.state_dict().keys()
    x, t, text_emb, text_mask = inputs(cfg)
    results = []
    for model in (fused, ref):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(x, t, text_emb, text_mask)
        out.float().square().mean().backward()
        results.append((out.detach().float(), {n: p.grad for n, p in model.named_parameters()}))
    (out_f, grads_f), (out_r, grads_r) = results
    scale = out_r.abs().max()
    # fp32: the same math in another order. bf16: the fused path rounds fewer times than the reference.
    tol = 1e-5 if precision == "fp32" else 2e-2
    assert (out_f - out_r).abs().max() <= tol * scale
    grad_scale = max(g.abs().max() for g in grads_r.values())
    for name, g in grads_r.items():
        assert (grads_f[name] - g).abs().max() <= 10 * tol * grad_scale, name
