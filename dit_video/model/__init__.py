"""The video diffusion transformer: tensors in, tensors out (torch and einops only)."""

from .config import DIT_PRESETS, DiTConfig, dit_config
from .dit import DiT
from .patch import patchify, unpatchify

__all__ = ["DiT", "DiTConfig", "DIT_PRESETS", "dit_config", "patchify", "unpatchify"]
