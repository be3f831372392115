"""NaViT-style packing (Dehghani et al. 2023) of clips with different (T, H, W) into one sequence.

    B latents [C, T_i, H_i, W_i] --patchify each--> tokens [N_i, P] --concatenate--> [1, ΣN_i, P]

Clip i owns tokens [cu[i], cu[i+1]) of the packed sequence. Self-attention is block-diagonal
over clips, cross-attention lets a clip see only its own caption (MMDiT: joint attention over
one [caption_i, clip_i] segment per clip, mmdit.JointPacking), RoPE positions restart at 0 for
every clip and adaLN modulation is gathered per token from the clip's t (DiT.forward_packed),
so a packed clip gets exactly the output it gets alone; no token is padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .patch import patchify, unpatchify


@dataclass(frozen=True)
class Packing:
    """Where each clip lives in a packed sequence: its token grid, in packing order."""

    grids: tuple[tuple[int, int, int], ...]  # (T', H', W') token grid of each clip

    @property
    def lengths(self) -> list[int]:
        """Tokens per clip, N_i = T' H' W'."""
        return [t * h * w for t, h, w in self.grids]

    def lengths_tensor(self, device=None) -> torch.Tensor:
        return torch.tensor(self.lengths, dtype=torch.long, device=device)  # [B]

    def seq_id(self, device=None) -> torch.Tensor:
        """Clip index of every packed token, long [ΣN]."""
        lengths = self.lengths_tensor(device)
        return torch.arange(len(lengths), device=device).repeat_interleave(lengths, output_size=sum(self.lengths))  # [ΣN]


def patchify_packed(latents: Sequence[torch.Tensor], patch_size: tuple[int, int, int]) -> tuple[torch.Tensor, Packing]:
    """B latents [C, T_i, H_i, W_i] (same C) -> (tokens [1, ΣN_i, C*pt*ph*pw], Packing)."""
    grids = tuple(tuple(n // p for n, p in zip(x.shape[1:], patch_size, strict=True)) for x in latents)
    tokens = torch.cat([patchify(x[None], patch_size)[0] for x in latents])  # [ΣN, C*pt*ph*pw]
    return tokens[None], Packing(grids)  # [1, ΣN, P]


def unpatchify_packed(
    tokens: torch.Tensor, packing: Packing, patch_size: tuple[int, int, int], channels: int
) -> list[torch.Tensor]:
    """tokens [1, ΣN_i, C*pt*ph*pw] -> B latents [C, T_i, H_i, W_i] (the inverse of patchify_packed)."""
    pieces = tokens[0].split(packing.lengths)  # B x [N_i, P]
    return [
        unpatchify(piece[None], patch_size, grid, channels)[0]  # [C, T_i, H_i, W_i]
        for piece, grid in zip(pieces, packing.grids, strict=True)
    ]
