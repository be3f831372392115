"""Prompt -> text embedding -> sampler -> latents -> VAE decode -> clips, from a checkpoint.

Usable from notebooks and scripts without Lightning:

    pipe = Pipeline.from_checkpoint("outputs/demo/dit/checkpoints/last.ckpt")
    clips = pipe.generate(["a red square moving left"], seeds=[0])   # uint8 [N, T, H, W, 3]

Image-to-video and video extension: `generate(..., cond_clip=frames, cond_frames=K)` holds the
first K latent frames at the VAE's encoding of the given pixel frames (read_cond_frames reads
them from an image or video file).
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import torch
from omegaconf import OmegaConf

from dit_video.build import build_objective_from, build_text_encoder, build_vae
from dit_video.checkpoint.load import load_checkpoint
from dit_video.data.decode import decode_image, frame_indices, resize_crop
from dit_video.diffusion import sample
from dit_video.encoders.base import clip_to_video, video_to_clip
from dit_video.errors import SampleError
from dit_video.lora import checkpoint_dit_state
from dit_video.model import DiT, DiTConfig

COND_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def read_cond_frames(path: str | Path, num_frames: int, fps: float | None, size: tuple[int, int],
                     field: str = "cond_video") -> np.ndarray:
    """The first `num_frames` frames of a video file sampled at `fps` from frame 0 (an image file:
    its one frame), resized and centre-cropped to size = (H, W) as the loader does: uint8 [F, H, W, 3]."""

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{field}: '{path}' does not exist")
    if path.suffix.lower() in COND_IMAGE_SUFFIXES:
        try:
            frames = decode_image(path.read_bytes())  # [1, H, W, 3]
        except SampleError as err:
            raise ValueError(f"{field}: '{path}' is not a readable image ({err.detail})") from None
        return resize_crop(frames, size, mode="center")
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            source_fps = float(stream.average_rate or stream.guessed_rate or 1.0)
            frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])  # [N, H, W, 3]
    except (av.error.FFmpegError, IndexError, ValueError) as err:
        raise ValueError(f"{field}: '{path}' is not a readable video ({type(err).__name__})") from None
    try:  # the loader's frame spacing (decode.frame_indices), shifted to start at frame 0
        indices = frame_indices(len(frames), source_fps, num_frames, fps, np.random.default_rng(0))
    except SampleError as err:
        raise ValueError(f"{field}: '{path}' is too short for {num_frames} frames at fps={fps}: {err.detail}") from None
    return resize_crop(frames[indices - indices[0]], size, mode="center")  # [F, H, W, 3]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """"auto"/None -> cuda when available, else cpu; anything else as torch.device names it."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device}: CUDA is not available on this machine; use device=cpu or auto")
    return device


def autocast_dtype(device: torch.device, bf16_supported: bool | None = None) -> torch.dtype | None:
    """The dtype sampling autocasts to on `device` (None = no autocast).

    cpu: bf16 (fp16 CPU attention is ~10x slower than bf16). cuda: bf16 where the GPU has it
    (Ampere and newer), else fp16. bf16_supported=None asks torch.cuda."""
    if device.type == "cpu":
        return torch.bfloat16
    if device.type == "cuda":
        if bf16_supported is None:
            bf16_supported = torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16_supported else torch.float16
    return None


class Pipeline:
    """A trained DiT with its frozen VAE and text encoder, ready to sample."""

    def __init__(self, dit, vae, text_encoder, objective, meta: dict):
        self.dit, self.vae, self.text_encoder, self.meta = dit, vae, text_encoder, meta
        self.objective = objective  # the training objective fixes what the DiT predicts
        self.latent_shape = tuple(meta["latent_shape"])  # (T', H', W')
        data = meta["config"]["data"]
        self.fps = float(data.get("fps") or 8)

    @property
    def device(self) -> torch.device:
        return next(self.dit.parameters()).device

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Pipeline:
        """Move the DiT, VAE and text encoder to `device` ("auto" = cuda if available); dtype casts
        the DiT's weights (None keeps float32; sampling autocasts either way). The VAE keeps float32
        weights (its GroupNorms run in float32 under autocast), the text encoder its configured dtype."""
        device = resolve_device(device)
        self.dit.to(device=device, dtype=dtype)
        self.vae.to(device)
        self.text_encoder.to(device)
        return self

    @classmethod
    def from_checkpoint(cls, path: str | Path, weights: str = "ema", device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None) -> Pipeline:
        """A pipeline from a checkpoint file or a DCP checkpoint folder (FSDP2, any world size), on
        `device` (None/"auto" = cuda if available, else cpu) with weights in `dtype` (None = float32)."""

        if weights not in ("ema", "raw"):
            raise ValueError(f"weights={weights!r}: use 'ema' or 'raw'")
        ckpt = load_checkpoint(path)
        meta = ckpt["dit_video"]
        dit = DiT(DiTConfig.from_dict(meta["dit_config"]))
        prefix = "ema." if weights == "ema" else "dit."
        state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
        if meta.get("lora"):  # a LoRA run's checkpoint holds adapters only: merged onto its frozen weights
            state = checkpoint_dit_state(ckpt["state_dict"], meta, prefix)
        dit.load_state_dict(state)
        dit.eval().requires_grad_(False)
        cfg = OmegaConf.create(meta["config"])
        vae = build_vae(cfg)
        text_encoder = build_text_encoder(cfg)
        return cls(dit, vae, text_encoder, build_objective_from(cfg), meta).to(device, dtype)

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        seeds: list[int] | None = None,
        *,
        steps: int = 30,
        cfg: float = 5.0,
        shift: float | None = None,
        sampler: str = "euler",
        negative_prompt: str = "",
        batch_size: int = 16,
        autocast: bool = True,
        cond_clip: np.ndarray | torch.Tensor | None = None,
        cond_frames: int | list[int] | None = None,
        return_latents: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, torch.Tensor]:
        """One clip per (prompt, seed) pair: uint8 [N, T, H, W, 3]. seeds default to 0, 1, 2, ...

        shift=None samples with the time shift the model was trained with (objective.shift).
        cond_clip (uint8 [F, H, W, 3], the given first frames; an image is F = 1) with cond_frames
        holds latent frames of every sample at the VAE's encoding of those frames (see
        cond_latents); they come back bit-exact. return_latents=True also returns the sampled
        latents [N, C, T', H', W'] (float32).
        """
        if shift is None:
            shift = float(self.objective.cfg.shift)
        seeds = list(range(len(prompts))) if seeds is None else list(seeds)
        if len(seeds) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
        null_emb, null_mask, null_pooled = self.encode_prompts([negative_prompt])  # [1, L, D], [1, L], [1, P]|None
        c = self.meta["dit_config"]["in_channels"]
        cond_latents, cond_mask = (None, None) if cond_clip is None else self.cond_latents(cond_clip, cond_frames)
        device = self.device
        amp_dtype = autocast_dtype(device)
        if cond_latents is not None:
            cond_latents, cond_mask = cond_latents.to(device), cond_mask.to(device)
        clips, all_latents = [], []
        for i in range(0, len(prompts), batch_size):
            chunk, chunk_seeds = prompts[i : i + batch_size], seeds[i : i + batch_size]
            # Per-sample generators: a sample depends on its seed only, not on its batch neighbours;
            # drawn on the CPU and moved, so a seed gives the same noise on every device.
            noise = torch.stack(
                [torch.randn((c, *self.latent_shape), generator=torch.Generator().manual_seed(s)) for s in chunk_seeds]
            ).to(device)  # [b, C, T', H', W']
            text_emb, text_mask, pooled = self.encode_prompts(chunk)
            cond = {} if pooled is None else {"pooled": pooled, "null_pooled": null_pooled}
            if cond_latents is not None:  # one conditioning shared by every sample of the call
                b = len(chunk)
                cond |= {"cond_latents": cond_latents.expand(b, -1, -1, -1, -1), "cond_mask": cond_mask.expand(b, -1)}
            with torch.autocast(device.type, dtype=amp_dtype, enabled=autocast and amp_dtype is not None):
                latents = sample(
                    self.dit, text_emb, text_mask, tuple(noise.shape), null_text_emb=null_emb,
                    null_text_mask=null_mask, sampler=sampler, steps=steps, cfg=cfg, shift=shift, noise=noise,
                    objective=self.objective, **cond,
                )
                video = self.vae.decode(latents)  # [b, 3, T, H, W]
            clips.append(video_to_clip(video.float()).cpu())
            all_latents.append(latents.cpu())
        clips = torch.cat(clips).numpy()
        return (clips, torch.cat(all_latents)) if return_latents else clips

    def encode_prompts(self, prompts: list[str]):
        """(text_emb [B, L, D], text_mask [B, L], pooled [B, P] or None): the pooled vector only for a
        DiT that takes one (model.pooled_text_dim > 0)."""
        if not self.dit.cfg.pooled_text_dim:
            return (*self.text_encoder.encode(prompts), None)
        return self.text_encoder.encode_pooled(prompts)

    @torch.no_grad()
    def cond_latents(self, cond_clip: np.ndarray | torch.Tensor, cond_frames: int | list[int] | None = None):
        """Given pixel frames -> (cond_latents [1, C, T', H', W'], cond_mask bool [1, T']) for sampling.

        cond_clip: uint8 [F, H, W, 3] at the sampling size, frame 0 = the sample's first frame.
        cond_frames: K holds the first K latent frames (1 = image-to-video, K > 1 = video
        extension); a list holds those latent frame indices (keyframes); None = every latent frame
        the clip determines. Latent frame j needs pixel frames 0..j * temporal_factor: the causal
        VAE encodes frame 0 alone and each later latent frame from the frames up to it.
        """
        clip = torch.as_tensor(np.asarray(cond_clip))
        t_lat, h_lat, w_lat = self.latent_shape
        tf, sf = self.vae.temporal_factor, self.vae.spatial_factor
        size = (h_lat * sf, w_lat * sf)
        if clip.dtype != torch.uint8 or clip.dim() != 4 or clip.shape[-1] != 3:
            raise ValueError(f"cond_clip must be uint8 [F, H, W, 3] frames, got {clip.dtype} {tuple(clip.shape)}")
        if tuple(clip.shape[1:3]) != size:
            raise ValueError(
                f"cond_clip frames are {tuple(clip.shape[1:3])} but this model samples {size} (H, W); resize and "
                f"crop them first (dit_video.pipeline.read_cond_frames does, as the loader)"
            )
        available = 1 + (clip.shape[0] - 1) // tf  # latent frames the given pixel frames fix
        if cond_frames is None:
            frames = list(range(available))
        elif isinstance(cond_frames, int):
            frames = list(range(cond_frames))
        else:
            frames = sorted({int(j) for j in cond_frames})
        if not frames or frames[0] < 0:
            raise ValueError(f"cond_frames={cond_frames}: give K >= 1 or latent frame indices >= 0")
        if len(frames) >= t_lat or frames[-1] >= t_lat:
            raise ValueError(
                f"cond_frames={cond_frames}: a sample has {t_lat} latent frames ({1 + (t_lat - 1) * tf} pixel "
                f"frames); condition on fewer so at least one is generated"
            )
        if frames[-1] >= available:
            raise ValueError(
                f"cond_frames={cond_frames}: latent frame {frames[-1]} needs {1 + frames[-1] * tf} pixel frames, "
                f"cond_clip has {clip.shape[0]}"
            )
        used = clip[None, : 1 + frames[-1] * tf]  # [1, F', H, W, 3]
        encoded = self.vae.encode(clip_to_video(used).to(self.device)).float().cpu()  # [1, C, frames[-1] + 1, H', W']
        latents = torch.zeros(1, encoded.shape[1], t_lat, h_lat, w_lat)  # [1, C, T', H', W']
        latents[:, :, : encoded.shape[2]] = encoded
        mask = torch.zeros(1, t_lat, dtype=torch.bool)  # [1, T']
        mask[0, frames] = True
        return latents, mask
