"""Loss weightings over t, and the per-timestep-bucket loss a researcher watches during training.

Every weighting is expressed as a weight on the x_0 error and converted into the space of the
chosen target: if x_0 = a x_t + c(t) * prediction, an error e in the target is an error c(t) e
in x_0, so a weight w_x0(t) on the x_0 MSE is w_x0(t) c(t)^2 on the target MSE. That is why
min-SNR-gamma reads min(SNR, g) / SNR for eps and min(SNR, g) / (SNR + 1) for v (Hang et al.
2023): one formula, three targets.
"""

from __future__ import annotations

import torch

LOSS_WEIGHTINGS = ("none", "min_snr", "objective")


def min_snr_weight(snr: torch.Tensor, x0_scale: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023): weight min(SNR, gamma) on the x_0 MSE, in target space [B]."""
    return torch.clamp(snr, max=gamma) * x0_scale**2


def temporal_difference_mse(x0_pred: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE [B] between the frame-to-frame changes of predicted and true clean latents,
    both [B, C, T, H, W]. Camera motion lives in these changes, a small share of the plain MSE next
    to the static content, so a model can lower the MSE a long way with near-still clips; this term
    scores the changes alone (0 for a prediction off by the same amount in every frame)."""
    diff = (x0_pred[:, :, 1:] - x0_pred[:, :, :-1]) - (x0[:, :, 1:] - x0[:, :, :-1])  # [B, C, T - 1, H, W]
    return diff.pow(2).flatten(1).mean(1)


def loss_by_t_bucket(t: torch.Tensor, loss_per_sample: torch.Tensor, num_buckets: int = 10):
    """Mean loss per t bucket: t [B] in [0, 1], loss [B] -> (mean [K] (NaN when empty), count [K]).

    Buckets are [k/K, (k+1)/K). Log each non-empty bucket with batch_size=count and epoch
    averaging, and the logger's weighted mean is the exact mean over all samples in the bucket.
    """
    idx = (t.detach().double() * num_buckets).long().clamp(0, num_buckets - 1)  # [B]
    loss = loss_per_sample.detach().double()
    count = torch.zeros(num_buckets, dtype=torch.float64, device=t.device).index_add_(
        0, idx, torch.ones_like(loss)
    )
    total = torch.zeros(num_buckets, dtype=torch.float64, device=t.device).index_add_(0, idx, loss)
    return (total / count).float(), count.long()  # empty buckets: 0 / 0 = NaN


def t_bucket_names(num_buckets: int = 10, prefix: str = "train/loss_t") -> list[str]:
    """Log keys matching `loss_by_t_bucket`: 'train/loss_t0.0-0.1', ... ."""
    return [f"{prefix}{k / num_buckets:.2g}-{(k + 1) / num_buckets:.2g}" for k in range(num_buckets)]
