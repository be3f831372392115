"""An LRU cache of caption embeddings in front of a frozen text encoder.

Training encodes the same captions again and again (the demo has a few dozen distinct captions;
caption dropout adds ""), and the frozen encoder in eval mode maps a caption to the same
embedding every time, so its output can be kept per caption string. Rows are stored trimmed to
their real tokens and re-padded to the batch's longest caption on the way out: the cached
batch has the shape and mask a batched `encode` would give, and its real-token rows agree
with it to float rounding (a caption encoded in another batch goes through differently shaped
matmuls: ~1e-6 on MiniLM). Padding positions are zero; the mask hides them from attention.

Memory: one entry holds L x D float32 values on the CPU (MiniLM, L <= 32, D = 384: <= 48 KiB;
T5-XXL at 300 tokens: ~4.7 MiB), so size the cache to the number of distinct captions you
expect to repeat.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class TextEmbeddingCache:
    """`encode(encoder, captions)` = `encoder.encode(captions)`, remembering the last
    `max_entries` captions' rows; only captions not in the cache reach the encoder."""

    def __init__(self, max_entries: int):
        if max_entries < 1:
            raise ValueError(f"text_encoder_cache={max_entries}: must be >= 1 entries (0 turns the cache off)")
        self.max_entries = max_entries
        self.rows: OrderedDict[str, torch.Tensor] = OrderedDict()  # caption -> [n, D] real-token rows, CPU
        self.hits = self.misses = 0

    @torch.no_grad()
    def encode(self, encoder, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """captions (B strings) -> (text_emb [B, L, D] float32, text_mask [B, L] bool) on the CPU."""
        missing = list(dict.fromkeys(c for c in captions if c not in self.rows))  # unique, in order
        n_missing = sum(c not in self.rows for c in captions)
        self.misses, self.hits = self.misses + n_missing, self.hits + len(captions) - n_missing
        if missing:
            emb, mask = encoder.encode(missing)  # [M, L, D], [M, L]
            lengths = mask.sum(1).tolist()
            for i, caption in enumerate(missing):
                n = int(lengths[i])
                if not bool(mask[i, :n].all()):
                    raise ValueError(
                        f"text_encoder_cache: {type(encoder).__name__} pads on the left; the cache expects "
                        f"right padding (set text_encoder_cache=0)")
                self.rows[caption] = emb[i, :n].detach().float().cpu().clone()  # [n, D]
        rows = []
        for caption in captions:
            self.rows.move_to_end(caption)  # most recently used last
            rows.append(self.rows[caption])
        # Evict after assembling this batch, so a batch with more distinct captions than
        # max_entries still gets all of its own rows.
        while len(self.rows) > self.max_entries:
            self.rows.popitem(last=False)
        length = max(r.shape[0] for r in rows)
        text_emb = torch.zeros(len(rows), length, rows[0].shape[1])  # [B, L, D]
        text_mask = torch.zeros(len(rows), length, dtype=torch.bool)  # [B, L]
        for i, r in enumerate(rows):
            text_emb[i, : r.shape[0]] = r
            text_mask[i, : r.shape[0]] = True
        return text_emb, text_mask
