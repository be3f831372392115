"""Pretrained diffusers autoencoders behind the `VideoAutoencoder` protocol, loaded from a local folder.

    vae.kind         diffusers class                 T frames -> T' latent frames     H, W / spatial
    diffusers_image  AutoencoderKL (SD, SDXL, FLUX)  any T -> T (per frame)           / 2^(levels-1)
    cogvideox        AutoencoderKLCogVideoX          1 + 4k -> 1 + k, k even          / 8
    wan              AutoencoderKLWan                1 + 4k -> 1 + k                  / 8 (x patch_size)
    hunyuan_video    AutoencoderKLHunyuanVideo       1 + 4k -> 1 + k                  / 8
    ltx_video        AutoencoderKLLTXVideo           1 + 8k -> 1 + k                  / 32

The factors above are the released models'; the adapter reads them from the folder's config.json,
so a smaller model of the same class works too. Normalisation, as the diffusers pipelines do it:

    latents = (z - shift) * scale,  z = posterior mode (or a sample with vae.sample=true)
      shift = latents_mean      if the model has per-channel stats (Wan, LTX), else shift_factor or 0
      scale = scaling_factor / latents_std  (missing factors count as 1)
    vae.latents_mean / vae.latents_std in our config (from data_prep.latent_stats) replace both:
      shift = latents_mean, scale = 1 / latents_std

Weights are read with `local_files_only=True` and `use_safetensors=True`: never a hub download,
never an unpickle. diffusers is the optional `pretrained-vae` extra.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from einops import rearrange
from torch import nn

from dit_video.encoders.causal_vae import check_video_size
from dit_video.files import sha256_file

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class VAEFamily:
    """What differs between the diffusers autoencoders we adapt."""

    class_name: str  # the diffusers class (also checked against `_class_name` in config.json)
    per_frame: bool = False  # an image VAE: time is folded into the batch
    odd_latent_frames: bool = False  # the decoder only keeps latent frame 0 alone when T' is odd (CogVideoX)


FAMILIES: dict[str, VAEFamily] = {
    "diffusers_image": VAEFamily("AutoencoderKL", per_frame=True),
    # CogVideoX's temporal upsampler doubles every frame when T' is even, so 2 latent frames decode
    # to 8, not 5: only 1 + 8j frames (odd T') round-trip (49 -> 13 -> 49 in the released model).
    "cogvideox": VAEFamily("AutoencoderKLCogVideoX", odd_latent_frames=True),
    "wan": VAEFamily("AutoencoderKLWan"),
    "hunyuan_video": VAEFamily("AutoencoderKLHunyuanVideo"),
    "ltx_video": VAEFamily("AutoencoderKLLTXVideo"),
}
VAE_KINDS = ("causal", *FAMILIES)  # causal = our CausalVAE (dit_video/encoders/causal_vae/)


@dataclass
class PretrainedVAEConfig:
    """A `conf/vae/*.yaml` group for a pretrained diffusers autoencoder."""

    kind: str  # diffusers_image | cogvideox | wan | hunyuan_video | ltx_video (see FAMILIES)
    path: str | None = None  # local folder with config.json + diffusion_pytorch_model.safetensors (save_pretrained)
    name: str | None = None  # a label recorded in checkpoints, e.g. "wan2.1_vae" (None = the diffusers class)
    subfolder: str | None = None  # e.g. "vae" when `path` is a whole diffusers pipeline folder
    latents_mean: list[float] | None = None  # per-channel mean of raw latents (data_prep.latent_stats); None = model's
    latents_std: list[float] | None = None  # per-channel std of raw latents; give both or neither
    sample: bool = False  # encode to a posterior sample instead of its mode: noisier latents, not reproducible
    chunk_frames: int = 0  # diffusers_image: frames per encoder/decoder call (0 = all at once); bounds memory
    # The diffusers model's own tiled encode/decode (enable_tiling, its default tile sizes): less memory at
    # high resolution, blended seams, so latents differ slightly (recorded in the identity). Not our causal
    # VAE's exact `vae.tiling` group: each diffusers class tiles in its own way.
    model_tiling: bool = False
    decode_timestep: float = 0.0  # ltx_video with timestep_conditioning (0.9.1+): the decoder's t (0 = clean)
    dtype: str = "float32"  # weights and compute dtype: float32 | bfloat16 | float16
    # Read by preflight/tests and checked against the loaded model (None = not checked).
    latent_channels: int | None = None  # C of the latents
    temporal_factor: int | None = None  # frames per latent frame after the first (1 for image VAEs)
    spatial_factor: int | None = None  # pixels per latent pixel along H and W

    @classmethod
    def from_node(cls, node: Mapping) -> PretrainedVAEConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(node) - known)
        if unknown:
            raise ValueError(f"vae: unknown field(s) {unknown} for vae.kind={node.get('kind')!r}; known: {sorted(known)}")
        values = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in node.items()}
        return cls(**values).validate()

    def validate(self) -> PretrainedVAEConfig:
        if self.kind not in FAMILIES:
            raise ValueError(f"vae.kind={self.kind!r}: use one of {list(VAE_KINDS)}")
        if (self.latents_mean is None) != (self.latents_std is None):
            raise ValueError("vae.latents_mean and vae.latents_std: give both (from data_prep.latent_stats) or neither")
        if self.latents_std is not None and min(self.latents_std) <= 0:
            raise ValueError(f"vae.latents_std={self.latents_std}: every entry must be > 0")
        if self.dtype not in DTYPES:
            raise ValueError(f"vae.dtype={self.dtype!r}: use one of {sorted(DTYPES)}")
        if self.chunk_frames < 0:
            raise ValueError(f"vae.chunk_frames={self.chunk_frames}: must be >= 0 (0 = all frames at once)")
        if self.chunk_frames and not FAMILIES[self.kind].per_frame:
            raise ValueError(f"vae.chunk_frames={self.chunk_frames} applies to image VAEs only (vae.kind="
                             f"{self.kind} runs its own frame chunks); set it to 0, or vae.model_tiling=true to save memory")
        return self


def _model_dir(cfg: PretrainedVAEConfig) -> Path:
    """The folder holding config.json; ValueError naming vae.path and what belongs there."""
    family = FAMILIES[cfg.kind]
    expected = (
        f"a diffusers {family.class_name} folder written by save_pretrained "
        "(config.json + diffusion_pytorch_model.safetensors)"
    )
    if cfg.path is None:
        raise ValueError(f"vae.path is not set: point it at {expected}")
    folder = Path(cfg.path) / (cfg.subfolder or "")
    config_path = folder / "config.json"
    if not config_path.is_file():
        if (folder / "model_index.json").is_file():  # a whole diffusers pipeline: the VAE is one subfolder
            raise ValueError(f"vae.path: '{folder}' is a diffusers pipeline folder; add vae.subfolder=vae")
        raise ValueError(f"vae.path: no config.json in '{folder}'; expected {expected}")
    class_name = json.loads(config_path.read_text()).get("_class_name")
    if class_name != family.class_name:
        raise ValueError(
            f"vae.path: '{folder}' holds a {class_name}, but vae.kind={cfg.kind} expects {family.class_name}; "
            f"set vae.kind to the matching kind ({list(FAMILIES)})"
        )
    if not any(folder.glob("*.safetensors")):
        raise ValueError(f"vae.path: no .safetensors weights in '{folder}'; expected {expected}")
    return folder


def vae_problem(node: Mapping) -> str | None:
    """Why the `vae` config group cannot be loaded (for preflight), or None. Pretrained kinds only."""
    try:
        _model_dir(PretrainedVAEConfig.from_node(node))
    except ValueError as err:
        return str(err)
    return None


def _factors(kind: str, model: nn.Module) -> tuple[int, int]:
    """(temporal_factor, spatial_factor) from the model's config, as its encoder is built."""
    c = model.config
    if kind == "diffusers_image":
        return 1, 2 ** (len(c.block_out_channels) - 1)
    if kind == "cogvideox":
        return int(c.temporal_compression_ratio), 2 ** (len(c.block_out_channels) - 1)
    if kind == "wan":
        return 2 ** sum(c.temperal_downsample), 2 ** (len(c.dim_mult) - 1) * (c.patch_size or 1)
    # HunyuanVideo and LTX store both ratios on the module.
    return int(model.temporal_compression_ratio), int(model.spatial_compression_ratio)


def _normalisation(cfg: PretrainedVAEConfig, model: nn.Module, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift [C], scale [C]) with latents = (z - shift) * scale (the rules in the module docstring)."""
    if cfg.latents_mean is not None:
        mean, std, factor = cfg.latents_mean, cfg.latents_std, 1.0
    else:
        c = model.config
        # LTX keeps its statistics as buffers (loaded with the weights); Wan and some image VAEs in config.json.
        buffers = dict(model.named_buffers())
        mean = buffers.get("latents_mean", c.get("latents_mean"))
        std = buffers.get("latents_std", c.get("latents_std"))
        factor = c.get("scaling_factor") or 1.0
        if mean is None:
            mean = [c.get("shift_factor") or 0.0] * channels
            std = [1.0] * channels
    mean = torch.as_tensor(mean, dtype=torch.float64).flatten()
    std = torch.as_tensor(std, dtype=torch.float64).flatten()
    for what, t in (("latents_mean", mean), ("latents_std", std)):
        if t.numel() != channels:
            raise ValueError(
                f"vae.{what} has {t.numel()} entries but the model at vae.path has latent_channels={channels}; "
                "recompute them with data_prep.latent_stats"
            )
    return mean.float(), (factor / std).float()


class DiffusersVideoAutoencoder(nn.Module):
    """A frozen diffusers autoencoder as the DiT sees it (implements `VideoAutoencoder`).

    `shift`/`scale` are [C] buffers with latents = (z - shift) * scale, as in CausalVideoAutoencoder,
    so tools that need raw latents (data_prep.latent_stats) treat both the same way.
    """

    def __init__(self, model: nn.Module, cfg: PretrainedVAEConfig, folder: Path):
        super().__init__()
        self.family = FAMILIES[cfg.kind]
        self.cfg, self.folder = cfg, folder
        self.model = model.eval().requires_grad_(False)
        c = model.config
        self.latent_channels = int(c.z_dim if cfg.kind == "wan" else c.latent_channels)
        self.temporal_factor, self.spatial_factor = _factors(cfg.kind, model)
        for field, have in (("latent_channels", self.latent_channels), ("temporal_factor", self.temporal_factor),
                            ("spatial_factor", self.spatial_factor)):
            want = getattr(cfg, field)
            if want is not None and want != have:
                raise ValueError(
                    f"vae.{field}={want} but the {self.family.class_name} at vae.path has {have}; "
                    f"set vae.{field}={have} (or null)"
                )
        shift, scale = _normalisation(cfg, model, self.latent_channels)
        self.register_buffer("shift", shift)  # [C]
        self.register_buffer("scale", scale)  # [C]
        self.compute_dtype = DTYPES[cfg.dtype]  # the weights' dtype: inputs are cast to it
        if cfg.model_tiling:
            model.enable_tiling()
        self._sha256: str | None = None
        self.eval()

    def train(self, mode: bool = True) -> DiffusersVideoAutoencoder:
        return super().train(False)  # frozen: a parent's .train() must not flip it

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        tf = self.temporal_factor
        check_video_size(num_frames, height, width, tf, self.spatial_factor)
        t = num_frames if self.family.per_frame else 1 + (num_frames - 1) // tf
        if self.family.odd_latent_frames and t % 2 == 0:
            raise ValueError(
                f"num_frames={num_frames} must be 1 + k*{tf} with k even for {self.family.class_name} (an even "
                f"number of latent frames does not decode back to {num_frames} frames), e.g. "
                f"{num_frames - tf} or {num_frames + tf}"
            )
        return t, height // self.spatial_factor, width // self.spatial_factor

    def _chunks(self, x: torch.Tensor) -> list[torch.Tensor]:
        n = self.cfg.chunk_frames or x.shape[0]
        return list(x.split(n))

    @torch.no_grad()
    def encode(self, video: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """video [B, 3, T, H, W] in [-1, 1] -> normalised latents [B, C, T', H', W'] (float32)."""
        b = video.shape[0]
        self.latent_shape(*video.shape[2:])
        x = video.to(self.compute_dtype)
        if self.family.per_frame:
            frames = rearrange(x, "b c t h w -> (b t) c h w")  # [B*T, 3, H, W]
            posteriors = [self.model.encode(f).latent_dist for f in self._chunks(frames)]
            z = torch.cat([p.sample(generator) if self.cfg.sample else p.mode() for p in posteriors])
            z = rearrange(z, "(b t) c h w -> b c t h w", b=b)  # [B, C, T, H', W']
        else:
            posterior = self.model.encode(x).latent_dist
            z = posterior.sample(generator) if self.cfg.sample else posterior.mode()  # [B, C, T', H', W']
        return (z.float() - self.shift.view(1, -1, 1, 1, 1)) * self.scale.view(1, -1, 1, 1, 1)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """normalised latents [B, C, T', H', W'] -> video [B, 3, T, H, W] (float32, about [-1, 1])."""
        b = latents.shape[0]
        z = latents.float() / self.scale.view(1, -1, 1, 1, 1) + self.shift.view(1, -1, 1, 1, 1)
        z = z.to(self.compute_dtype)
        if self.family.per_frame:
            frames = rearrange(z, "b c t h w -> (b t) c h w")  # [B*T', C, H', W']
            video = torch.cat([self.model.decode(f).sample for f in self._chunks(frames)])
            return rearrange(video.float(), "(b t) c h w -> b c t h w", b=b)  # [B, 3, T, H, W]
        if self.cfg.kind == "ltx_video" and self.model.config.timestep_conditioning:
            temb = torch.full((b,), self.cfg.decode_timestep, dtype=self.compute_dtype, device=z.device)
            return self.model.decode(z, temb).sample.float()
        return self.model.decode(z).sample.float()  # [B, 3, T, H, W]

    def identity(self) -> dict:
        """name, folder, a hash over the weight files, and the config that fixes the latents."""
        if self._sha256 is None:
            h = hashlib.sha256()
            for f in sorted(self.folder.glob("*.safetensors")):
                h.update(f"{f.name}:{sha256_file(f)}\n".encode())
            self._sha256 = h.hexdigest()
        model_config = {k: v for k, v in self.model.config.items() if not k.startswith("_")}  # not paths/versions
        return {
            "name": self.cfg.name or f"diffusers.{self.family.class_name}",
            "weights": str(self.folder),
            "sha256": self._sha256,
            "config": json.loads(json.dumps({
                "kind": self.cfg.kind,
                "model": model_config,
                "shift": self.shift.tolist(),
                "scale": self.scale.tolist(),
                "sample": self.cfg.sample,
                "model_tiling": self.cfg.model_tiling,
                "dtype": self.cfg.dtype,
            }, default=list)),
        }


def load_pretrained_vae(cfg: PretrainedVAEConfig, device: str | torch.device = "cpu") -> DiffusersVideoAutoencoder:
    """Load the diffusers autoencoder `cfg` names from its local folder, offline, frozen."""
    try:
        import diffusers
    except ImportError:
        raise ImportError(
            f"vae.kind={cfg.kind} needs diffusers: pip install -e '.[pretrained-vae]'"
        ) from None
    folder = _model_dir(cfg)
    cls = getattr(diffusers, FAMILIES[cfg.kind].class_name)
    # low_cpu_mem_usage needs accelerate; asking for it without accelerate only prints a warning.
    model = cls.from_pretrained(str(folder), local_files_only=True, use_safetensors=True,
                                torch_dtype=DTYPES[cfg.dtype],
                                low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None)
    return DiffusersVideoAutoencoder(model, cfg, folder).to(device)


__all__ = [
    "FAMILIES",
    "VAE_KINDS",
    "DiffusersVideoAutoencoder",
    "PretrainedVAEConfig",
    "VAEFamily",
    "load_pretrained_vae",
    "vae_problem",
]
