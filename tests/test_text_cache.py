"""The caption-embedding cache (`text_encoder_cache`): same batch shape and mask as a batched
encode, real-token rows equal to float rounding, the encoder only sees new captions, LRU order."""

from __future__ import annotations

import pytest
import torch

from dit_video.encoders.text import HFTextEncoder, minilm_path
from dit_video.encoders.text_cache import TextEmbeddingCache

# A caption encoded inside another batch runs through differently shaped matmuls; on MiniLM the
# real-token rows then differ by ~2e-6 (measured), never by more than this.
ROW_ATOL = 1e-5


class CountingEncoder:
    """The real MiniLM encoder, recording which captions reach it."""

    def __init__(self, encoder):
        self.encoder, self.seen = encoder, []

    def encode(self, captions):
        self.seen.append(list(captions))
        return self.encoder.encode(captions)


@pytest.fixture(scope="module")
def encoder():
    return HFTextEncoder(minilm_path(), max_length=32)


def assert_matches_batched(cached, reference):
    (emb, mask), (ref_emb, ref_mask) = cached, reference
    assert emb.shape == ref_emb.shape and emb.dtype == ref_emb.dtype
    assert torch.equal(mask, ref_mask)  # same padding, same trimming
    torch.testing.assert_close(emb[mask], ref_emb[mask], rtol=0, atol=ROW_ATOL)
    assert not emb[~mask].any()  # padding is zero (masked out of cross-attention either way)


def test_cached_batches_equal_the_batched_encode(encoder):
    cache, counting = TextEmbeddingCache(16), CountingEncoder(encoder)
    first = ["a red square moving left", "", "a big blue circle moving up slowly over a green field"]
    assert_matches_batched(cache.encode(counting, first), encoder.encode(first))
    # A later batch mixing cached captions (stored from the first batch, padded there to its long
    # third caption) with new ones, padded now to a shorter longest; "" is caption dropout's.
    second = ["", "a green triangle moving right", "a red square moving left", "", "a cat"]
    assert_matches_batched(cache.encode(counting, second), encoder.encode(second))
    assert counting.seen == [first, ["a green triangle moving right", "a cat"]]  # only new captions, once each
    assert (cache.hits, cache.misses) == (3, 5)
    # All hits: the encoder is not called at all.
    assert_matches_batched(cache.encode(counting, ["a cat", ""]), encoder.encode(["a cat", ""]))
    assert len(counting.seen) == 2


def test_lru_evicts_the_least_recently_used(encoder):
    cache, counting = TextEmbeddingCache(2), CountingEncoder(encoder)
    cache.encode(counting, ["a"])
    cache.encode(counting, ["b"])
    cache.encode(counting, ["a"])  # "a" is now the most recent
    cache.encode(counting, ["c"])  # evicts "b"
    assert list(cache.rows) == ["a", "c"]
    cache.encode(counting, ["b"])
    assert counting.seen == [["a"], ["b"], ["c"], ["b"]]
    # A batch wider than the cache still gets all its rows.
    assert_matches_batched(cache.encode(counting, ["x", "y", "z"]), encoder.encode(["x", "y", "z"]))
    assert len(cache.rows) == 2


def test_dit_module_encode_text_uses_the_cache_only_when_asked(encoder):
    from torch import nn

    from dit_video.lit_module import DiTModule, OptimConfig

    captions = ["a yellow square moving down", "", "a blue circle moving up"]
    off = DiTModule(nn.Linear(1, 1), None, nn.Identity(), encoder, OptimConfig(), 0.9, {})
    on = DiTModule(nn.Linear(1, 1), None, nn.Identity(), encoder, OptimConfig(), 0.9, {}, text_encoder_cache=8)
    assert off.text_cache is None and on.text_cache.max_entries == 8
    assert torch.equal(off.encode_text(captions)[0], encoder.encode(captions)[0])  # default: unchanged path
    assert_matches_batched(on.encode_text(captions), encoder.encode(captions))
    on.encode_text(captions)
    assert (on.text_cache.hits, on.text_cache.misses) == (3, 3)
    assert not any(k.startswith("text_cache") for k in on.state_dict())  # not training state
    with pytest.raises(ValueError, match="text_encoder_cache"):
        TextEmbeddingCache(-1)
