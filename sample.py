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

from dit_video.api import config_hash, resolve_checkpoint, sample_identity
from dit_video.media import write_samples
from dit_video.pipeline import CheckpointError, Pipeline
from dit_video.provenance import PromptRefused, ProvenanceConfig, check_prompts


def read_prompts(cfg: DictConfig) -> list[str]:
    if cfg.prompt_file:
        lines = Path(cfg.prompt_file).read_text(encoding="utf-8").splitlines()
        prompts = [p.strip() for p in lines if p.strip() and not p.lstrip().startswith("#")]
    else:
        prompts = [str(p) for p in cfg.prompts]
    if not prompts:
        raise ValueError("no prompts: set prompts='[...]' or prompt_file=PATH")
    return [p for p in prompts for _ in range(int(cfg.num_per_prompt))]


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
            check_prompts(prompts + [str(cfg.negative_prompt)], provenance.blocklist)
        ckpt = resolve_checkpoint(cfg.ckpt)
        pipe = Pipeline.from_checkpoint(ckpt, weights=cfg.weights)
        settings = {k: OmegaConf.to_container(cfg, resolve=True)[k]
                    for k in ("sampler", "steps", "cfg", "shift", "negative_prompt", "weights")}
        clips = pipe.generate(prompts, seeds, **{k: v for k, v in settings.items() if k != "weights"},
                              batch_size=int(cfg.batch_size))
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
