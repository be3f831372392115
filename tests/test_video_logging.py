"""In-training sample videos reach TensorBoard and wandb (offline), read back from what they wrote."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence
from tiny_run import TINY_DATA, TINY_DIT, compose_train, tiny_run

from dit_video.eval.samples import gif_bytes

PROMPTS = ["a red square moving left", "a blue circle moving up"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory)


def train_with_samples(run, run_dir, *overrides):
    """A 2-step tiny DiT run that samples PROMPTS at step 2 and logs them; returns its config."""
    from dit_video.run import train

    data = [f"data.shards={run['shards']}/train-*.tar", f"data.val_shards={run['shards']}/val-*.tar"]
    cfg = compose_train("+experiment=demo", *data, *TINY_DATA, *TINY_DIT, f"vae.path={run['vae']}", "eval=default",
                        "trainer.max_steps=2", "optim.warmup_steps=5", "eval.samples.every_n_steps=2",
                        "eval.samples.steps=1", f"eval.samples.prompts={PROMPTS}", "eval.samples.probe=false",
                        "eval.throughput.enabled=false", f"run_dir={run_dir}", "trainer.enable_model_summary=false",
                        *overrides)
    threads = torch.get_num_threads()
    try:
        train(cfg)
    finally:
        torch.set_num_threads(threads)
    return cfg


def played_frames(gif: bytes, fps: float) -> tuple[int, tuple[int, int]]:
    """(frames shown at `fps`, (H, W)) of an animated GIF. GIF writers store a run of identical
    frames once with a longer duration, so frames are counted by display time, not by image.
    GIF delays are in 1/100 s, so one frame at 8 fps lasts 120 ms."""
    image = Image.open(io.BytesIO(gif))
    durations = [frame.info["duration"] for frame in ImageSequence.Iterator(image)]
    per_frame = 10 * round(100 / fps)
    assert all(d % per_frame == 0 for d in durations), durations
    return sum(durations) // per_frame, (image.height, image.width)


def test_gif_keeps_every_frame_and_size():
    rng = np.random.default_rng(0)
    clip = rng.integers(0, 256, (5, 6, 10, 3), dtype=np.uint8)
    clip[2] = clip[1]  # a still moment: stored once, shown twice
    assert played_frames(gif_bytes(clip, fps=8), fps=8) == (5, (6, 10))


def test_tensorboard_receives_sample_videos(run, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    cfg = train_with_samples(run, tmp_path, "logger=tensorboard")
    frames, (h, w) = int(cfg.data.num_frames), tuple(cfg.data.size)
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={IMAGES: 0}).Reload()
    tags = sorted(events.Tags()[IMAGES])
    assert tags == ["samples/00_a_red_square_moving_left", "samples/01_a_blue_circle_moving_up"]
    for tag in tags:
        (event,) = events.Images(tag)
        assert event.step == 2 and (event.height, event.width) == (h, w)
        assert played_frames(event.encoded_image_string, float(cfg.data.fps)) == (frames, (h, w))
    assert sorted((tmp_path / "samples" / "step-0000002").glob("*.mp4"))  # and to disk, as before


def test_wandb_offline_run_holds_sample_videos(run, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    import wandb

    wandb.finish()  # a run an earlier test left open would be reused by Lightning's WandbLogger
    cfg = train_with_samples(run, tmp_path, "logger=wandb", "logger.offline=true")
    wandb.finish()  # flush the offline run
    (offline,) = (tmp_path / "wandb").glob("offline-run-*")
    videos = sorted((offline / "files" / "media" / "videos").glob("samples_*.gif"))  # samples_<wandb step>_<hash>
    assert len(videos) == len(PROMPTS)
    for video in videos:
        assert played_frames(video.read_bytes(), float(cfg.data.fps)) == (int(cfg.data.num_frames),
                                                                          tuple(cfg.data.size))
