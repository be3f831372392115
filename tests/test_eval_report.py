"""The evaluate command on a tiny trained demo checkpoint: the run's validation captions as prompts,
probe, motion, held-out loss, FVD (tiny random I3D), CLIPScore (tiny random CLIP), EMA vs raw,
JSON + Markdown report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.linalg import sqrtm
from tiny_run import ROOT, calibrated_random_i3d, save_tiny_clip, tiny_run

import dit_video.eval.scores as scores_module
from dit_video.data.browse import browse_shards
from dit_video.eval.evaluate import EvalConfig, evaluate, main
from dit_video.metrics.fvd import i3d_features, save_i3d


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory)


def reference_fvd(real: np.ndarray, fake: np.ndarray) -> float:
    """Frechet distance the textbook way (pytorch-fid): scipy's general matrix square root of S1 S2."""
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    return float(((real.mean(0) - fake.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * sqrtm(s1 @ s2).real))


def test_evaluate_writes_json_and_markdown_with_every_metric(run, tmp_path, monkeypatch):
    val = f"{run['shards']}/val-*.tar"
    real = np.stack([s["clip"] for s in browse_shards(val, limit=8)])
    i3d = save_i3d(calibrated_random_i3d(real), tmp_path / "i3d.safetensors")
    clip_dir = save_tiny_clip(tmp_path / "clip")
    seen = []  # (clips, features) of every I3D pass: the reference set, then one per weights

    def recording_i3d_features(clips, model, **kw):
        features = i3d_features(clips, model, **kw)
        seen.append((np.array(clips), features))
        return features

    monkeypatch.setattr(scores_module, "i3d_features", recording_i3d_features)
    threads = torch.get_num_threads()
    cfg = EvalConfig(ckpt=str(run["run"]), weights="both", steps=2, i3d_path=str(i3d), i3d_size=32,
                     clip_path=str(clip_dir), out=str(tmp_path / "eval"), num_real=10, num_threads=1)
    try:
        report = evaluate(cfg)
    finally:
        torch.set_num_threads(threads)
    # the prompts: every caption of the 10 validation clips (num_prompts=16 asks for more than there are)
    val_captions = [s["caption"] for s in browse_shards(val, limit=100)]
    assert sorted(report["prompts"]) == sorted(val_captions) and report["references"]["split"] == "val"
    assert set(report["results"]) == {"ema", "raw"} and report["num_samples"] == 10
    for result in report["results"].values():
        assert 0.0 <= result["probe"]["score"] <= 1.0 and result["probe"]["num_clips"] == 10
        assert 0.0 <= result["clipscore"] <= 100.0
        assert 0.0 <= result["motion"]["vs_real"] <= 1.0 and result["held_out_loss"]["val/loss"] > 0
    # demo captions name no camera motion: that part of the motion score is skipped, nothing else
    assert report["fvd_reference"]["num_clips"] == 10 and set(report["skipped"]) == {"motion_vs_caption"}
    # FVD against an independent computation: the reference set is the first 10 validation clips,
    # each weights' FVD is the textbook Frechet distance between the two feature sets.
    (real_clips, real_features), *fakes = seen
    np.testing.assert_array_equal(real_clips, np.stack([s["clip"] for s in browse_shards(val, limit=10)]))
    assert [len(clips) for clips, _ in fakes] == [10, 10]
    for weights, (_, fake_features) in zip(("ema", "raw"), fakes, strict=True):
        assert report["results"][weights]["fvd"] == pytest.approx(reference_fvd(real_features, fake_features),
                                                                  rel=1e-5)
    saved = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert saved["results"]["ema"]["fvd"] == pytest.approx(report["results"]["ema"]["fvd"])
    markdown = (tmp_path / "eval" / "report.md").read_text()
    assert "| metric | ema | raw |" in markdown and "FVD" in markdown and "CLIPScore" in markdown
    assert "probe score" in markdown and report["identity"]["checkpoint_sha256"] in markdown
    assert (tmp_path / "eval" / "samples_ema" / "grid.png").is_file()


def test_evaluate_command_line_skips_what_it_lacks(run, tmp_path):
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "dit_video.eval.evaluate", f"ckpt={run['run']}", "steps=1", "num_threads=1",
                           "prompts=[a red square moving left,a fish swimming]", "write_samples=false",
                           f"out={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["skipped"]) == {"probe", "fvd", "clipscore", "motion_vs_real", "motion_vs_caption"}
    assert "| sampling seconds |" in proc.stdout and "| held-out loss |" in proc.stdout
    assert report["prompts"] == ["a red square moving left", "a fish swimming"]  # given prompts override the run's
    assert main([f"ckpt={tmp_path / 'missing.ckpt'}"]) == 2
    assert main(["ckpt=x", "not_a_field=1"]) == 2
