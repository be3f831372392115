"""The tiny random CausalVAE and the coloured-shape clips the VAE tests run it on."""

from __future__ import annotations

import numpy as np
import torch

from dit_video.encoders import VAE_PRESETS, CausalVAE

COLOURS = np.array([[230, 40, 40], [40, 200, 60], [50, 90, 235], [240, 220, 40], [220, 60, 220]], np.uint8)


def shape_clips(n: int, frames: int = 17, size: int = 32, seed: int = 0) -> torch.Tensor:
    """uint8 clips [n, frames, size, size, 3]: one solid square or disc of a saturated colour,
    moving in a straight line over a dark background (the demo's kind of data)."""
    rng = np.random.default_rng(seed)
    clips = np.zeros((n, frames, size, size, 3), np.uint8)
    yy, xx = np.mgrid[:size, :size] + 0.5
    for i in range(n):
        clips[i] = rng.integers(0, 30)
        r = rng.uniform(size / 8, size / 5)
        pos, vel = rng.uniform(r, size - r, 2), rng.uniform(-1.5, 1.5, 2) * size / 32
        colour, disc = COLOURS[rng.integers(len(COLOURS))], rng.random() < 0.5
        for t in range(frames):
            cy, cx = pos + t * vel
            if disc:
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            else:
                mask = (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
            clips[i, t][mask] = colour
    return torch.from_numpy(clips)


def tiny_vae(seed: int = 0) -> CausalVAE:
    torch.manual_seed(seed)
    return CausalVAE(VAE_PRESETS["tiny"]).eval()
