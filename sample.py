"""Sample videos from a trained DiT:  python sample.py ckpt=PATH prompts='[...]'

Writes one mp4 per prompt (with a JSON sidecar) and a PNG grid of frames.
"""

import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from dit_video.media import write_samples
from dit_video.pipeline import CheckpointError, Pipeline


@hydra.main(config_path="conf", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    prompts = list(cfg.prompts)
    if cfg.prompt_file:
        prompts = [p.strip() for p in Path(cfg.prompt_file).read_text().splitlines() if p.strip()]
    seeds = list(range(len(prompts))) if cfg.seeds is None else list(cfg.seeds)
    try:
        pipe = Pipeline.from_checkpoint(cfg.ckpt, weights=cfg.weights)
        settings = {k: cfg[k] for k in ("sampler", "steps", "cfg", "shift", "negative_prompt", "weights")}
        clips = pipe.generate(prompts, seeds, **{k: v for k, v in settings.items() if k != "weights"},
                              batch_size=int(cfg.batch_size))
    except (CheckpointError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    out = Path(cfg.out) if cfg.out else Path(cfg.ckpt).resolve().parent.parent / "samples"
    written = write_samples(clips, prompts, seeds, out, pipe.fps,
                            OmegaConf.to_container(OmegaConf.create(settings)) | {"checkpoint": str(cfg.ckpt)})
    print(f"wrote {len(written['videos'])} videos and {written['grid']}")


if __name__ == "__main__":
    main()
