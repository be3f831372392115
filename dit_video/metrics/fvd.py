"""Frechet Video Distance (Unterthiner et al. 2018): Frechet distance between Gaussians fitted to
I3D features of real and generated clips.

I3D (Carreira & Zisserman 2017, "Quo Vadis, Action Recognition?") is Inception-v1 inflated to
3-D: every k x k convolution becomes k x k x k, with TensorFlow-style "SAME" padding. FVD uses
the 400 Kinetics logits of the RGB network on 224 x 224 frames scaled to [-1, 1].

No I3D weights ship with dit-video and none can be downloaded here: `load_i3d(path)` reads a
local state dict (.safetensors, or .pt/.pth loaded with weights_only=True). Module names follow
the layout of the common PyTorch port of I3D (`Conv3d_1a_7x7.conv3d`, `Mixed_3b.b1a.bn`, ...,
`logits.conv3d`), so converted Kinetics-400 weights in that layout load directly; the width is
read from the weights, so a narrow randomly initialised I3D (tests) loads the same way.

FVD numbers are only comparable with the same weights, resolution, frame count and number of
clips: report them alongside.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dit_video.encoders.base import clip_to_video
from dit_video.metrics.frechet import frechet_distance_features

# Inception modules: (name, [1x1, 3x3 reduce, 3x3, "5x5" reduce, "5x5" (3x3 in I3D), pool proj]).
INCEPTION = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}


def _same_pad(x: torch.Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> torch.Tensor:
    """TensorFlow "SAME" padding for [B, C, T, H, W]: output = ceil(input / stride), extra pad at the end."""
    pads = []
    for size, k, s in zip(reversed(x.shape[2:]), reversed(kernel), reversed(stride), strict=True):
        total = max((math.ceil(size / s) - 1) * s + k - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class Unit3D(nn.Module):
    """Conv3d (SAME padding) + BatchNorm + ReLU; the logits layer has a bias and neither norm nor ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel=(1, 1, 1), stride=(1, 1, 1), norm_act: bool = True):
        super().__init__()
        self.kernel, self.stride, self.norm_act = tuple(kernel), tuple(stride), norm_act
        self.conv3d = nn.Conv3d(c_in, c_out, self.kernel, self.stride, bias=not norm_act)
        if norm_act:
            self.bn = nn.BatchNorm3d(c_out, eps=1e-3, momentum=0.01)  # TF defaults of the original

    def forward(self, x):
        x = self.conv3d(_same_pad(x, self.kernel, self.stride))
        return F.relu(self.bn(x)) if self.norm_act else x


class MaxPool3dSame(nn.Module):
    def __init__(self, kernel, stride):
        super().__init__()
        self.kernel, self.stride = tuple(kernel), tuple(stride)

    def forward(self, x):
        # Zero padding is safe: every pool follows a ReLU, so its inputs are >= 0.
        return F.max_pool3d(_same_pad(x, self.kernel, self.stride), self.kernel, self.stride)


class Inception(nn.Module):
    def __init__(self, c_in: int, c: tuple[int, ...]):
        super().__init__()
        self.b0 = Unit3D(c_in, c[0])
        self.b1a, self.b1b = Unit3D(c_in, c[1]), Unit3D(c[1], c[2], (3, 3, 3))
        self.b2a, self.b2b = Unit3D(c_in, c[3]), Unit3D(c[3], c[4], (3, 3, 3))
        self.b3a, self.b3b = MaxPool3dSame((3, 3, 3), (1, 1, 1)), Unit3D(c_in, c[5])
        self.out_channels = c[0] + c[2] + c[4] + c[5]

    def forward(self, x):
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1)


class I3D(nn.Module):
    """Inception-v1 I3D. `width` scales every channel count (1.0 = the published network)."""

    def __init__(self, num_classes: int = 400, width: float = 1.0):
        super().__init__()

        def ch(c: int) -> int:
            return max(1, round(c * width))

        self.width, self.num_classes = width, num_classes
        self.Conv3d_1a_7x7 = Unit3D(3, ch(64), (7, 7, 7), (2, 2, 2))
        self.MaxPool3d_2a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(ch(64), ch(64))
        self.Conv3d_2c_3x3 = Unit3D(ch(64), ch(192), (3, 3, 3))
        self.MaxPool3d_3a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        c_in = ch(192)
        pools = {"Mixed_4b": ((3, 3, 3), (2, 2, 2)), "Mixed_5b": ((2, 2, 2), (2, 2, 2))}
        self.stages = []
        for name, channels in INCEPTION.items():
            if name in pools:  # the pools before stage 4 and stage 5, as in the paper's figure 3
                pool_name = "MaxPool3d_4a_3x3" if name == "Mixed_4b" else "MaxPool3d_5a_2x2"
                setattr(self, pool_name, MaxPool3dSame(*pools[name]))
                self.stages.append(pool_name)
            block = Inception(c_in, tuple(ch(c) for c in channels))
            setattr(self, name, block)
            self.stages.append(name)
            c_in = block.out_channels
        self.feature_dim = c_in
        self.logits = Unit3D(c_in, num_classes, norm_act=False)

    def forward(self, video: torch.Tensor, features: str = "logits") -> torch.Tensor:
        """video float [B, 3, T, H, W] in [-1, 1] -> logits [B, num_classes] (features="logits")
        or the globally pooled last-block features [B, feature_dim] (features="pool")."""
        x = self.Conv3d_1a_7x7(video)  # [B, 64w, T/2, H/2, W/2]
        x = self.MaxPool3d_2a_3x3(x)  # [B, 64w, T/2, H/4, W/4]
        x = self.Conv3d_2c_3x3(self.Conv3d_2b_1x1(x))  # [B, 192w, T/2, H/4, W/4]
        x = self.MaxPool3d_3a_3x3(x)  # [B, 192w, T/2, H/8, W/8]
        for name in self.stages:
            x = getattr(self, name)(x)  # -> [B, 1024w, T/8, H/32, W/32]
        # Global average pool: at 224 x 224 and 16 frames it equals the original 2x7x7 pool.
        x = x.mean(dim=(2, 3, 4), keepdim=True)  # [B, 1024w, 1, 1, 1]
        if features == "pool":
            return x.flatten(1)
        return self.logits(x).flatten(1)  # [B, num_classes]


def save_i3d(model: I3D, path: str | Path) -> Path:
    """Write an I3D state dict as safetensors (loadable by `load_i3d`)."""
    from safetensors.torch import save_file

    path = Path(path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def load_i3d(path: str | Path) -> I3D:
    """An I3D in eval mode from a local state dict: .safetensors, or .pt/.pth (weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"i3d_path: no I3D weights at '{path}'; convert Kinetics-400 RGB I3D weights to a state dict "
            "in dit_video.metrics.fvd.I3D's layout (.safetensors or .pt) and point i3d_path at it"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    try:
        width = state["Conv3d_1a_7x7.conv3d.weight"].shape[0] / 64
        num_classes = state["logits.conv3d.weight"].shape[0]
    except KeyError as err:
        raise ValueError(f"i3d_path: '{path}' is not an I3D state dict in dit_video's layout (missing {err})") from None
    model = I3D(num_classes=num_classes, width=width)
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def i3d_features(clips, model: I3D, size: int = 224, batch_size: int = 8, features: str = "logits") -> np.ndarray:
    """uint8 clips [N, T, H, W, 3] -> I3D features float64 [N, D]: frames resized to size x size
    (bilinear), scaled to [-1, 1]."""

    clips = torch.as_tensor(np.asarray(clips))
    out = []
    for i in range(0, len(clips), batch_size):
        video = clip_to_video(clips[i:i + batch_size])  # [b, 3, T, H, W] in [-1, 1]
        b, c, t, h, w = video.shape
        frames = video.transpose(1, 2).reshape(b * t, c, h, w)  # [b*T, 3, H, W]
        frames = F.interpolate(frames, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        video = frames.reshape(b, t, c, size, size).transpose(1, 2)  # [b, 3, T, size, size]
        out.append(model(video.float(), features=features).double())
    return torch.cat(out).numpy()


def fvd(real, generated, model: I3D, size: int = 224, batch_size: int = 8) -> float:
    """FVD between uint8 clip sets [N, T, H, W, 3] (needs >= 2 clips each; hundreds for stable numbers)."""
    return frechet_distance_features(i3d_features(real, model, size, batch_size),
                                     i3d_features(generated, model, size, batch_size))
