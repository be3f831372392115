"""Train a DiT (or, with task=vae, the video VAE):  python train.py +experiment=demo [overrides]"""

import sys

import hydra
from omegaconf import DictConfig

from dit_video.errors import CheckpointError, ConfigError
from dit_video.run import train


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except (ConfigError, CheckpointError) as err:  # a config, machine or checkpoint problem: one line
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
