"""The adversarial part of VAE training (Esser et al. 2021, "Taming Transformers", VQGAN): a 3D
PatchGAN discriminator, its losses, and the adaptive weight of the generator's adversarial term."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchDiscriminator3D(nn.Module):
    """PatchGAN (Isola et al. 2017) in 3D: one real/fake logit per spacetime patch.

    video [B, 3, T, H, W] in [-1, 1] -> logits [B, 1, T', H', W'], T' ~ T / 2**layers. Kernel 3 with
    padding 1 (not PatchGAN's 4) so a single frame (T = 1) still yields a logit. GroupNorm rather
    than BatchNorm: the statistics do not depend on the batch, which is small and mixes real/fake.
    """

    def __init__(self, in_channels: int = 3, channels: int = 32, layers: int = 3, norm_groups: int = 8):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv3d(in_channels, channels, 3, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < layers else 1  # the last feature layer keeps the resolution (as in PatchGAN)
            mods += [nn.Conv3d(width, out, 3, stride=stride, padding=1, bias=False),
                     nn.GroupNorm(min(norm_groups, out), out), nn.LeakyReLU(0.2)]
            width = out
        mods.append(nn.Conv3d(width, 1, 3, padding=1))
        self.net = nn.Sequential(*mods)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.net(video)  # [B, 1, T', H', W']


def discriminator_hinge_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(x_hat))]) (VQGAN's hinge_d_loss)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def discriminator_non_saturating_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (E[softplus(-D(x))] + E[softplus(D(x_hat))]): binary cross-entropy on logits."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def generator_adversarial_loss(logits_fake: torch.Tensor, kind: str) -> torch.Tensor:
    """Hinge: -E[D(x_hat)]; non-saturating: E[softplus(-D(x_hat))]."""
    if kind == "hinge":
        return -logits_fake.mean()
    return F.softplus(-logits_fake).mean()


def adaptive_weight(rec_loss: torch.Tensor, adv_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """lambda = ||grad_W L_rec|| / (||grad_W L_adv|| + 1e-4), clamped to [0, max_weight], detached.

    W is the decoder's last layer (Esser et al. 2021, eq. 7): the adversarial gradient is scaled to
    the size of the reconstruction gradient where both meet the output, whatever their raw scales.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    adv_grad = torch.autograd.grad(adv_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.float().norm() / (adv_grad.float().norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()
