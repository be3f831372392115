"""Sample videos from a trained DiT:  python sample.py ckpt=PATH prompts='[...]'

Writes one mp4 per sample with a JSON sidecar (prompt, seed, sampler settings, checkpoint and
config hashes), a PNG frame grid and an animated GIF, all marked as AI-generated
(conf/sample.yaml `provenance:`).
"""

import sys
from datetime import datetime
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from dit_video.checkpoint.paths import resolve_checkpoint
from dit_video.errors import CheckpointError, PromptRefused
from dit_video.files import sha256_file
from dit_video.identity import config_hash, sample_identity
from dit_video.media import write_samples
from dit_video.pipeline import Pipeline, read_cond_frames
from dit_video.provenance import ProvenanceConfig, check_prompts


def read_prompts(cfg: DictConfig) -> list[str]:
    if cfg.prompt_file:
        lines = Path(cfg.prompt_file).read_text(encoding="utf-8").splitlines()
        prompts = [p.strip() for p in lines if p.strip() and not p.lstrip().startswith("#")]
    else:
        prompts = [str(p) for p in cfg.prompts]
    if not prompts:
        raise ValueError("no prompts: set prompts='[...]' or prompt_file=PATH")
    return [p for p in prompts for _ in range(int(cfg.num_per_prompt))]


def read_cond(cfg: DictConfig, pipe: Pipeline) -> tuple[dict, dict]:
    """(generate's cond_clip/cond_frames, what the sidecar records) from cond_image=PATH
    (image-to-video) or cond_video=PATH cond_frames=K (video extension); ({}, {}) for neither."""
    if cfg.cond_image is not None and cfg.cond_video is not None:
        raise ValueError("cond_image and cond_video: give one (an image starts the samples, a video is extended)")
    if cfg.cond_image is None and cfg.cond_video is None:
        if cfg.cond_frames is not None:
            raise ValueError("cond_frames: needs cond_video=PATH (the video whose first latent frames are kept)")
        return {}, {}
    field = "cond_image" if cfg.cond_image is not None else "cond_video"
    k = 1 if cfg.cond_frames is None else int(cfg.cond_frames)
    t_lat, h_lat, w_lat = pipe.latent_shape
    if field == "cond_image" and k != 1:
        raise ValueError(f"cond_frames={k}: an image is one latent frame; use cond_video=PATH for more")
    if not 1 <= k < t_lat:
        raise ValueError(f"cond_frames={k}: samples have {t_lat} latent frames; give 1 <= cond_frames < {t_lat}")
    tf, sf = pipe.vae.temporal_factor, pipe.vae.spatial_factor
    frames = read_cond_frames(cfg[field], 1 + (k - 1) * tf, pipe.fps, (h_lat * sf, w_lat * sf), field)  # [F, H, W, 3]
    record = {field: str(cfg[field]), f"{field}_sha256": sha256_file(cfg[field]), "cond_frames": k}
    return {"cond_clip": frames, "cond_frames": k}, record


@hydra.main(config_path="conf", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    provenance = ProvenanceConfig(**OmegaConf.to_container(cfg.provenance, resolve=True))
    try:
        prompts = read_prompts(cfg)
        seeds = [int(cfg.seed) + i for i in range(len(prompts))] if cfg.seeds is None else [int(s) for s in cfg.seeds]
        if len(seeds) != len(prompts):
            raise ValueError(f"seeds: got {len(seeds)} seeds for {len(prompts)} samples; give one per sample")
        if provenance.prompt_filter:  # before loading anything: a refused prompt costs nothing
            check_prompts(prompts, provenance.blocklist, negative_prompt=cfg.negative_prompt)
        ckpt = resolve_checkpoint(cfg.ckpt)
        pipe = Pipeline.from_checkpoint(ckpt, weights=cfg.weights, device=cfg.device)
        settings = {k: OmegaConf.to_container(cfg, resolve=True)[k]
                    for k in ("sampler", "steps", "cfg", "shift", "negative_prompt", "weights")}
        cond, cond_settings = read_cond(cfg, pipe)
        clips = pipe.generate(prompts, seeds, **{k: v for k, v in settings.items() if k != "weights"},
                              batch_size=int(cfg.batch_size), **cond)
        settings |= cond_settings  # recorded (and hashed) only when given: text-to-video sidecars are unchanged
    except (CheckpointError, PromptRefused, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    identity = sample_identity(ckpt, pipe.meta, cfg.weights) | {"sampling_sha256": config_hash(settings)}
    out = Path(cfg.out) if cfg.out else ckpt.resolve().parent.parent / "samples" / datetime.now().strftime(
        "%Y-%m-%d_%H-%M-%S")
    written = write_samples(clips, prompts, seeds, out, pipe.fps, settings | {"checkpoint": str(ckpt)},
                            provenance=provenance, identity=identity, gif=bool(cfg.gif))
    print(f"wrote {len(written['videos'])} videos, {written['grid']}" + (f", {written['gif']}" if cfg.gif else ""))


if __name__ == "__main__":
    main()
