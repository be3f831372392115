"""Losses for training our causal VAE beyond reconstruction + KL: a 3D patch discriminator with an
adaptive weight (Esser et al. 2021, "Taming Transformers", VQGAN) and an LPIPS perceptual loss
(Zhang et al. 2018) whose weights are read from one local file.

    VAELoss(cfg)(vae, video, step)           -> generator (VAE) loss and logs
    VAELoss(cfg).discriminator_loss(...)     -> discriminator loss and logs

With `disc_weight: 0` and `perceptual_weight: 0` (the defaults) VAELoss is exactly `vae_loss`:
same numbers, no extra parameters, and VAEModule keeps Lightning's automatic optimisation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from dit_video.encoders.vae import CausalVAE, vae_loss_terms


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

    def validate(self) -> VAELossConfig:
        if self.recon not in ("l1", "l2"):
            raise ValueError(f"vae.loss.recon={self.recon!r}: use 'l1' or 'l2'")
        if self.disc_loss not in ("hinge", "non_saturating"):
            raise ValueError(f"vae.loss.disc_loss={self.disc_loss!r}: use 'hinge' or 'non_saturating'")
        for name in ("kl_weight", "perceptual_weight", "disc_weight", "disc_start"):
            if getattr(self, name) < 0:
                raise ValueError(f"vae.loss.{name}={getattr(self, name)}: must be >= 0")
        if self.disc_layers < 1 or self.disc_channels < 1:
            raise ValueError(f"vae.loss.disc_layers={self.disc_layers}, disc_channels={self.disc_channels}: "
                             "both must be >= 1")
        if self.perceptual_weight > 0 and not self.lpips_path:
            raise ValueError(f"vae.loss.perceptual_weight={self.perceptual_weight} needs vae.loss.lpips_path: "
                             "a local LPIPS weights file (see dit_video/encoders/vae_losses.py load_lpips), "
                             "or set perceptual_weight=0")
        if self.disc_lr is not None and self.disc_lr <= 0:
            raise ValueError(f"vae.loss.disc_lr={self.disc_lr}: must be > 0 (or null for optim.lr)")
        return self

    @property
    def adversarial(self) -> bool:
        return self.disc_weight > 0


# --------------------------------------------------------------------------------------------
# Discriminator and adversarial losses
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# LPIPS (VGG16)
# --------------------------------------------------------------------------------------------

# VGG16 conv widths; "M" is a 2x2 max-pool. Index i of `features` follows torchvision's vgg16().features
# (conv, relu, conv, relu, pool, ...), so torchvision weights load by name after a prefix change.
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# features indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3: the five LPIPS taps.
LPIPS_TAPS = (3, 8, 15, 22, 29)
LPIPS_CHANNELS = (64, 128, 256, 512, 512)
# LPIPS's input scaling: (x - shift) / scale maps [-1, 1] images to the ImageNet statistics VGG
# was trained on (the `ScalingLayer` constants of the lpips package, fixed, not learned).
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)


class LPIPS(nn.Module):
    """Learned perceptual distance (Zhang et al. 2018), VGG16 variant, frozen.

    d(x, y) = sum_l mean_{h,w} sum_c w_l[c] * (f_l(x) / ||f_l(x)|| - f_l(y) / ||f_l(y)||)^2_c
    with f_l the VGG16 activations at relu1_2 .. relu5_3, normalised to unit length over channels.

    State-dict keys (what `load_lpips` expects in the file):
        features.{0,2,5,7,10,12,14,17,19,21,24,26,28}.{weight,bias}   VGG16 convs (torchvision names)
        heads.{0..4}.weight   [1, C_l, 1, 1] non-negative linear heads (lpips' lin{l}.model.1.weight)
    """

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for v in VGG16_LAYOUT:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU()]
                c_in = v
        self.features = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in LPIPS_CHANNELS)
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # frozen: no mode to switch (and no dropout, unlike the original)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = (x - self.shift) / self.scale  # [N, 3, H, W]
        out = []
        for i, layer in enumerate(self.features[: LPIPS_TAPS[-1] + 1]):
            h = layer(h)  # [N, C_l, H / 2^l, W / 2^l]
            if i in LPIPS_TAPS:
                out.append(h)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Images x, y [N, 3, H, W] in [-1, 1] -> distance [N] (0 for identical images)."""
        total = x.new_zeros(x.shape[0], dtype=torch.float32)
        for fx, fy, head in zip(self._taps(x), self._taps(y), self.heads, strict=True):
            # eps 1e-10 as in LPIPS: keeps an all-zero (dead ReLU) feature vector at 0, not NaN.
            fx = fx.float() / (fx.float().pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            fy = fy.float() / (fy.float().pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            d = F.conv2d((fx - fy).pow(2), head.weight.float())  # [N, 1, h, w]
            total = total + d.mean(dim=(1, 2, 3))
        return total

    def video_distance(self, video_a: torch.Tensor, video_b: torch.Tensor) -> torch.Tensor:
        """Videos [B, 3, T, H, W] in [-1, 1] -> LPIPS averaged over frames [B]."""
        b = video_a.shape[0]
        a = rearrange(video_a, "b c t h w -> (b t) c h w")  # [B*T, 3, H, W]
        c = rearrange(video_b, "b c t h w -> (b t) c h w")
        return self(a, c).view(b, -1).mean(dim=1)  # [B]


def load_lpips(path: str | os.PathLike, field: str = "vae.loss.lpips_path") -> LPIPS:
    """LPIPS with every weight (VGG16 backbone and heads) from ONE local file, frozen.

    `.safetensors`, or a torch `.pth`/`.pt` loaded with weights_only=True. To make the file from
    the official weights, offline (torchvision's vgg16 ImageNet weights + the lpips package's
    `lpips/weights/v0.1/vgg.pth` heads):

        vgg = torchvision.models.vgg16(weights="IMAGENET1K_V1").features.state_dict()
        heads = torch.load("vgg.pth", weights_only=True)
        safetensors.torch.save_file(lpips_state_from_official(vgg, heads), "lpips_vgg.safetensors")
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{field}={str(path)!r}: no such file; give a local LPIPS-VGG16 weights file "
                                "(see load_lpips in dit_video/encoders/vae_losses.py for how to make one) "
                                "or set vae.loss.perceptual_weight=0")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p))
    else:
        state = torch.load(p, map_location="cpu", weights_only=True)
    model = LPIPS()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{field}={str(path)!r} is not an LPIPS-VGG16 state dict: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]} (expected keys features.N.* and heads.0-4.weight)")
    return model.requires_grad_(False).eval()


def lpips_state_from_official(vgg_features: dict[str, torch.Tensor],
                              lpips_heads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename official weights to LPIPS's keys: torchvision `vgg16().features` ("0.weight", ...) and
    the lpips package's vgg.pth ("lin0.model.1.weight", ...)."""
    state = {f"features.{k}": v.contiguous() for k, v in vgg_features.items()}
    for i in range(len(LPIPS_CHANNELS)):
        state[f"heads.{i}.weight"] = lpips_heads[f"lin{i}.model.1.weight"].contiguous()
    return state


# --------------------------------------------------------------------------------------------
# The whole VAE objective
# --------------------------------------------------------------------------------------------


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
