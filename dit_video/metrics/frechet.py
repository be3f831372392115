"""Frechet distance between Gaussians fitted to two feature sets (FID, FVD).

    d^2 = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))

the squared 2-Wasserstein distance between N(mu_1, S_1) and N(mu_2, S_2) (Dowson & Landau
1982; FID: Heusel et al. 2017; FVD: Unterthiner et al. 2018). S_1 S_2 is not symmetric, so
instead of a general matrix square root (scipy's sqrtm, which can return complex noise) we use
Tr (S_1 S_2)^(1/2) = Tr (S_1^(1/2) S_2 S_1^(1/2))^(1/2): the same eigenvalues, but of a
symmetric PSD matrix, so `eigh` applies and the trace is real by construction.
"""

from __future__ import annotations

import numpy as np


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """features [N, D] -> (mean [D], covariance [D, D]) in float64 (unbiased, N - 1)."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"gaussian_stats: need features [N >= 2, D], got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix (negative round-off eigenvalues clipped to 0)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2); means [D], covariances [D, D]."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"frechet_distance: shapes do not match: {mu1.shape}, {sigma1.shape}, {mu2.shape}, {sigma2.shape}")
    root1 = _sqrt_psd(sigma1)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ sigma2 @ root1), 0, None)).sum()  # Tr (S1 S2)^(1/2)
    d2 = float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * cross)
    return max(d2, 0.0)  # round-off can leave -1e-12 for identical inputs


def frechet_distance_features(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N_a, D] and [N_b, D]."""
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))
