"""dit_video.model.flops against torch's FlopCounterMode (plus the attention term it misses on CPU)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dit_video.model import DiT, DiTConfig
from dit_video.model.flops import attention_flops, dit_flops, naive_training_flops

# Three shapes that exercise every term: a non-square spatial patch, a temporal patch with
# out_channels != in_channels and a wide MLP, and a long text with a small grid.
CONFIGS = [
    (dict(hidden_size=64, depth=2, num_heads=4), (5, 6, 10), 7, 2),
    (dict(hidden_size=96, depth=3, num_heads=6, patch_size=(2, 2, 2), out_channels=8, mlp_ratio=6.0), (4, 8, 8), 5, 1),
    (dict(hidden_size=48, depth=1, num_heads=3, patch_size=(1, 1, 2), text_dim=40), (2, 4, 6), 33, 3),
]


def build(overrides: dict, backend: str) -> DiT:
    torch.manual_seed(0)
    fields = dict(in_channels=4, text_dim=24, attn_backend=backend) | overrides
    return DiT(DiTConfig(**fields))


def counted(model: DiT, latent_shape, text_len: int, batch: int, train: bool) -> int:
    """FlopCounterMode's total for one forward (or forward + backward) on `batch` samples."""
    cfg = model.cfg
    x = torch.randn(batch, cfg.in_channels, *latent_shape)
    t, text = torch.rand(batch), torch.randn(batch, text_len, cfg.text_dim)
    with FlopCounterMode(display=False) as counter:
        out = model(x, t, text)
        if train:
            out.square().mean().backward()
    return counter.get_total_flops()


def attention_term(cfg: DiTConfig, latent_shape, text_len: int) -> int:
    """Forward FLOPs of every attention product (self and cross) in the model, per sample."""
    n = math.prod(cfg.grid(latent_shape))
    return cfg.depth * (attention_flops(n, n, cfg.hidden_size) + attention_flops(n, text_len, cfg.hidden_size))


@pytest.mark.parametrize("overrides, latent_shape, text_len, batch", CONFIGS)
def test_flops_match_counter_plus_attention_term(overrides, latent_shape, text_len, batch):
    """CPU SDPA is invisible to FlopCounterMode: counter + our closed-form attention term == formula."""
    model = build(overrides, "sdpa")
    cfg = model.cfg
    fc = dit_flops(cfg, latent_shape, text_len)
    attn = attention_term(cfg, latent_shape, text_len)
    fwd = counted(model, latent_shape, text_len, batch, train=False) / batch + attn
    train = counted(model, latent_shape, text_len, batch, train=True) / batch + 3 * attn
    assert fc.forward == pytest.approx(fwd, rel=0.02)
    assert fc.training == pytest.approx(train, rel=0.02)
    assert fc.attention == attn


# The conditioning / modulation / position variants (tests/test_model_variants.py), one shape each.
VARIANT_CONFIGS = [
    (dict(hidden_size=64, depth=2, num_heads=4, modulation="adaln_zero", pooled_text_dim=12), (5, 6, 10), 7, 2),
    (dict(hidden_size=64, depth=3, num_heads=4, conditioning="mmdit", num_dual_blocks=2), (5, 6, 10), 7, 2),
    (dict(hidden_size=96, depth=2, num_heads=6, conditioning="mmdit", num_dual_blocks=1, modulation="adaln_zero",
          patch_size=(2, 2, 2), mlp_ratio=3.0, pos_embed="learned", max_grid=(2, 4, 4)), (4, 8, 8), 5, 1),
    (dict(hidden_size=48, depth=2, num_heads=3, conditioning="mmdit", pooled_text_dim=8, pos_embed="sincos",
          text_dim=40), (2, 4, 6), 33, 3),
    # Wan's layout (dit_video/convert): captions padded to text_len=9 tokens, a final table instead of a projection
    (dict(hidden_size=64, depth=2, num_heads=2, qk_norm_across_heads=True, cross_attn_norm=False, text_len=9,
          final_modulation="table", rope_axes_dim=(12, 10, 10), mlp_ratio=1.5), (3, 4, 6), 7, 2),
]


def variant_attention_term(cfg: DiTConfig, latent_shape, text_len: int) -> int:
    """Per-sample attention FLOPs of any variant: MMDiT attends over the joint text + video sequence."""
    if cfg.conditioning == "cross_attn":
        return attention_term(cfg, latent_shape, cfg.text_len or text_len)  # text_len > 0: padded captions
    n = math.prod(cfg.grid(latent_shape)) + text_len
    return cfg.depth * attention_flops(n, n, cfg.hidden_size)


def counted_variant(model: DiT, latent_shape, text_len: int, batch: int, train: bool) -> int:
    cfg = model.cfg
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, *latent_shape, generator=gen)
    t, text = torch.rand(batch, generator=gen), torch.randn(batch, text_len, cfg.text_dim, generator=gen)
    pooled = torch.randn(batch, cfg.pooled_text_dim, generator=gen) if cfg.pooled_text_dim else None
    with FlopCounterMode(display=False) as counter:
        out = model(x, t, text, pooled=pooled)
        if train:
            out.square().mean().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("overrides, latent_shape, text_len, batch", VARIANT_CONFIGS)
def test_variant_flops_match_counter(overrides, latent_shape, text_len, batch):
    """As above for the variants: within 2% of counter + attention term (sdpa), exact with the math backend."""
    model = build(overrides, "sdpa")
    fc = dit_flops(model.cfg, latent_shape, text_len)
    attn = variant_attention_term(model.cfg, latent_shape, text_len)
    fwd = counted_variant(model, latent_shape, text_len, batch, train=False) / batch + attn
    train = counted_variant(model, latent_shape, text_len, batch, train=True) / batch + 3 * attn
    assert fc.forward == pytest.approx(fwd, rel=0.02)
    assert fc.training == pytest.approx(train, rel=0.02)
    assert fc.attention == attn
    exact = build(overrides, "math")
    assert counted_variant(exact, latent_shape, text_len, batch, train=False) == batch * fc.forward
    assert counted_variant(exact, latent_shape, text_len, batch, train=True) == batch * fc.training


@pytest.mark.parametrize("overrides, latent_shape, text_len, batch", CONFIGS)
def test_flops_exact_with_math_backend(overrides, latent_shape, text_len, batch):
    """The math backend's attention is plain matmuls, which the counter sees: the formula is exact."""
    model = build(overrides, "math")
    fc = dit_flops(model.cfg, latent_shape, text_len)
    assert counted(model, latent_shape, text_len, batch, train=False) == batch * fc.forward
    assert counted(model, latent_shape, text_len, batch, train=True) == batch * fc.training


def test_per_sample_terms_do_not_scale_with_tokens():
    """Doubling the frames doubles the per-token terms but leaves timestep/adaLN terms unchanged."""
    cfg = DiTConfig(in_channels=4, text_dim=24, hidden_size=64, depth=2, num_heads=4)
    a, b = dit_flops(cfg, (4, 8, 8), 7), dit_flops(cfg, (8, 8, 8), 7)
    for name in ("timestep_mlp", "adaln_single", "final_adaln", "text_proj"):
        assert a.terms[name] == b.terms[name]
    for name in ("patch_embed", "mlp", "self_attn_linear", "final_linear", "cross_attention_scores"):
        assert b.terms[name] == 2 * a.terms[name]
    assert b.terms["self_attention_scores"] == 4 * a.terms["self_attention_scores"]


def test_naive_rule_misses_attention_at_long_video():
    """6*N*T undercounts long videos (attention grows as N^2) and overcounts tiny-token ones."""
    cfg = DiTConfig(in_channels=16, text_dim=4096, hidden_size=1152, depth=28, num_heads=16)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in DiT(cfg).parameters())
    long = dit_flops(cfg, (21, 60, 104), 226)  # 81 frames at 480x832 through a 4x8x8 VAE
    assert long.attention / long.forward > 0.5
    assert naive_training_flops(cfg, n_params, (21, 60, 104)) < 0.6 * long.training
    # A 256^2 image (256 tokens) with one text token: 6NT charges the per-sample and text
    # parameters to every token. (adaLN-single keeps that small; DiT's per-block adaLN makes it 45%.)
    image = dit_flops(cfg, (1, 32, 32), 1)
    assert naive_training_flops(cfg, n_params, (1, 32, 32)) > 1.1 * image.training


# ---------------------------------------------------------------- preflight (memory model)


def saved_activation_bytes(cfg: DiTConfig, latent_shape, autocast: bool) -> float:
    """Bytes autograd saves for one block on one sample, excluding parameters (and their bf16 casts)."""
    model = DiT(cfg)
    from dit_video.model.rope import rope_table

    x = torch.randn(1, cfg.in_channels, *latent_shape)
    n = math.prod(cfg.grid(latent_shape))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params and tensor.dim() >= 2 and n in tensor.shape[:-1] + (tensor.shape[-2],):
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        tokens = model.x_embedder(x).detach().requires_grad_()  # [1, N, D]
        rope = rope_table(cfg.grid(latent_shape), cfg.axes_dim, cfg.rope_theta)
        t_mod = model.t_block(model.t_embedder(torch.rand(1))).unflatten(1, (6, cfg.hidden_size))
        text = model.text_proj(torch.randn(1, 4, cfg.text_dim))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.blocks[0](tokens, t_mod, text, None, rope)
    return float(sum(seen.values()))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_activation_model_matches_saved_tensors(precision):
    from dit_video.preflight import activation_bytes

    cfg = DiTConfig(in_channels=4, text_dim=24, hidden_size=192, depth=1, num_heads=3)
    measured = saved_activation_bytes(cfg, (6, 16, 16), autocast=precision == "bf16")
    estimate = activation_bytes(cfg, 6 * 8 * 8, batch=1, precision=precision, checkpointing=False)
    assert estimate == pytest.approx(measured, rel=0.15)


def test_preflight_prints_every_strategy(capsys):
    from dit_video.preflight import STRATEGIES, main

    main(["+experiment=dit_256", "--bucket", "33x256x256", "--bucket", "17x128x128"])
    out = capsys.readouterr().out
    assert "2304 tokens per sample" in out and "(5, 16, 16) -> 320 tokens" in out
    assert "TFLOP per sample" in out
    for strategy in STRATEGIES:
        assert f"{strategy} + ckpt" in out
    # Sharding and checkpointing only ever lower the estimate.
    totals = {line.split()[0] + (" ckpt" if "ckpt" in line else ""): float(line.split()[-1])
              for line in out.splitlines()[:40] if line.strip().split(" ")[0] in STRATEGIES}
    assert totals["DDP"] > totals["ZeRO-2"] > totals["ZeRO-3"] > totals["ZeRO-3 ckpt"]
