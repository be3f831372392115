"""Text encoder on the real MiniLM weights (offline)."""

from __future__ import annotations

import logging
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # these tests must never reach for the network

from dit_video.encoders import HFTextEncoder, TextEncoder, minilm_path  # noqa: E402


@pytest.fixture(scope="module")
def minilm() -> HFTextEncoder:
    return HFTextEncoder(minilm_path(), max_length=16)


def test_minilm_shapes_masks_and_empty_caption(minilm):
    assert isinstance(minilm, TextEncoder)
    assert minilm.dim == 384
    captions = ["a red square moves left", "a blue disc", ""]
    text_emb, text_mask = minilm.encode(captions)
    assert text_emb.dtype == torch.float32 and text_mask.dtype == torch.bool
    assert text_emb.shape == (3, text_mask.shape[1], 384)
    lengths = text_mask.sum(1)
    assert lengths[0] > lengths[1] > lengths[2] >= 1  # "" is [CLS][SEP]: never an empty row
    assert lengths[2] == 2
    assert text_mask[0].all()  # the longest caption sets L
    assert not text_mask[2, 2:].any()  # padding is False
    assert torch.isfinite(text_emb).all()


def test_minilm_deterministic_frozen_and_batch_independent(minilm):
    a, mask_a = minilm.encode(["a green square bounces", "x"])
    b, mask_b = minilm.encode(["a green square bounces", "x"])
    assert torch.equal(a, b) and torch.equal(mask_a, mask_b)
    alone, _ = minilm.encode(["a green square bounces"])
    torch.testing.assert_close(alone[0], a[0], atol=1e-5, rtol=1e-4)
    assert not minilm.model.training
    assert not any(p.requires_grad for p in minilm.parameters())
    ident = minilm.identity()
    assert ident["dim"] == 384 and ident["max_length"] == 16 and len(ident["sha256"]) == 64


def test_minilm_truncates_and_warns_once(minilm, caplog):
    minilm._warned_truncation = False
    long = " ".join(["colour"] * 40)
    with caplog.at_level(logging.WARNING, logger="dit_video.encoders.text"):
        _, mask = minilm.encode([long, "short"])
        minilm.encode([long])
    assert mask.shape[1] == 16 and mask[0].all()
    assert sum("truncated" in r.getMessage() for r in caplog.records) == 1


def test_text_encoder_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HFTextEncoder(tmp_path / "no_such_model")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        HFTextEncoder(tmp_path)
