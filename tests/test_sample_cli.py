"""`python sample.py`: prompt files, seeds, sampler choices, sidecars with hashes, provenance flags."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from tiny_run import ROOT, tiny_run

from dit_video.data.decode import decode_frames
from dit_video.files import sha256_file
from dit_video.provenance import detect, read_metadata


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory)


def sample(*overrides):
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "sample.py", "num_threads=1", *overrides], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)


def test_prompt_file_seeds_sampler_and_sidecars(run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square moving left\n# a comment line\n\na blue circle moving up\n")
    out = tmp_path / "samples"
    proc = sample(f"ckpt={run['run']}", f"prompt_file={prompts}", "seeds=[11,12,13,14]", "num_per_prompt=2",
                  "sampler=heun", "steps=2", "cfg=3.0", "negative_prompt=blurry", "weights=raw", f"out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    videos = sorted(out.glob("*.mp4"))
    assert len(videos) == 4 and (out / "grid.png").is_file() and (out / "samples.gif").is_file()
    sidecars = [json.loads(v.with_suffix(".json").read_text()) for v in videos]
    assert [s["seed"] for s in sidecars] == [11, 12, 13, 14]
    assert [s["prompt"] for s in sidecars] == ["a red square moving left"] * 2 + ["a blue circle moving up"] * 2
    first = sidecars[0]
    assert (first["sampler"], first["steps"], first["cfg"], first["negative_prompt"], first["weights"]) == (
        "heun", 2, 3.0, "blurry", "raw")
    ckpt = run["run"] / "checkpoints" / "last.ckpt"
    assert first["identity"]["checkpoint_sha256"] == sha256_file(ckpt)
    assert len(first["identity"]["config_sha256"]) == 64 and len(first["identity"]["sampling_sha256"]) == 64
    assert first["provenance"]["watermark"] and first["ai_generated"] is True
    tags = read_metadata(videos[0])
    assert tags["ai_generated"] == "true" and tags["checkpoint_sha256"] == sha256_file(ckpt)
    assert detect(videos[0]).detected
    assert decode_frames(videos[0]).shape == (17, 32, 32, 3)


def test_provenance_flags_turn_marks_off(run, tmp_path):
    out = tmp_path / "plain"
    proc = sample(f"ckpt={run['run']}/checkpoints/last.ckpt", "prompts=[a green triangle moving down]", "steps=2",
                  "sampler=ddim", "gif=false", "provenance.metadata=false", "provenance.watermark=false",
                  "provenance.label=false", f"out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    video = next(out.glob("*.mp4"))
    assert "ai_generated" not in read_metadata(video) and not detect(video).detected
    assert not (out / "samples.gif").exists()
    sidecar = json.loads(video.with_suffix(".json").read_text())
    assert sidecar["ai_generated"] is True and sidecar["provenance"]["watermark"] is False  # the sidecar still says so
    corner = decode_frames(video)[:, -6:, -10:]
    assert corner.mean() < 200  # no white label text


def test_blocklisted_prompt_is_refused_before_loading(run, tmp_path):
    proc = sample(f"ckpt={run['run']}", "prompts=[a deepfake of a famous actor]", f"out={tmp_path / 'no'}")
    assert proc.returncode == 2
    assert "refused" in proc.stderr and "deepfake" in proc.stderr and not (tmp_path / "no").exists()
    proc = sample(f"ckpt={tmp_path / 'missing.ckpt'}", "prompts=[a red square]")
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_seeds_must_match_prompts(run):
    proc = sample(f"ckpt={run['run']}", "prompts=[a,b]", "seeds=[1]")
    assert proc.returncode == 2 and "one per sample" in proc.stderr
