"""Objectives for training our causal VAE: reconstruction + KL (`vae_loss`), and VAELoss, which can add
a 3D patch discriminator with an adaptive weight (Esser et al. 2021, "Taming Transformers", VQGAN;
discriminator.py) and an LPIPS perceptual loss (Zhang et al. 2018; lpips.py) whose weights are read
from one local file.

    VAELoss(cfg)(vae, video, step)           -> generator (VAE) loss and logs
    VAELoss(cfg).discriminator_loss(...)     -> discriminator loss and logs

With `disc_weight: 0`, `perceptual_weight: 0` and `temporal_weight: 0` (the defaults) VAELoss is
exactly `vae_loss`: same numbers, no extra parameters, and VAEModule keeps Lightning's automatic
optimisation. `temporal_weight > 0` adds a temporal-difference term: the reconstruction's
frame-to-frame change must match the input's, which is where a 4x temporally compressed latent
loses camera motion first (a per-pixel loss is dominated by the still part of each frame).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dit_video.encoders.causal_vae.discriminator import (
    PatchDiscriminator3D,
    adaptive_weight,
    discriminator_hinge_loss,
    discriminator_non_saturating_loss,
    generator_adversarial_loss,
)
from dit_video.encoders.causal_vae.lpips import load_lpips
from dit_video.encoders.causal_vae.model import CausalVAE


def vae_loss(
    model: CausalVAE,
    video: torch.Tensor,
    kl_weight: float,
    recon: str = "l1",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Beta-VAE objective on a batch of videos [B, 3, T, H, W] in [-1, 1].

    loss = mean |x - x_hat| (or squared) + kl_weight * KL, with KL averaged per latent element, so
    kl_weight does not change meaning with resolution or clip length. Logs (detached): recon, kl,
    psnr (dB, peak-to-peak 2 for the [-1, 1] range, on the clamped reconstruction).
    """
    _, recon_loss, kl, logs = vae_loss_terms(model, video, recon, generator)
    return recon_loss + kl_weight * kl, logs


def vae_loss_terms(
    model: CausalVAE, video: torch.Tensor, recon: str = "l1", generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The pieces of `vae_loss`: (reconstruction [B, 3, T, H, W], recon loss, KL, detached logs).
    Shared with VAELoss (below), which adds perceptual and adversarial terms."""
    if recon not in ("l1", "l2"):
        raise ValueError(f"vae_loss recon={recon!r}: must be 'l1' or 'l2'")
    video_hat, posterior = model(video, generator)
    diff = video_hat.float() - video.float()
    recon_loss = diff.abs().mean() if recon == "l1" else diff.pow(2).mean()
    kl = posterior.kl().mean()
    with torch.no_grad():
        mse = (video_hat.float().clamp(-1, 1) - video.float()).pow(2).mean()
        psnr = 10.0 * torch.log10(4.0 / mse.clamp_min(1e-10))
    return video_hat, recon_loss, kl, {"recon": recon_loss.detach(), "kl": kl.detach(), "psnr": psnr}


def temporal_difference_loss(video_hat: torch.Tensor, video: torch.Tensor, recon: str = "l2") -> torch.Tensor:
    """Mean distance between the frame differences of a reconstruction and of its input, both
    [B, 3, T, H, W]: zero when every frame-to-frame change is reproduced, whatever a constant
    offset does. `recon` picks l1 or l2, as for the reconstruction term."""
    diff = (video_hat[:, :, 1:] - video_hat[:, :, :-1]).float() - (video[:, :, 1:] - video[:, :, :-1]).float()
    return diff.abs().mean() if recon == "l1" else diff.pow(2).mean()  # over [B, 3, T - 1, H, W]


@dataclass
class VAELossConfig:
    kl_weight: float = 1e-6  # weight of KL(q || N(0, I)), averaged per latent element
    recon: str = "l2"  # reconstruction distance: "l1" or "l2"
    perceptual_weight: float = 0.0  # weight of LPIPS(recon, video) per frame; 0 = off (needs lpips_path)
    lpips_path: str | None = None  # local LPIPS-VGG16 weights (.safetensors, or .pth read weights_only); see load_lpips
    disc_weight: float = 0.0  # factor on the adaptive adversarial weight; 0 = no discriminator (automatic optimisation)
    disc_start: int = 0  # optimizer step from which the discriminator trains and the VAE gets the adversarial term
    disc_loss: str = "hinge"  # "hinge" (VQGAN) or "non_saturating" (softplus, Goodfellow et al. 2014)
    disc_channels: int = 32  # width of the discriminator's first conv; doubles per downsampling layer (capped at 8x)
    disc_layers: int = 3  # stride-2 conv layers in the discriminator (each halves T, H and W)
    disc_lr: float | None = None  # discriminator AdamW learning rate; None = optim.lr (same warmup)
    adaptive_weight_max: float = 1e4  # clamp of ||grad L_rec|| / ||grad L_adv|| (VQGAN's value)
    temporal_weight: float = 0.0  # weight of the temporal-difference loss (x_hat[t+1] - x_hat[t] vs x's), same distance as recon

    def validate(self) -> VAELossConfig:
        if self.recon not in ("l1", "l2"):
            raise ValueError(f"vae.loss.recon={self.recon!r}: use 'l1' or 'l2'")
        if self.disc_loss not in ("hinge", "non_saturating"):
            raise ValueError(f"vae.loss.disc_loss={self.disc_loss!r}: use 'hinge' or 'non_saturating'")
        for name in ("kl_weight", "perceptual_weight", "disc_weight", "disc_start", "temporal_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"vae.loss.{name}={getattr(self, name)}: must be >= 0")
        if self.disc_layers < 1 or self.disc_channels < 1:
            raise ValueError(f"vae.loss.disc_layers={self.disc_layers}, disc_channels={self.disc_channels}: "
                             "both must be >= 1")
        if self.perceptual_weight > 0 and not self.lpips_path:
            raise ValueError(f"vae.loss.perceptual_weight={self.perceptual_weight} needs vae.loss.lpips_path: "
                             "a local LPIPS weights file (see dit_video/encoders/causal_vae/lpips.py load_lpips), "
                             "or set perceptual_weight=0")
        if self.disc_lr is not None and self.disc_lr <= 0:
            raise ValueError(f"vae.loss.disc_lr={self.disc_lr}: must be > 0 (or null for optim.lr)")
        return self

    @property
    def adversarial(self) -> bool:
        return self.disc_weight > 0


class VAELoss(nn.Module):
    """Reconstruction + KL (+ LPIPS) (+ adaptive adversarial term), and the discriminator's loss.

    Holds the discriminator (trained, in checkpoints) and LPIPS (frozen, loaded from a file, left
    out of checkpoints by VAEModule) when the config asks for them.
    """

    def __init__(self, cfg: VAELossConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.discriminator = (PatchDiscriminator3D(3, cfg.disc_channels, cfg.disc_layers)
                              if cfg.adversarial else None)
        self.lpips = load_lpips(cfg.lpips_path) if cfg.perceptual_weight > 0 else None

    def forward(self, vae: CausalVAE, video: torch.Tensor, step: int = 0,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """VAE loss on video [B, 3, T, H, W] in [-1, 1] at optimizer step `step`:
        (loss, detached logs, reconstruction [B, 3, T, H, W] for the discriminator)."""
        cfg = self.cfg
        video_hat, recon_loss, kl, logs = vae_loss_terms(vae, video, cfg.recon, generator)  # 1. reconstruct
        loss = recon_loss + cfg.kl_weight * kl  # 2. beta-VAE objective
        if cfg.temporal_weight > 0:  # 2b. frame-to-frame change, where motion lives
            temporal = temporal_difference_loss(video_hat, video, cfg.recon)
            logs["temporal"] = temporal.detach()
            recon_loss = recon_loss + cfg.temporal_weight * temporal  # part of the "nll" the GAN is scaled to
            loss = loss + cfg.temporal_weight * temporal
        if self.lpips is not None:  # 3. perceptual distance per frame
            perceptual = self.lpips.video_distance(video_hat, video.to(video_hat.dtype)).mean()
            logs["perceptual"] = perceptual.detach()
            nll = recon_loss + cfg.perceptual_weight * perceptual  # VQGAN's "nll": what the GAN term is scaled to
            loss = loss + cfg.perceptual_weight * perceptual
        else:
            nll = recon_loss
        if self.discriminator is not None and step >= cfg.disc_start and torch.is_grad_enabled():
            # 4. adversarial term, weighted so its gradient at the decoder output matches nll's
            g_adv = generator_adversarial_loss(self.discriminator(video_hat), cfg.disc_loss)
            weight = cfg.disc_weight * adaptive_weight(nll, g_adv, vae.dec_out.conv.weight, cfg.adaptive_weight_max)
            loss = loss + weight * g_adv
            logs |= {"g_adv": g_adv.detach(), "adv_weight": weight}
        return loss, logs, video_hat

    def discriminator_loss(self, video: torch.Tensor, video_hat: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Discriminator loss on real video and a (detached) reconstruction, both [B, 3, T, H, W]."""
        logits_real = self.discriminator(video.to(video_hat.dtype))  # [B, 1, T', H', W']
        logits_fake = self.discriminator(video_hat.detach())
        loss_fn = discriminator_hinge_loss if self.cfg.disc_loss == "hinge" else discriminator_non_saturating_loss
        loss = loss_fn(logits_real, logits_fake)
        logs = {"d_loss": loss.detach(), "logits_real": logits_real.detach().float().mean(),
                "logits_fake": logits_fake.detach().float().mean()}
        return loss, logs
