"""LPIPS (Zhang et al. 2018), VGG16 variant: the perceptual distance of VAE training, with every
weight read from one local file."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

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
                                "(see load_lpips in dit_video/encoders/causal_vae/lpips.py for how to make one) "
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
