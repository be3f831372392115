"""NaViT-style packing: clips of different (T, H, W) in one token sequence give their solo outputs."""

from __future__ import annotations

import pytest
import torch
from fake_flash_attn import install_fake_flash  # flash_attn stand-in in sys.modules
from test_model_variants import VARIANTS  # the model-variant configs the solo-forward tests use

from dit_video.model import attention as attn_mod
from dit_video.model.attention import PackedMask, attention
from dit_video.model.config import DiTConfig
from dit_video.model.dit import DiT
from dit_video.model.mmdit import JointPacking
from dit_video.model.packing import patchify_packed, unpatchify_packed
from dit_video.model.rope import packed_rope_table, rope_table

SHAPES = [(2, 4, 6), (3, 6, 4), (1, 2, 2)]  # latent (T, H, W) of the three clips
CAPTION_LENGTHS = [5, 2, 3]  # real text tokens per clip (padded to the longest)
MMDIT = {  # joint attention: dual- and single-stream blocks, both modulations, with and without pooled text
    "mmdit": VARIANTS["mmdit"],
    "mmdit+adaln_zero": VARIANTS["mmdit+adaln_zero"],
    "mmdit+single_only": VARIANTS["mmdit+single_only"],
    "mmdit+pooled+sincos": VARIANTS["mmdit+pooled+sincos"],
    "mmdit+adaln_zero+pooled": {**VARIANTS["mmdit+adaln_zero"], "pooled_text_dim": 10},
}


def tiny_dit(backend: str, **variant) -> DiT:
    cfg = DiTConfig(in_channels=4, text_dim=8, hidden_size=32, depth=2, num_heads=2, patch_size=(1, 2, 2),
                    attn_backend=backend, **variant)
    torch.manual_seed(0)
    model = DiT(cfg)
    # adaLN-Zero makes the initial model output exactly zero: randomise every parameter so the
    # comparison exercises attention, modulation and the final layer.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def batch(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    latents = [torch.randn(4, *shape, generator=gen) for shape in SHAPES]
    t = torch.rand(len(SHAPES), generator=gen)  # [B]
    L = max(CAPTION_LENGTHS)
    text_emb = torch.randn(len(SHAPES), L, 8, generator=gen)  # [B, L, Dt]
    text_mask = torch.arange(L)[None] < torch.tensor(CAPTION_LENGTHS)[:, None]  # [B, L]
    return latents, t, text_emb, text_mask


def assert_packed_matches_solo(model: DiT, latents, t, text_emb, text_mask, pooled=None) -> None:
    """forward_packed on all clips gives each clip's solo forward() output and, for a sum-of-squares
    loss, the same parameter gradients (fp32, 1e-5)."""
    packed = model.forward_packed(latents, t, text_emb, text_mask, pooled)
    loss_packed = sum((out**2).sum() for out in packed)
    grads_packed = torch.autograd.grad(loss_packed, list(model.parameters()))

    solo = [
        model(x[None], t[i : i + 1], text_emb[i : i + 1], text_mask[i : i + 1],
              None if pooled is None else pooled[i : i + 1])[0]  # [C, T, H, W]
        for i, x in enumerate(latents)
    ]
    loss_solo = sum((out**2).sum() for out in solo)
    grads_solo = torch.autograd.grad(loss_solo, list(model.parameters()))

    for p, s, x in zip(packed, solo, latents, strict=True):
        assert p.shape == x.shape
        torch.testing.assert_close(p, s, atol=1e-5, rtol=1e-5)
    assert solo[0].abs().mean() > 1e-2  # the comparison is not between zeros
    for (name, _), gp, gs in zip(model.named_parameters(), grads_packed, grads_solo, strict=True):
        # fp32 tolerance relative to the gradient's scale (entries reach ~1e2 with these weights;
        # the two paths sum the same terms in another order).
        scale = gs.abs().max()
        assert scale > 0, name
        assert (gp - gs).abs().max() <= 1e-5 * scale, f"{name}: {(gp - gs).abs().max() / scale:.2e} of max |grad|"


def test_patchify_packed_round_trip_and_order():
    latents, *_ = batch()
    tokens, packing = patchify_packed(latents, (1, 2, 2))
    assert packing.grids == ((2, 2, 3), (3, 3, 2), (1, 1, 1))
    assert tokens.shape == (1, sum(packing.lengths), 4 * 4)
    assert packing.seq_id().tolist() == [0] * 12 + [1] * 18 + [2] * 1
    back = unpatchify_packed(tokens, packing, (1, 2, 2), 4)
    for x, y in zip(latents, back, strict=True):
        assert torch.equal(x, y)


def test_packed_rope_restarts_every_clip():
    grids = [(2, 2, 3), (1, 3, 2)]
    cos, sin = packed_rope_table(grids, (4, 6, 6), 10000.0)
    solo = [rope_table(g, (4, 6, 6), 10000.0) for g in grids]
    assert torch.equal(cos, torch.cat([c for c, _ in solo])) and torch.equal(sin, torch.cat([s for _, s in solo]))
    assert torch.equal(cos[12], cos[0])  # second clip's first token sits at position (0, 0, 0) again


def test_packed_mask_is_block_diagonal():
    mask = PackedMask(torch.tensor([2, 1]), torch.tensor([1, 3])).dense()
    expected = torch.tensor([[1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask[0, 0], expected)


@pytest.mark.parametrize("backend", ["sdpa", "math", "flash"])
def test_packed_forward_and_grads_match_per_sample(backend):
    """The acceptance test: three clips of different (T, H, W) and caption lengths, packed, give the
    outputs and parameter gradients of three solo forward() calls (fp32, 1e-5)."""
    assert_packed_matches_solo(tiny_dit(backend), *batch())


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("name", list(MMDIT))
def test_mmdit_packed_forward_and_grads_match_per_sample(name, backend):
    """MMDiT's joint attention, packed: each clip attends over its own [real caption tokens, video
    tokens] only and its text stream takes its own t (and pooled vector), so outputs and gradients
    are the three solo forward() calls' (captions of different real lengths, clips of different
    (T, H, W), every parameter random)."""
    model = tiny_dit(backend, **MMDIT[name])
    latents, t, text_emb, text_mask = batch(seed=4)
    P = model.cfg.pooled_text_dim
    pooled = torch.randn(len(latents), P, generator=torch.Generator().manual_seed(5)) if P else None
    assert_packed_matches_solo(model, latents, t, text_emb, text_mask, pooled)


def test_joint_packing_orders_text_and_video_of_each_clip_together():
    """[all text, all video] -> [text_0, video_0, text_1, video_1, ...] and back; a clip without
    caption tokens is a video-only segment."""
    joint = JointPacking(torch.tensor([2, 0, 1]), torch.tensor([1, 2, 1]))
    # joint positions: text 0 1 (clip 0), 2 (clip 2); video 3 (clip 0), 4 5 (clip 1), 6 (clip 2)
    assert joint.order.tolist() == [0, 1, 3, 4, 5, 2, 6]
    assert torch.equal(joint.order[joint.inverse], torch.arange(7))
    assert joint.mask.cu_seqlens_q.tolist() == joint.mask.cu_seqlens_k.tolist() == [0, 3, 5, 7]


def test_packed_forward_rejects_per_frame_t():
    model = tiny_dit("sdpa", **VARIANTS["mmdit"])
    latents, t, text_emb, text_mask = batch()
    with pytest.raises(ValueError, match=r"t must be \[B\], one per clip"):
        model.forward_packed(latents, t[:, None].expand(-1, 2), text_emb, text_mask)


@pytest.mark.parametrize("name", ["cross_attn", "mmdit"])
def test_packed_forward_without_text_mask_and_empty_caption(name):
    """text_mask=None means every text token is real; a caption with no real token gives zero
    cross-attention for its clip (MMDiT: a video-only joint attention) in both paths."""
    model = tiny_dit("sdpa", **({} if name == "cross_attn" else VARIANTS[name]))
    latents, t, text_emb, text_mask = batch(seed=2)
    for mask in (None, text_mask.clone().index_fill_(0, torch.tensor([1]), False)):
        with torch.no_grad():
            packed = model.forward_packed(latents, t, text_emb, mask)
            for i, x in enumerate(latents):
                solo_mask = None if mask is None else mask[i : i + 1]
                solo = model(x[None], t[i : i + 1], text_emb[i : i + 1], solo_mask)[0]
                torch.testing.assert_close(packed[i], solo, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", [
    {"modulation": "adaln_zero"},
    {"pos_embed": "sincos"},
    {"pos_embed": "learned", "max_grid": (3, 3, 3)},
    {"pooled_text_dim": 6},
])
def test_packed_forward_matches_per_sample_for_model_variants(variant):
    model = tiny_dit("sdpa", **variant)
    latents, t, text_emb, text_mask = batch(seed=3)
    pooled = torch.randn(len(latents), 6) if variant.get("pooled_text_dim") else None
    with torch.no_grad():
        packed = model.forward_packed(latents, t, text_emb, text_mask, pooled)
        for i, x in enumerate(latents):
            solo = model(x[None], t[i : i + 1], text_emb[i : i + 1], text_mask[i : i + 1],
                         None if pooled is None else pooled[i : i + 1])[0]
            torch.testing.assert_close(packed[i], solo, atol=1e-5, rtol=1e-5)


def fake_flash_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale):
    """Pure-torch stand-in with flash_attn_varlen_func's contract ([total, H, hd] + cu_seqlens)."""
    out = torch.zeros_like(q)
    for i in range(len(cu_seqlens_q) - 1):
        qs, qe, ks, ke = (int(c) for c in (cu_seqlens_q[i], cu_seqlens_q[i + 1], cu_seqlens_k[i], cu_seqlens_k[i + 1]))
        assert qe - qs <= max_seqlen_q and ke - ks <= max_seqlen_k
        if ke > ks:
            scores = torch.einsum("qhd,khd->hqk", q[qs:qe], k[ks:ke]) * softmax_scale
            out[qs:qe] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[ks:ke])
    return out


def test_flash_packed_dispatch_uses_cu_seqlens(monkeypatch):
    """Pretend flash-attn can run: a PackedMask goes to varlen with the segments' cu_seqlens (no
    dense mask is built) and reproduces the dense block-diagonal math result."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 7, 8, generator=gen)
    k, v = torch.randn(2, 1, 2, 5, 8, generator=gen).unbind(0)
    mask = PackedMask(torch.tensor([3, 4, 0]), torch.tensor([2, 0, 3]))  # clip 1 has no caption token
    reference = attention(q, k, v, mask.dense(), backend="math")

    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs["cu_seqlens_k"].tolist())
        return fake_flash_varlen(*args, **kwargs)

    install_fake_flash(monkeypatch, flash_attn_varlen_func=spy)
    monkeypatch.setattr(attn_mod, "flash_can_run", lambda q: True)
    fresh = PackedMask(torch.tensor([3, 4, 0]), torch.tensor([2, 0, 3]))
    out = attention(q, k, v, fresh, backend="flash")
    assert calls == [[0, 2, 2, 5]]
    assert fresh._dense is None  # the varlen path never materialises ΣN x ΣN
    torch.testing.assert_close(out, reference, atol=1e-6, rtol=1e-6)
    assert out[0, :, 3:7].abs().max() == 0  # the segment without keys outputs zeros


@pytest.mark.parametrize("objective", [
    {"kind": "rectified_flow", "shift": 2.0, "shift_base_tokens": 16},  # per-sample shift from its own tokens
    {"kind": "vp", "target": "v", "loss_weighting": "min_snr", "cond_first_frame": 0.5, "cond_prefix": 0.5},
    {"kind": "edm", "target": "edm"},
])
def test_packed_loss_is_the_mean_of_per_sample_bucket_losses(objective):
    """Objective.loss_packed on three clips of different sizes = the mean of `loss` on each clip
    alone (bucket mode, batch of one) with the same noise, t and conditioning frames, and so are
    the gradients."""
    from dit_video.diffusion import build_objective

    model = tiny_dit("sdpa")
    obj = build_objective(objective)
    latents, _, text_emb, text_mask = batch()
    loss, aux = obj.loss_packed(model, latents, text_emb, text_mask, generator=torch.Generator().manual_seed(0))
    grads = torch.autograd.grad(loss, list(model.parameters()))

    gen = torch.Generator().manual_seed(0)  # drawn sample by sample, in the same order
    solo = [obj.loss(model, x[None], text_emb[i : i + 1], text_mask[i : i + 1], generator=gen)
            for i, x in enumerate(latents)]
    reference = torch.stack([s_loss for s_loss, _ in solo]).mean()
    ref_grads = torch.autograd.grad(reference, list(model.parameters()))

    torch.testing.assert_close(aux["t"], torch.cat([s_aux["t"] for _, s_aux in solo]))
    if objective.get("shift_base_tokens"):
        assert aux["t"].unique().numel() == 3
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    assert loss > 0
    if objective.get("cond_first_frame"):
        solo_masks = [s_aux["cond_mask"][0] for _, s_aux in solo]
        assert torch.equal(aux["cond_mask"], torch.cat(solo_masks))
    for (name, _), gp, gs in zip(model.named_parameters(), grads, ref_grads, strict=True):
        scale = gs.abs().max()
        assert (gp - gs).abs().max() <= 1e-5 * scale + 1e-8, name


@pytest.mark.parametrize("name", ["cross_attn", "mmdit"])
def test_packed_model_on_the_flash_varlen_path_matches_per_sample(monkeypatch, name):
    """The whole packed forward with flash-attn's varlen contract (CPU stand-in): every self- and
    cross-attention call (MMDiT: every joint attention, over [text_i, video_i] segments) goes
    through cu_seqlens, no dense mask is built, and the clips still get their solo outputs."""
    model = tiny_dit("flash", **({} if name == "cross_attn" else VARIANTS[name]))
    latents, t, text_emb, text_mask = batch()
    with torch.no_grad():
        solo = [model(x[None], t[i : i + 1], text_emb[i : i + 1], text_mask[i : i + 1])[0] for i, x in enumerate(latents)]
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs["cu_seqlens_k"].tolist())
        return fake_flash_varlen(*args, **kwargs)

    def no_dense(self):
        raise AssertionError("the flash path built a dense packing mask")

    install_fake_flash(monkeypatch, flash_attn_varlen_func=spy)
    monkeypatch.setattr(attn_mod, "flash_can_run", lambda q: True)
    monkeypatch.setattr(PackedMask, "dense", no_dense)
    with torch.no_grad():
        packed = model.forward_packed(latents, t, text_emb, text_mask)
    video = [0, 12, 30, 31]  # cumulative tokens of the clips' (2, 2, 3), (3, 3, 2), (1, 1, 1) grids
    if name == "cross_attn":  # depth 2 x (self, cross)
        assert calls == [video, [0, 5, 7, 10]] * 2
    else:  # depth 2 x joint attention over caption + video tokens
        assert calls == [[0, 5 + 12, 5 + 12 + 2 + 18, 5 + 12 + 2 + 18 + 3 + 1]] * 2
    for p, s in zip(packed, solo, strict=True):
        torch.testing.assert_close(p, s, atol=1e-5, rtol=1e-5)
