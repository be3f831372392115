"""DiT variant configs: errors that name the field, checkpoint-key compatibility of the default
model, and closed-form parameter counts (per-block adaLN-Zero, MMDiT blocks, the demo YAMLs)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from test_model import tiny_config  # the same tiny sizes as the base model's tests
from test_model_variants import VARIANTS

from dit_video.build import build_dit_config
from dit_video.model import DiT

# ---------------------------------------------------------------- config and compatibility


def test_bad_variant_configs_raise_naming_the_field():
    with pytest.raises(ValueError, match=r"model.conditioning='joint' is unknown; pick one of cross_attn, mmdit"):
        DiT(tiny_config(conditioning="joint"))
    with pytest.raises(ValueError, match=r"model.modulation='adaln' is unknown"):
        DiT(tiny_config(modulation="adaln"))
    with pytest.raises(ValueError, match=r"model.pos_embed='alibi' is unknown"):
        DiT(tiny_config(pos_embed="alibi"))
    with pytest.raises(ValueError, match=r"model.num_dual_blocks=2 must be in \[0, depth=2\)"):
        DiT(tiny_config(conditioning="mmdit", num_dual_blocks=2))
    with pytest.raises(ValueError, match=r"model.num_dual_blocks=1 only applies to model.conditioning=mmdit"):
        DiT(tiny_config(num_dual_blocks=1))
    with pytest.raises(ValueError, match=r"model.max_grid=None must be three positive integers"):
        DiT(tiny_config(pos_embed="learned"))
    with pytest.raises(ValueError, match=r"model.pooled_text_dim=-1"):
        DiT(tiny_config(pooled_text_dim=-1))


def test_default_model_keeps_its_checkpoint_keys():
    """The default (cross_attn, adaln_single, rope, no pooled) model has exactly the pre-variant
    parameter names, so existing checkpoints load; the explicit defaults build the same model."""
    cfg = tiny_config()
    keys = set(DiT(cfg).state_dict())
    per_block = {
        "modulation", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
        *(f"attn.{m}.{p}" for m in ("qkv", "proj") for p in ("weight", "bias")),
        *(f"cross_attn.{m}.{p}" for m in ("q", "kv", "proj") for p in ("weight", "bias")),
        *(f"{a}.{n}.weight" for a in ("attn", "cross_attn") for n in ("q_norm", "k_norm")),
    }
    expected = {
        "x_embedder.proj.weight", "x_embedder.proj.bias", "t_block.1.weight", "t_block.1.bias",
        *(f"t_embedder.mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")),
        *(f"text_proj.{m}.{p}" for m in ("fc1", "fc2") for p in ("weight", "bias")),
        *(f"blocks.{i}.{k}" for i in range(cfg.depth) for k in per_block),
        *(f"final_layer.{k}" for k in ("adaLN_modulation.1.weight", "adaLN_modulation.1.bias", "linear.weight", "linear.bias")),
    }
    assert keys == expected
    torch.manual_seed(0)
    a = DiT(cfg)
    torch.manual_seed(0)
    b = DiT(tiny_config(conditioning="cross_attn", modulation="adaln_single", pos_embed="rope", pooled_text_dim=0))
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), n


def test_adaln_zero_costs_six_d_squared_per_block():
    """Per-block adaLN-Zero adds 6 D^2 + 6 D parameters per block and drops the shared 6 D^2 + 6 D t_block
    and the 6 D tables (the saving adaLN-single was chosen for, see blocks.py)."""
    single, zero = tiny_config(), tiny_config(modulation="adaln_zero")
    D, depth = single.hidden_size, single.depth
    count = lambda cfg: sum(p.numel() for p in DiT(cfg).parameters())  # noqa: E731
    expected = depth * (6 * D * D + 6 * D) - (6 * D * D + 6 * D) - depth * 6 * D
    assert count(zero) - count(single) == expected


def test_mmdit_parameter_count_closed_form():
    """Dual block: two streams of (qkv 3D^2 + proj D^2 + MLP 2 r D^2 + biases); single block: fused
    linear1 D x (3D + rD) and linear2 (D + rD) x D. Checked against the built model."""
    cfg = tiny_config(**VARIANTS["mmdit"], qk_norm=False)
    D, F = cfg.hidden_size, int(cfg.hidden_size * cfg.mlp_ratio)
    model = DiT(cfg)
    stream = (D * 3 * D + 3 * D) + (D * D + D) + (D * F + F) + (F * D + D) + 6 * D  # + adaLN table
    single = (D * (3 * D + F) + 3 * D + F) + ((D + F) * D + D) + 3 * D
    assert sum(p.numel() for p in model.blocks[0].parameters()) == 2 * stream
    assert sum(p.numel() for p in model.blocks[1].parameters()) == single
    assert math.isclose(sum(p.numel() for p in model.blocks[1].parameters()) / (D * D), 3 + 2 * 4, rel_tol=0.1)


def test_demo_variant_yamls_build_and_match_the_demo_size():
    """conf/model/dit_demo_{mmdit,adaln_zero}.yaml: the mmdit demo has the demo's block budget
    (2 dual x 24 D^2 + 4 single x 12 D^2 = 6 x 16 D^2) and adaLN-Zero adds 6 D^2 per block."""
    conf = Path(__file__).parent.parent / "conf" / "model"
    counts = {}
    for name in ("dit_demo", "dit_demo_mmdit", "dit_demo_adaln_zero"):
        cfg = build_dit_config(OmegaConf.load(conf / f"{name}.yaml"), in_channels=4, text_dim=384)
        with torch.device("meta"):
            counts[name] = sum(p.numel() for p in DiT(cfg).parameters())
    D, depth = 192, 6
    assert counts["dit_demo_mmdit"] == pytest.approx(counts["dit_demo"], rel=0.01)
    assert counts["dit_demo_adaln_zero"] - counts["dit_demo"] == depth * (6 * D * D + 6 * D) - (6 * D * D + 6 * D) - depth * 6 * D
