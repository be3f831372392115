"""dit_video.model at tiny scale: round trips, RoPE algebra, backends, adaLN-Zero, masking, presets."""

from __future__ import annotations

import pytest
import torch

from dit_video.model import DIT_PRESETS, DiT, DiTConfig, dit_config, patchify, unpatchify
from dit_video.model.attention import attention
from dit_video.model.patch import PatchEmbed
from dit_video.model.rope import apply_rope, rope_angles, rope_table


def tiny_config(**overrides) -> DiTConfig:
    """A 2-block model, head_dim 16, small enough that every test runs in well under a second."""
    fields = dict(in_channels=4, text_dim=24, hidden_size=64, depth=2, num_heads=4, patch_size=(1, 2, 2))
    return DiTConfig(**{**fields, **overrides})


def randomize_zero_init(model: DiT, seed: int = 0) -> DiT:
    """Give the zero-initialised (adaLN-Zero) parameters random values so the output depends on everything."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def inputs(cfg: DiTConfig, shape=(2, 5, 6, 10), text_len=7, seed=0):
    """(x, t, text_emb, text_mask) with the second sample's caption padded after 3 tokens."""
    gen = torch.Generator().manual_seed(seed)
    B, T, H, W = shape
    x = torch.randn(B, cfg.in_channels, T, H, W, generator=gen)
    t = torch.rand(B, generator=gen)
    text_emb = torch.randn(B, text_len, cfg.text_dim, generator=gen)
    text_mask = torch.ones(B, text_len, dtype=torch.bool)
    text_mask[-1, 3:] = False
    return x, t, text_emb, text_mask


# ---------------------------------------------------------------- patchify


@pytest.mark.parametrize(
    "patch_size, shape",
    [((1, 2, 2), (5, 6, 10)), ((2, 2, 2), (6, 6, 10)), ((1, 1, 1), (5, 6, 10)), ((1, 4, 2), (5, 8, 10))],
)
def test_patchify_round_trip(patch_size, shape):
    x = torch.randn(2, 3, *shape)
    tokens = patchify(x, patch_size)
    grid = tuple(n // p for n, p in zip(shape, patch_size, strict=True))
    assert tokens.shape == (2, grid[0] * grid[1] * grid[2], 3 * patch_size[0] * patch_size[1] * patch_size[2])
    assert torch.equal(unpatchify(tokens, patch_size, grid, channels=3), x)


def test_patchify_token_layout():
    """Token n is the patch at raster position (t, h, w) and holds its values in (c, pt, ph, pw) order."""
    x = torch.randn(1, 3, 4, 6, 4)
    tokens = patchify(x, (2, 2, 2))  # grid (2, 3, 2)
    t, h, w = 1, 2, 0
    n = (t * 3 + h) * 2 + w
    assert torch.equal(
        tokens[0, n], x[0, :, 2 * t : 2 * t + 2, 2 * h : 2 * h + 2, 2 * w : 2 * w + 2].reshape(-1)
    )


def test_patch_embed_equals_conv3d():
    """The Linear patch embedding is a Conv3d(kernel=stride=patch) with the weight viewed [D, C*pt*ph*pw]."""
    embed = PatchEmbed(4, 16, (2, 2, 1))
    conv = torch.nn.Conv3d(4, 16, kernel_size=(2, 2, 1), stride=(2, 2, 1))
    with torch.no_grad():
        conv.weight.copy_(embed.proj.weight.view_as(conv.weight))
        conv.bias.copy_(embed.proj.bias)
    x = torch.randn(2, 4, 4, 6, 3)
    torch.testing.assert_close(embed(x), conv(x).flatten(2).transpose(1, 2))


# ---------------------------------------------------------------- RoPE


AXES = (8, 12, 12)  # head_dim 32, the demo preset's split


def test_rope_scores_depend_only_on_relative_position():
    """<rope(q, p_i), rope(k, p_j)> == <rope(q, p_i - p_j), k> for every pair of grid positions."""
    torch.manual_seed(0)
    grid = (3, 4, 5)
    N = 3 * 4 * 5
    q, k = torch.randn(32, dtype=torch.float64), torch.randn(32, dtype=torch.float64)
    cos, sin = rope_table(grid, AXES, theta=10000.0)
    table = (cos.double(), sin.double())
    q_rot = apply_rope(q.expand(1, 1, N, 32), table)[0, 0]  # [N, 32]
    k_rot = apply_rope(k.expand(1, 1, N, 32), table)[0, 0]
    scores = q_rot @ k_rot.T  # [N, N]
    positions = torch.stack(torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij"), -1).reshape(
        -1, 3
    )
    deltas = (positions[:, None] - positions[None]).reshape(-1, 3).double()  # [N*N, 3]
    angles = rope_angles(deltas, AXES, 10000.0).double()
    angles = torch.cat([angles, angles], -1)
    expected = apply_rope(q.expand(1, 1, N * N, 32), (angles.cos(), angles.sin()))[0, 0] @ k  # [N*N]
    # The angle tables are float32 (as in the model), hence the tolerance.
    torch.testing.assert_close(scores.reshape(-1), expected, atol=1e-5, rtol=1e-4)
    assert (scores.std(dim=1) > 1e-3).all()  # and the scores do vary with position


@pytest.mark.parametrize("offset", [(3, 0, 0), (0, -2, 0), (0, 0, 7), (2, 5, -4)])
def test_rope_scores_invariant_to_grid_shift(offset):
    """Shifting every position along t, h or w leaves all q.k scores unchanged; rope keeps norms."""
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 2 * 3 * 4, 32), torch.randn(2, 3, 2 * 3 * 4, 32)
    base = rope_table((2, 3, 4), AXES, theta=100.0)
    shifted = rope_table((2, 3, 4), AXES, theta=100.0, offset=offset)
    s0 = apply_rope(q, base) @ apply_rope(k, base).transpose(-1, -2)
    s1 = apply_rope(q, shifted) @ apply_rope(k, shifted).transpose(-1, -2)
    torch.testing.assert_close(s0, s1, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(apply_rope(q, base), apply_rope(q, shifted))  # the shift did rotate
    torch.testing.assert_close(apply_rope(q, shifted).norm(dim=-1), q.norm(dim=-1))


def test_rope_keeps_dtype():
    q = torch.randn(1, 2, 12, 32, dtype=torch.bfloat16)
    assert apply_rope(q, rope_table((1, 3, 4), AXES, 10000.0)).dtype == torch.bfloat16


# ---------------------------------------------------------------- attention backends


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_backends_agree(dtype):
    torch.manual_seed(0)
    q = torch.randn(3, 2, 10, 16, dtype=dtype)
    k, v = torch.randn(3, 2, 6, 16, dtype=dtype), torch.randn(3, 2, 6, 16, dtype=dtype)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 2:] = False
    mask[2] = False  # a sample with no real text token: attends to nothing -> zeros
    mask = mask[:, None, None, :]
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for m in (None, mask):
        out = attention(q, k, v, m, backend="sdpa")
        assert out.dtype == dtype
        torch.testing.assert_close(out, attention(q, k, v, m, backend="math"), **tol)
    assert not attention(q, k, v, mask, backend="math")[2].any()
    with pytest.raises(ValueError, match="xformers"):
        attention(q, k, v, backend="xformers")


def test_model_backends_agree():
    cfg = tiny_config()
    sdpa = randomize_zero_init(DiT(cfg))
    math_model = DiT(tiny_config(attn_backend="math"))
    math_model.load_state_dict(sdpa.state_dict())
    args = inputs(cfg)
    torch.testing.assert_close(sdpa(*args), math_model(*args), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- adaLN-Zero and training


def test_adaln_zero_output_is_zero_at_init_then_learns():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = DiT(cfg)
    x, t, text_emb, text_mask = inputs(cfg)
    out = model(x, t, text_emb, text_mask)
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(out))
    # Every block is the identity at init (gates zero, cross-attention output zero).
    tokens = torch.randn(2, 30, cfg.hidden_size)
    t_mod = model.t_block(model.t_embedder(t)).unflatten(1, (6, cfg.hidden_size))
    rope = rope_table((5, 3, 2), cfg.axes_dim, cfg.rope_theta)
    text = model.text_proj(text_emb)
    assert torch.equal(model.blocks[0](tokens, t_mod, text, text_mask[:, None, None], rope), tokens)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    target = torch.randn_like(x)
    for step in range(4):
        opt.zero_grad()
        loss = (model(x, t, text_emb, text_mask) - target).pow(2).mean()
        loss.backward()
        if step == 3:
            # adaLN-Zero opens the network from the output inwards; by the 4th step every
            # parameter gets gradient (catches dead or unused modules).
            dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
            assert not dead, f"parameters with no gradient: {dead}"
        opt.step()
        if step == 0:
            assert model(x, t, text_emb, text_mask).abs().max() > 0
    assert torch.isfinite(loss)


def test_meta_build_then_initialize():
    """torchtitan-style: build on meta, materialise with to_empty, initialize_weights covers every parameter."""
    cfg = tiny_config()
    with torch.device("meta"):
        model = DiT(cfg)
    model.to_empty(device="cpu")
    model.initialize_weights()
    reference = DiT(cfg)
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.isfinite(p).all(), name
        if not p_ref.any() or "norm" in name:
            torch.testing.assert_close(p, p_ref, msg=name)  # deterministic inits agree exactly
    assert not model(*inputs(cfg)).any()


# ---------------------------------------------------------------- forward behaviour


@pytest.mark.parametrize(
    "overrides, shape",
    [
        (dict(), (2, 5, 6, 10)),  # odd frame count, non-square
        (dict(patch_size=(2, 2, 2)), (1, 6, 4, 8)),
        (dict(patch_size=(1, 1, 1), out_channels=8), (2, 3, 5, 7)),  # out_channels != in_channels
        (dict(qk_norm=False, rope_axes_dim=(4, 4, 8)), (2, 1, 8, 4)),  # an image: T = 1
    ],
)
def test_output_shape(overrides, shape):
    cfg = tiny_config(**overrides)
    cfg.validate(shape[1:])
    model = randomize_zero_init(DiT(cfg))
    x, t, text_emb, text_mask = inputs(cfg, shape=shape)
    out = model(x, t, text_emb, text_mask)
    assert out.shape == (shape[0], cfg.out_dim, *shape[1:])
    assert torch.isfinite(out).all()


def test_text_padding_is_ignored():
    cfg = tiny_config()
    model = randomize_zero_init(DiT(cfg))
    x, t, text_emb, text_mask = inputs(cfg)
    out = model(x, t, text_emb, text_mask)
    changed = text_emb.clone()
    changed[~text_mask] = torch.randn(int((~text_mask).sum()), cfg.text_dim) * 10
    torch.testing.assert_close(model(x, t, changed, text_mask), out, atol=0, rtol=0)
    # ... while a real token does matter, and an all-true mask equals passing no mask.
    changed[0, 0] += 1.0
    assert not torch.allclose(model(x, t, changed, text_mask)[0], out[0])
    full = torch.ones_like(text_mask)
    torch.testing.assert_close(model(x, t, text_emb, full), model(x, t, text_emb, None))


def test_bf16_autocast_close_to_fp32():
    cfg = tiny_config()
    model = randomize_zero_init(DiT(cfg))
    args = inputs(cfg)
    ref = model(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(*args)
    assert out.dtype == torch.bfloat16
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 0.03, f"bf16 relative error {rel:.4f}"
    out.float().pow(2).mean().backward()  # the backward runs under bf16 too
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ---------------------------------------------------------------- config errors


def test_bad_configs_raise_naming_the_field():
    with pytest.raises(ValueError, match=r"model\.hidden_size=100 is not divisible by model\.num_heads=3"):
        DiT(tiny_config(hidden_size=100, num_heads=3))
    with pytest.raises(ValueError, match=r"model\.rope_axes_dim=\(4, 4, 4\).*head_dim=16"):
        DiT(tiny_config(rope_axes_dim=(4, 4, 4)))
    with pytest.raises(ValueError, match=r"model\.rope_axes_dim=\(5, 5, 6\) must be three even"):
        DiT(tiny_config(rope_axes_dim=(5, 5, 6)))
    with pytest.raises(ValueError, match="odd head_dim"):
        DiT(tiny_config(hidden_size=60, num_heads=4))
    with pytest.raises(ValueError, match="model.attn_backend"):
        DiT(tiny_config(attn_backend="xformers"))
    msg = (
        "model.patch_size=(1, 2, 2) does not divide latent size (T,H,W)=(5, 7, 8) along H; "
        "pick a patch size dividing it or change data.size"
    )
    with pytest.raises(ValueError) as err:
        tiny_config().validate((5, 7, 8))
    assert str(err.value) == msg
    with pytest.raises(ValueError, match="along T"):
        tiny_config(patch_size=[2, 2, 2]).validate((5, 8, 8))  # lists (from YAML) are accepted
    with pytest.raises(ValueError, match=r"preset 'XXL/2' is unknown; known presets: demo, S/2"):
        dit_config("XXL/2", in_channels=4, text_dim=384)


# ---------------------------------------------------------------- presets


PARAM_RANGES = {  # with text_dim 4096 (T5-XXL) and 16 latent channels
    "demo": (3e6, 6e6),
    "S/2": (25e6, 40e6),
    "B/2": (100e6, 150e6),
    "L/2": (350e6, 480e6),
    "XL/2": (600e6, 750e6),  # PixArt-alpha XL/2 (same design): 611M
    "1B": (0.9e9, 1.4e9),
    "3B": (2.8e9, 3.2e9),
    "7B": (7.0e9, 7.8e9),
    "14B": (13.5e9, 14.5e9),  # Wan2.1-14B: 14B
    "Wan2.1-T2V-1.3B": (1.3e9, 1.45e9),  # exact totals: tests/test_wan.py
    "Wan2.1-T2V-14B": (14.0e9, 14.5e9),
}


@pytest.mark.parametrize("preset", list(DIT_PRESETS))
def test_preset_parameter_counts(preset):
    assert set(PARAM_RANGES) == set(DIT_PRESETS)
    counts = {}
    for text_dim in (4096, 384):
        with torch.device("meta"):  # no memory, no init cost
            model = DiT(dit_config(preset, in_channels=16, text_dim=text_dim))
        counts[text_dim] = sum(p.numel() for p in model.parameters())
    print(f"{preset}: {counts[4096] / 1e6:.1f}M (text_dim 4096), {counts[384] / 1e6:.1f}M (text_dim 384)")
    low, high = PARAM_RANGES[preset]
    assert low <= counts[4096] <= high
    assert counts[384] < counts[4096]
