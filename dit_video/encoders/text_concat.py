"""Several frozen text encoders as one, and the builder that reads conf/text_encoder/*.yaml.

SD3's recipe (diffusers StableDiffusion3Pipeline.encode_prompt), as a fact: the token
sequences of CLIP-L and CLIP-G (both 77 tokens) are joined along features (768 + 1280), zero-padded
in the feature dim to T5-XXL's 4096 and concatenated with T5's tokens along the sequence; the two
CLIPs' pooled vectors are concatenated along features (2048) and drive the adaLN conditioning.
Flux and HunyuanVideo take the sequence from one encoder (T5 / an LLM) and only the pooled vector
from CLIP.

ConcatTextEncoder does the general step: every encoder with `sequence: true` contributes its
text_emb, zero-padded in the feature dim to the widest and concatenated along the sequence (masks
concatenated alike); every encoder with a pooled vector contributes it to `pooled`, concatenated
along features. So dim = the widest sequence encoder, pooled_dim = the sum of the pooled dims.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dit_video.encoders.text import HFTextEncoder

# Fields of one encoder in conf/text_encoder/*.yaml: HFTextEncoder's arguments, plus `sequence`
# inside an `encoders:` list (false = contribute only the pooled vector, as CLIP does in Flux).
ENCODER_FIELDS = tuple(inspect.signature(HFTextEncoder.__init__).parameters)[1:]
CONCAT_FIELDS = ("name", "encoders")


class ConcatTextEncoder(nn.Module):
    """Frozen text encoders concatenated (see the module docstring). Implements `TextEncoder`."""

    def __init__(self, encoders: list[nn.Module], sequence: list[bool], name: str | None = None):
        super().__init__()
        if not encoders or len(encoders) != len(sequence):
            raise ValueError(
                "ConcatTextEncoder needs one `sequence` flag per encoder and at least one encoder"
            )
        if not any(sequence):
            raise ValueError(
                "text_encoder.encoders: at least one encoder needs sequence: true (the DiT "
                "cross-attends to a token sequence)"
            )
        self.encoders = nn.ModuleList(encoders)
        self.sequence = list(sequence)
        self.name = name or "+".join(e.name for e in encoders)
        self.dim: int = max(e.dim for e, s in zip(encoders, sequence, strict=True) if s)
        self.pooled_dim: int = sum(e.pooled_dim for e in encoders)
        self.max_length: int = sum(e.max_length for e, s in zip(encoders, sequence, strict=True) if s)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> ConcatTextEncoder:
        return super().train(False)  # frozen: stays in eval mode whatever the parent does

    @torch.no_grad()
    def encode_pooled(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """captions -> (text_emb [B, sum L_i, dim], text_mask [B, sum L_i], pooled [B, pooled_dim] or None)."""
        embs, masks, pooled = [], [], []
        for encoder, in_sequence in zip(self.encoders, self.sequence, strict=True):
            text_emb, text_mask, vec = encoder.encode_pooled(captions)  # [B, L_i, D_i], [B, L_i], [B, P_i]
            if in_sequence:
                embs.append(
                    F.pad(text_emb, (0, self.dim - text_emb.shape[-1]))
                )  # [B, L_i, dim], zeros appended
                masks.append(text_mask)
            if vec is not None:
                pooled.append(vec)
        text_emb = torch.cat(embs, dim=1)  # [B, sum L_i, dim]
        text_mask = torch.cat(masks, dim=1)  # [B, sum L_i]
        return text_emb, text_mask, (torch.cat(pooled, dim=-1) if pooled else None)  # [B, pooled_dim]

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        text_emb, text_mask, _ = self.encode_pooled(captions)
        return text_emb, text_mask

    def identity(self) -> dict:
        parts = [{**e.identity(), "sequence": s} for e, s in zip(self.encoders, self.sequence, strict=True)]
        # One sha256 over every part's weights hash and settings (not where the weights live), so a
        # latent cache keyed on (name, sha256, ...) changes when any part does.
        where_free = [{k: v for k, v in p.items() if k != "path"} for p in parts]
        digest = hashlib.sha256(json.dumps(where_free, sort_keys=True).encode()).hexdigest()
        return {
            "name": self.name,
            "path": None,
            "sha256": digest,
            "max_length": self.max_length,
            "dim": self.dim,
            "dtype": "+".join(p["dtype"] for p in parts),
            "pooled_dim": self.pooled_dim,
            "encoders": parts,
        }


def _check_fields(node: Mapping, known: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(node) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; known fields are {sorted(known)}")
    if "path" in known and "path" not in node:
        raise ValueError(f"{where}.path is missing: set it to a local Hugging Face model directory")


def build_text_encoder(node: Mapping) -> nn.Module:
    """The text encoder a conf/text_encoder/*.yaml describes (a plain, resolved mapping): one
    HFTextEncoder, or a ConcatTextEncoder when it has an `encoders:` list. Bad fields raise
    ValueError naming `text_encoder.<field>`."""
    if "encoders" not in node:
        _check_fields(node, ENCODER_FIELDS, "text_encoder")
        return HFTextEncoder(**node)
    _check_fields(node, CONCAT_FIELDS, "text_encoder")
    encoders, sequence = [], []
    for i, part in enumerate(node["encoders"]):
        where = f"text_encoder.encoders.{i}"
        part = dict(part)
        sequence.append(bool(part.pop("sequence", True)))  # documented default: the sequence joins
        _check_fields(part, ENCODER_FIELDS, where)
        encoders.append(HFTextEncoder(**part))
    return ConcatTextEncoder(encoders, sequence, name=node.get("name"))


def text_encoder_paths(node: Mapping) -> list[tuple[str, Path]]:
    """(config field, model directory) of every encoder a text_encoder config names, for preflight."""
    if "encoders" in node:
        return [
            (f"text_encoder.encoders.{i}.path", Path(str(p["path"]))) for i, p in enumerate(node["encoders"])
        ]
    return [("text_encoder.path", Path(str(node["path"])))]
