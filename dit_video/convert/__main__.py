"""python -m dit_video.convert SRC OUT.safetensors: a local diffusers Wan transformer -> our DiT weights.

SRC is a WanTransformer3DModel folder (config.json + safetensors, sharded or not) or a Wan pipeline
folder (its transformer/ is read; Wan 2.2 A14B's low-noise expert: --subfolder transformer_2). OUT
holds the DiT state dict with its DiTConfig in the header; train from it with `init_from=OUT`.
Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys

from dit_video.convert.files import load_wan_folder, parameter_count, save_dit_weights
from dit_video.errors import CheckpointError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dit_video.convert", description=__doc__.splitlines()[0])
    parser.add_argument("src", help="local diffusers WanTransformer3DModel folder (or a Wan pipeline folder)")
    parser.add_argument("out", help="the .safetensors file to write")
    parser.add_argument("--subfolder", default=None, help="model folder inside SRC (default: SRC or SRC/transformer)")
    parser.add_argument("--text-len", type=int, default=512,
                        help="caption tokens the model pads to and attends (Wan was trained with 512)")
    args = parser.parse_args(argv)
    try:
        cfg, state = load_wan_folder(args.src, args.subfolder, args.text_len)
    except CheckpointError as err:
        raise SystemExit(f"error: {err}") from None
    out = save_dit_weights(state, cfg, args.out, converted_from=str(args.src), weights="converted")
    print(f"{out}: {parameter_count(state) / 1e9:.3f}B parameters, hidden_size {cfg.hidden_size}, depth {cfg.depth}, "
          f"{cfg.num_heads} heads, patch {cfg.patch_size}, {cfg.in_channels} latent channels, text_dim {cfg.text_dim}")


if __name__ == "__main__":
    main(sys.argv[1:])
