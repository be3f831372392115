"""Full-reference reconstruction metrics: PSNR and SSIM, per clip, for VAE validation.

SSIM follows Wang et al. 2004: an 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03,
computed per frame and per RGB channel (not on luminance) over the "valid" window positions,
then averaged over positions, channels and frames. That equals scikit-image's
`structural_similarity(..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
channel_axis=...)` on each frame. Unlike PSNR, SSIM's luminance term is not shift-invariant:
give it [0, 1] images (data_range 1), as published numbers use, not the [-1, 1] the VAE sees.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SSIM_WINDOW = 11  # Gaussian window edge (Wang et al. 2004)
SSIM_SIGMA = 1.5  # Gaussian window std in pixels (Wang et al. 2004)
SSIM_K1, SSIM_K2 = 0.01, 0.03  # stabilisers: C1 = (K1 * L)^2, C2 = (K2 * L)^2 for data range L


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """PSNR in dB per sample: x, y [N, ...] -> [N]. data_range 2 for [-1, 1] videos, 1 for [0, 1]."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(dim=1)  # [N]
    return 10.0 * torch.log10(data_range**2 / mse.clamp_min(1e-10))


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Normalised 1-D Gaussian [size] centred on the middle tap."""
    i = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(i**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Mean SSIM per sample: videos [N, C, T, H, W] (or images [N, C, H, W]) in [0, data_range] -> [N].

    Per frame and channel, Gaussian-weighted local statistics over valid 11x11 windows (H, W >= 11).
    """
    if x.shape != y.shape:
        raise ValueError(f"ssim: shapes differ, {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.ndim == 4:
        x, y = x.unsqueeze(2), y.unsqueeze(2)  # [N, C, 1, H, W]
    n, c, t, h, w = x.shape
    if min(h, w) < SSIM_WINDOW:
        raise ValueError(f"ssim needs frames of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {h}x{w}")
    # float64: the local variances are differences of nearly equal second moments.
    x = x.double().transpose(1, 2).reshape(n * t * c, 1, h, w)  # [N*T*C, 1, H, W]
    y = y.double().transpose(1, 2).reshape(n * t * c, 1, h, w)
    g = gaussian_window().to(x.device)

    def blur(z: torch.Tensor) -> torch.Tensor:  # separable Gaussian, valid positions only
        z = F.conv2d(z, g.view(1, 1, -1, 1))  # [M, 1, H - 10, W]
        return F.conv2d(z, g.view(1, 1, 1, -1))  # [M, 1, H - 10, W - 10]

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.view(n, -1).mean(dim=1).float()  # [N]
