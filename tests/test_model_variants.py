"""DiT variants chosen by config: MMDiT joint attention, per-block adaLN-Zero, pooled text, absolute positions."""

from __future__ import annotations

import copy

import pytest
import torch
from test_model import randomize_zero_init, tiny_config  # the same tiny sizes as the base model's tests

from dit_video.model import DiT, DiTConfig
from dit_video.model.mmdit import DualStreamBlock, SingleStreamBlock
from dit_video.model.pos_embed import sincos_1d, sincos_3d, sincos_axes_dim
from dit_video.parallel import ParallelConfig, parallelize

VARIANTS = {
    "cross_attn+adaln_zero": dict(modulation="adaln_zero"),
    "mmdit": dict(conditioning="mmdit", num_dual_blocks=1),
    "mmdit+adaln_zero": dict(conditioning="mmdit", num_dual_blocks=1, modulation="adaln_zero"),
    "mmdit+single_only": dict(conditioning="mmdit", num_dual_blocks=0),
    "pooled": dict(pooled_text_dim=10),
    "mmdit+pooled+sincos": dict(conditioning="mmdit", num_dual_blocks=1, pooled_text_dim=10, pos_embed="sincos"),
    "sincos": dict(pos_embed="sincos"),
    "learned": dict(pos_embed="learned", max_grid=(6, 4, 6)),
}


def inputs(cfg: DiTConfig, shape=(2, 5, 6, 10), text_len=7, seed=0) -> dict:
    """Model kwargs with the second sample's caption padded after 3 tokens (and a pooled vector if configured)."""
    gen = torch.Generator().manual_seed(seed)
    B, T, H, W = shape
    args = dict(
        x=torch.randn(B, cfg.in_channels, T, H, W, generator=gen),
        t=torch.rand(B, generator=gen),
        text_emb=torch.randn(B, text_len, cfg.text_dim, generator=gen),
        text_mask=torch.ones(B, text_len, dtype=torch.bool),
    )
    args["text_mask"][-1, 3:] = False
    if cfg.pooled_text_dim:
        args["pooled"] = torch.randn(B, cfg.pooled_text_dim, generator=gen)
    return args


# ---------------------------------------------------------------- every variant


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_shapes_zero_init_and_structure(name):
    cfg = tiny_config(**VARIANTS[name])
    model = DiT(cfg)
    args = inputs(cfg, shape=(2, 5, 6, 10))
    out = model(**args)
    assert out.shape == args["x"].shape
    assert torch.equal(out, torch.zeros_like(out))  # adaLN-Zero init holds for every variant
    out = randomize_zero_init(model)(**args)
    assert torch.isfinite(out).all() and out.abs().max() > 0
    kinds = [type(b) for b in model.blocks]
    if cfg.conditioning == "mmdit":
        n = cfg.num_dual_blocks
        assert kinds == [DualStreamBlock] * n + [SingleStreamBlock] * (cfg.depth - n)
    assert hasattr(model, "t_block") == (cfg.modulation == "adaln_single")


@pytest.mark.parametrize("name", ["cross_attn+adaln_zero", "mmdit", "mmdit+adaln_zero", "mmdit+pooled+sincos", "learned"])
def test_variant_trains_and_loss_falls(name):
    """30 AdamW steps on one fixed batch of a rectified-flow regression: the loss falls and every
    parameter receives gradient (catches dead modules, e.g. a stream whose output is never used)."""
    torch.manual_seed(0)
    cfg = tiny_config(**VARIANTS[name])
    model = DiT(cfg)
    args = inputs(cfg, shape=(2, 3, 4, 6), text_len=5)
    x0, noise = args.pop("x"), torch.randn(2, cfg.in_channels, 3, 4, 6, generator=torch.Generator().manual_seed(1))
    t = args.pop("t")
    x_t = (1 - t)[:, None, None, None, None] * x0 + t[:, None, None, None, None] * noise
    target = noise - x0
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        opt.zero_grad()
        loss = (model(x_t, t, **args) - target).pow(2).mean()
        loss.backward()
        if step == 3:
            dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
            assert not dead, f"parameters with no gradient: {dead}"
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.7 * first, f"loss {first:.3f} -> {last:.3f}"


@pytest.mark.parametrize("name", ["mmdit", "mmdit+adaln_zero", "cross_attn+adaln_zero"])
def test_activation_checkpointing_keeps_outputs_and_grads(name):
    """parallelize wraps every block (dual- and single-stream alike): outputs, grads and names unchanged."""
    cfg = tiny_config(**VARIANTS[name])
    torch.manual_seed(0)
    model = randomize_zero_init(DiT(cfg))
    args = inputs(cfg)

    def output_and_grads(m):
        m.zero_grad(set_to_none=True)
        out = m(**args)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}

    out_a, grads_a = output_and_grads(model)
    wrapped = parallelize(copy.deepcopy(model), ParallelConfig(activation_checkpointing=True))
    assert wrapped.state_dict().keys() == model.state_dict().keys()
    calls = []
    for block in wrapped.blocks:
        block.register_forward_pre_hook(lambda *a: calls.append(1))
    out_b, grads_b = output_and_grads(wrapped)
    assert len(calls) == 2 * cfg.depth  # every block recomputed in backward, not only the first kind
    torch.testing.assert_close(out_b, out_a, atol=1e-6, rtol=1e-5)
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], atol=1e-6, rtol=1e-4, msg=n)


@pytest.mark.slow
def test_compile_keeps_mmdit_outputs():
    cfg = tiny_config(**VARIANTS["mmdit"])
    model = randomize_zero_init(DiT(cfg))
    args = inputs(cfg)
    reference = model(**args)
    compiled = parallelize(copy.deepcopy(model), ParallelConfig(activation_checkpointing=True, compile=True))
    torch.testing.assert_close(compiled(**args), reference, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- MMDiT


@pytest.mark.parametrize("name", ["mmdit", "mmdit+single_only"])
def test_mmdit_ignores_padded_text_tokens(name):
    cfg = tiny_config(**VARIANTS[name])
    model = randomize_zero_init(DiT(cfg))
    args = inputs(cfg)
    out = model(**args)
    mask = args["text_mask"]
    changed = args["text_emb"].clone()
    changed[~mask] = torch.randn(int((~mask).sum()), cfg.text_dim) * 10
    torch.testing.assert_close(model(**{**args, "text_emb": changed}), out, atol=1e-6, rtol=1e-6)
    # ... while a real token does matter, and an all-true mask equals passing no mask.
    changed[1, 0] += 1.0
    assert not torch.allclose(model(**{**args, "text_emb": changed})[1], out[1])
    args_full = {**args, "text_mask": torch.ones_like(mask)}
    torch.testing.assert_close(model(**args_full), model(**{**args, "text_mask": None}))


def test_mmdit_math_and_sdpa_backends_agree():
    cfg = tiny_config(**VARIANTS["mmdit"])
    sdpa = randomize_zero_init(DiT(cfg))
    math_model = DiT(tiny_config(**VARIANTS["mmdit"], attn_backend="math"))
    math_model.load_state_dict(sdpa.state_dict())
    args = inputs(cfg)
    torch.testing.assert_close(sdpa(**args), math_model(**args), atol=1e-5, rtol=1e-5)


def test_mmdit_rope_only_on_video_tokens():
    """Text tokens carry no position: permuting the real text tokens of a caption (and its mask)
    leaves the output unchanged, as set attention over unpositioned keys should. Video tokens do
    carry position through RoPE: the same content in another frame order gives another output."""
    cfg = tiny_config(**VARIANTS["mmdit"])
    model = randomize_zero_init(DiT(cfg))
    args = inputs(cfg)
    out = model(**args)
    perm = torch.tensor([2, 0, 1, 5, 3, 6, 4])
    permuted = {**args, "text_emb": args["text_emb"][:, perm], "text_mask": args["text_mask"][:, perm]}
    torch.testing.assert_close(model(**permuted), out, atol=1e-5, rtol=1e-5)
    flipped = {**args, "x": args["x"].flip(2)}
    assert not torch.allclose(model(**flipped).flip(2), out, atol=1e-4)


# ---------------------------------------------------------------- pooled text vector


def test_pooled_vector_changes_the_output_and_is_required():
    cfg = tiny_config(**VARIANTS["pooled"])
    model = randomize_zero_init(DiT(cfg))
    args = inputs(cfg)
    out = model(**args)
    other = {**args, "pooled": args["pooled"].flip(0)}
    assert not torch.allclose(model(**other), out)
    with pytest.raises(ValueError, match="pooled_text_dim=10"):
        model(**{**args, "pooled": None})
    plain = DiT(tiny_config())
    with pytest.raises(ValueError, match="pooled_text_dim=0"):
        plain(**inputs(plain.cfg), pooled=torch.randn(2, 10))


# ---------------------------------------------------------------- absolute positions


def test_sincos_3d_is_the_per_axis_1d_embedding():
    """Token (t, h, w) holds [sincos(t) | sincos(h) | sincos(w)] in chunks of sincos_axes_dim(D)."""
    grid, dim = (3, 4, 5), 64
    table = sincos_3d(grid, dim)
    assert table.shape == (60, 64)
    dt, dh, dw = sincos_axes_dim(dim)
    assert dt + dh + dw == dim and dt % 2 == dh % 2 == 0
    t, h, w = 2, 1, 3
    n = (t * 4 + h) * 5 + w
    expected = torch.cat([sincos_1d(torch.tensor([float(p)]), d)[0] for p, d in ((t, dt), (h, dh), (w, dw))])
    torch.testing.assert_close(table[n], expected)
    assert len({tuple(row.tolist()) for row in table}) == 60  # every position distinct


def test_sincos_works_at_any_grid_size():
    cfg = tiny_config(pos_embed="sincos")
    model = randomize_zero_init(DiT(cfg))
    for shape in ((1, 1, 2, 2), (1, 9, 12, 4)):
        args = inputs(cfg, shape=shape)
        assert model(**args).shape == args["x"].shape
    assert not any("pos" in n for n, _ in model.named_parameters())  # nothing learned


def test_learned_pos_embed_uses_corner_and_errors_beyond_max_grid():
    cfg = tiny_config(pos_embed="learned", max_grid=(3, 2, 4))
    model = randomize_zero_init(DiT(cfg))
    assert model.pos_embed.table.shape == (3, 2, 4, cfg.hidden_size)
    # A grid smaller than max_grid reads the table's corner (raster order).
    torch.testing.assert_close(model.pos_embed((2, 1, 3)), model.pos_embed.table[:2, :1, :3].reshape(6, -1))
    assert model(**inputs(cfg, shape=(1, 3, 4, 8))).shape == (1, 4, 3, 4, 8)  # exactly max_grid
    msg = r"token grid \(3, 2, 5\) exceeds model.max_grid=\(3, 2, 4\) along W"
    with pytest.raises(ValueError, match=msg):
        model(**inputs(cfg, shape=(1, 3, 4, 10)))
    with pytest.raises(ValueError, match=msg):
        cfg.validate((3, 4, 10))


def test_positions_matter_for_every_pos_embed():
    """With any pos_embed, the same patch content at another place gives another output there."""
    for overrides in (dict(), dict(pos_embed="sincos"), dict(pos_embed="learned", max_grid=(5, 3, 5))):
        cfg = tiny_config(**overrides)
        model = randomize_zero_init(DiT(cfg))
        args = inputs(cfg)
        out = model(**args)
        rolled = model(**{**args, "x": args["x"].roll(1, dims=2)}).roll(-1, dims=2)
        assert not torch.allclose(rolled, out, atol=1e-4), overrides
