"""RoPE base/scaling for extrapolation to longer and larger videos than trained."""

from __future__ import annotations

import pytest
import torch

from dit_video.model import DiT, DiTConfig
from dit_video.model.rope import rope_table

AXES = (8, 12, 12)


def test_scaled_table_on_a_doubled_grid_reuses_the_trained_angles():
    """rope_scale 2 on a 2x grid: every even position has exactly the angle of the trained grid."""
    trained = rope_table((2, 3, 4), AXES, 10000.0)
    doubled = rope_table((4, 6, 8), AXES, 10000.0, scale=(2.0, 2.0, 2.0))
    even = torch.arange(4 * 6 * 8).reshape(4, 6, 8)[::2, ::2, ::2].reshape(-1)
    for a, b in zip(trained, doubled, strict=True):
        torch.testing.assert_close(b[even], a)
    # ... and no angle leaves the trained range along any axis.
    assert doubled[0].shape == (4 * 6 * 8, 32)


def test_scale_along_time_only_changes_time_channels():
    base = rope_table((4, 3, 3), AXES, 10000.0)
    longer = rope_table((4, 3, 3), AXES, 10000.0, scale=(2.0, 1.0, 1.0))
    half = 32 // 2
    time_channels = list(range(0, 4)) + list(range(half, half + 4))  # dt/2 = 4 per half (rotate-half layout)
    other = [c for c in range(32) if c not in time_channels]
    torch.testing.assert_close(longer[0][:, other], base[0][:, other])
    assert not torch.allclose(longer[0][:, time_channels], base[0][:, time_channels])


@pytest.mark.parametrize("rope_scale, rope_theta", [((1.0, 1.0, 1.0), 10000.0), ((4.0, 2.0, 2.0), 500.0)])
def test_model_runs_beyond_the_training_grid(rope_scale, rope_theta):
    """A model configured for 4x frames and 2x size handles the bigger latents; default = unscaled."""
    cfg = DiTConfig(in_channels=4, text_dim=16, hidden_size=64, depth=1, num_heads=2,
                    rope_scale=list(rope_scale), rope_theta=rope_theta)
    assert cfg.rope_scale == rope_scale  # YAML lists become tuples
    model = DiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    for shape in ((2, 4, 4), (8, 8, 8)):
        x = torch.randn(1, 4, *shape)
        out = model(x, torch.rand(1), torch.randn(1, 3, 16))
        assert out.shape == x.shape and torch.isfinite(out).all()


def test_bad_rope_scale_names_the_field():
    with pytest.raises(ValueError, match=r"model\.rope_scale"):
        DiT(DiTConfig(in_channels=4, text_dim=16, hidden_size=64, depth=1, num_heads=2, rope_scale=(1.0, 0.0, 1.0)))
