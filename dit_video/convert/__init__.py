"""Released video DiTs <-> our DiT: read a local diffusers Wan transformer into DiT + DiTConfig
(exactly: same outputs), and write any Wan-expressible DiT back as a diffusers folder.

    python -m dit_video.convert /weights/Wan2.1-T2V-1.3B-Diffusers weights/wan2_1_t2v_1_3b.safetensors

Modules:
  wan.py    the config and weight-name mapping, both ways (pure functions)
  files.py  diffusers folders (single file or sharded) and our one-file format on disk
"""

from dit_video.convert.files import (
    load_dit_weights,
    load_wan_folder,
    save_diffusers_folder,
    save_dit_weights,
)
from dit_video.convert.wan import config_difference, dit_config_from_wan, wan_config_from_dit

__all__ = [
    "config_difference", "dit_config_from_wan", "load_dit_weights", "load_wan_folder", "save_diffusers_folder",
    "save_dit_weights", "wan_config_from_dit",
]
