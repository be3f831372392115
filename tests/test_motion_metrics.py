"""Motion metrics (dit_video.metrics.motion): known shifts and zooms recovered, every camera motion
named, shuffled frames lose their motion, captions parsed, scenes told apart by colour."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dit_video.data.camera import CAMERA_MOTIONS, camera_caption, camera_windows, render_camera_clip
from dit_video.data.decode import decode_clip
from dit_video.data.shards import encode_mp4
from dit_video.metrics.motion import (
    SceneClassifier,
    camera_scores,
    caption_motion,
    caption_scene,
    classify_motion,
    clip_motion,
    estimate_motion,
    motion_accuracy,
    motion_applies,
    motion_fidelity,
)

T, SIZE = 17, 32


def texture(seed: int, tint=(1.0, 1.0, 1.0)) -> np.ndarray:
    """A smooth random colour texture uint8 [192, 256, 3] (bicubic upsampling of noise), tinted."""
    noise = np.random.default_rng(seed).integers(0, 256, (24, 32, 3)).astype(np.uint8)
    big = np.asarray(Image.fromarray(noise).resize((256, 192), Image.Resampling.BICUBIC)).astype(np.float64)
    return np.clip(big * np.array(tint), 0, 255).astype(np.uint8)


def boxes(cx, cy, side) -> np.ndarray:
    """[T, 4] square boxes from per-frame centres and sides (arrays or scalars broadcast to T)."""
    cx, cy, side = (np.broadcast_to(np.asarray(v, np.float64), (T,)) for v in (cx, cy, side))
    return np.stack([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], axis=1)


@pytest.mark.parametrize("step_x, step_y", [(0.75, 0.0), (0.0, -1.25), (-0.4, 0.6), (2.5, 0.0)])
def test_known_shifts_recovered(step_x, step_y):
    """Content moving (step_x, step_y) output pixels per frame: the box moves the other way, 2
    texture pixels per output pixel (a 64-px box seen at 32 px), starting centred."""
    t = np.arange(T) - (T - 1) / 2
    clip = render_camera_clip(texture(0), boxes(128 - 2 * step_x * t, 96 - 2 * step_y * t, 64), SIZE)
    steps = estimate_motion(clip)  # [T - 1, 3]: frame fractions and log zoom
    np.testing.assert_allclose(steps[:, 0] * SIZE, step_x, atol=0.1)
    np.testing.assert_allclose(steps[:, 1] * SIZE, step_y, atol=0.1)
    np.testing.assert_allclose(steps[:, 2], 0.0, atol=0.03)
    np.testing.assert_allclose(clip_motion(clip)[:2], [step_x * (T - 1) / SIZE, step_y * (T - 1) / SIZE], atol=0.02)


@pytest.mark.parametrize("factor", [1.5, 1 / 1.5, 2.0])
def test_known_zoom_recovered(factor):
    """The field of view shrinks by `factor` over the clip (content grows by it)."""
    side = 120 * np.exp(-np.log(factor) * np.arange(T) / (T - 1))
    clip = render_camera_clip(texture(1), boxes(128, 96, side), SIZE)
    steps = estimate_motion(clip)  # [T - 1, 3]
    np.testing.assert_allclose(steps[:, 2].sum(), np.log(factor), rtol=0.15)
    assert np.abs(steps[:, :2]).max() < 0.01  # about the centre: no translation
    assert classify_motion(clip_motion(clip)) == ("zoom in" if factor > 1 else "zoom out")


@pytest.fixture(scope="module")
def rendered() -> tuple[np.ndarray, list[str]]:
    """Every camera motion on 4 textures with the generator's random speeds: 28 clips, captioned."""
    clips, captions = [], []
    for seed in range(4):
        tex, rng = texture(10 + seed), np.random.default_rng(seed)
        for motion in CAMERA_MOTIONS:
            clips.append(render_camera_clip(tex, camera_windows(motion, T, tex.shape[:2], rng), SIZE))
            captions.append(camera_caption(("hill", "street", "car")[seed % 3], motion))
    return np.stack(clips), captions  # [N, T, H, W, 3]


def test_every_camera_motion_named(rendered):
    clips, captions = rendered
    result = motion_accuracy(clips, captions)
    assert result["motion"] == 1.0, [r for r in result["per_clip"] if r["predicted"] != r["target"]]
    assert result["chance"] == pytest.approx(1 / 7)
    pan = result["per_clip"][0]  # "pan left": content moves right by 0.3-0.45 of the frame
    assert pan["target"] == "pan left" and 0.25 < pan["motion"][0] < 0.5


def test_motion_survives_h264(rendered):
    clips, captions = rendered
    decoded = [decode_clip(encode_mp4(c, 8.0), T, None, np.random.default_rng(0)) for c in clips[:14]]
    assert motion_accuracy(decoded, captions[:14])["motion"] == 1.0


def test_shuffled_frames_lose_their_motion(rendered):
    clips = rendered[0][:14]  # two of each motion
    rng = np.random.default_rng(0)
    shuffled = np.stack([c[rng.permutation(T)] for c in clips])  # [N, T, H, W, 3]
    broken = motion_fidelity(clips, shuffled)
    assert broken["motion_fidelity"] < 0.5 and broken["motion_error"] > 0.1  # "still" clips keep theirs
    assert motion_fidelity(clips[:7], clips[:7]) == {"motion_fidelity": 1.0, "motion_error": 0.0}
    reversed_ = motion_fidelity(clips[:7], clips[:7, ::-1])
    assert reversed_["motion_fidelity"] == pytest.approx(1 / 7)  # every motion but "still" flips


def test_deterministic(rendered):
    clips, _ = rendered
    np.testing.assert_array_equal(clip_motion(clips[3]), clip_motion(clips[3].copy()))


def test_flat_and_noise_clips():
    assert classify_motion(clip_motion(np.full((T, SIZE, SIZE, 3), 90, np.uint8))) == "still"
    noise = np.random.default_rng(0).integers(0, 256, (20, T, SIZE, SIZE, 3), dtype=np.uint8)
    labels = [classify_motion(clip_motion(c)) for c in noise]
    assert labels.count("still") >= 16  # independent frames: no consistent camera path


def test_caption_parsing():
    for motion in CAMERA_MOTIONS:
        assert caption_motion(camera_caption("street", motion)) == motion
        assert caption_scene(camera_caption("street", motion)) == "a city street with cars and bicycles"
    assert caption_motion("Drone shot, panning to the right over a lake") == "pan right"
    assert caption_motion("the camera zooms in and pans left") is None  # two motions: not one label
    assert caption_motion("a red square moving left") is None
    assert caption_scene("A lake at dawn; static shot") == "a lake at dawn;"
    assert motion_applies([camera_caption("car", "still")]) and not motion_applies(["a red square moving left"])
    with pytest.raises(ValueError, match="names no single camera motion"):
        motion_accuracy(np.zeros((1, T, SIZE, SIZE, 3), np.uint8), ["a red square moving left"])


def test_scenes_told_apart_by_colour():
    """Three tinted texture families: a classifier on some clips names the scene of others."""
    tints = {"hill": (0.5, 1.0, 0.4), "street": (0.8, 0.8, 0.8), "car": (0.4, 0.5, 1.0)}
    ref, ref_captions, test, test_captions = [], [], [], []
    for i, (scene, tint) in enumerate(tints.items()):
        for j, motion in enumerate(CAMERA_MOTIONS):
            tex = texture(100 * i + j, tint)
            clip = render_camera_clip(tex, camera_windows(motion, T, tex.shape[:2], np.random.default_rng(j)), SIZE)
            (ref if j % 2 else test).append(clip)
            (ref_captions if j % 2 else test_captions).append(camera_caption(scene, motion))
    classifier = SceneClassifier(ref, ref_captions, k=3)
    assert classifier.labels == sorted(caption_scene(camera_caption(s, "still")) for s in tints)
    scores = camera_scores(np.stack(test), test_captions, classifier)
    assert scores["scene"] == 1.0 and scores["motion"] == 1.0 and scores["both"] == 1.0
    assert scores["chance_scene"] == pytest.approx(1 / 3)
    per_scene = len(test) // 3
    swapped = camera_scores(np.stack(test), test_captions[per_scene:] + test_captions[:per_scene], classifier)
    assert swapped["scene"] < 0.5 and swapped["both"] < 0.5  # wrong captions score low
