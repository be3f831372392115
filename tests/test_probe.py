"""Caption-faithfulness probe: near-perfect on ground truth, near chance on noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dit_video.data.decode import decode_clip
from dit_video.data.shards import encode_mp4
from dit_video.data.synthetic import all_combinations, caption_for, render_clip
from dit_video.metrics.probe import caption_faithfulness, parse_caption

T, SIZE = 17, 32


@pytest.fixture(scope="module")
def data_ground_truth() -> tuple[list[np.ndarray], list[str]]:
    """Every (colour, shape, direction) combination twice: 120 clips [T, H, W, 3]."""
    rng = np.random.default_rng(0)
    combos = all_combinations() * 2
    clips = [render_clip(*combo, T, SIZE, rng) for combo in combos]
    return clips, [caption_for(*combo) for combo in combos]


def test_ground_truth_scores_high(data_ground_truth):
    clips, captions = data_ground_truth
    result = caption_faithfulness(np.stack(clips), captions)  # [N, T, H, W, 3]
    assert result["colour"] >= 0.95 and result["direction"] >= 0.95 and result["shape"] >= 0.95
    assert result["score"] == pytest.approx((result["colour"] + result["direction"]) / 2)
    assert result["num_clips"] == len(result["per_clip"]) == len(clips)
    assert result["per_clip"][0]["target"] == parse_caption(captions[0])
    assert result["chance_colour"] == pytest.approx(0.2) and result["chance_direction"] == 0.25


def test_ground_truth_after_h264_round_trip(data_ground_truth):
    clips, captions = data_ground_truth
    rng = np.random.default_rng(0)
    decoded = [decode_clip(encode_mp4(clip, 8.0), T, None, rng) for clip in clips]  # list of [T, H, W, 3]
    result = caption_faithfulness(decoded, captions)
    assert result["colour"] >= 0.95 and result["direction"] >= 0.95 and result["shape"] >= 0.95


def test_noise_scores_near_chance(data_ground_truth):
    _, captions = data_ground_truth
    noise = torch.randint(0, 256, (len(captions), T, SIZE, SIZE, 3), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))  # [N, T, H, W, 3]
    result = caption_faithfulness(noise, captions)
    assert result["score"] < 0.4  # chance: colour 1/5, direction 1/4
    assert result["colour"] < 0.6 and result["direction"] < 0.6


def test_blank_clips_predict_nothing():
    result = caption_faithfulness(np.full((2, T, SIZE, SIZE, 3), 20, np.uint8), ["a red square moving left"] * 2)
    assert result["score"] == 0.0
    assert result["per_clip"][0]["predicted"] == {"colour": None, "direction": None, "shape": None}


@pytest.mark.parametrize("caption", ["a purple square moving left", "a red hexagon moving left",
                                     "a red square", "a red blue square moving left"])
def test_captions_outside_the_vocabulary_are_refused(caption):
    with pytest.raises(ValueError, match="exactly one"):
        parse_caption(caption)


def test_float_videos_are_refused():
    with pytest.raises(ValueError, match="uint8"):
        caption_faithfulness(np.zeros((1, T, SIZE, SIZE, 3), np.float32), ["a red square moving left"])
