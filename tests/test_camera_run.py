"""The camera demo's wiring on tiny runs: val/motion_fidelity in VAE validation, the temporal-difference
loss, latent caches, eval/motion_accuracy + eval/scene_accuracy in DiT training, `evaluate`'s
camera table (real / VAE / generated, with the VAE's motion fidelity) and benchmarks/motion.py,
which re-measures that table from a camera demo folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_run import TINY_DATA, TINY_DIT, compose_train

from benchmarks.motion import read_table, remeasure, report
from data_prep.encode_latents import main as encode_latents
from data_prep.make_camera import make_camera
from dit_video.data.camera import CAMERA_SCENES, camera_caption, camera_combinations
from dit_video.encoders.causal_vae import VAE_PRESETS, CausalVAE, VAELoss, VAELossConfig
from dit_video.encoders.causal_vae.losses import temporal_difference_loss
from dit_video.eval.camera import camera_prompts
from dit_video.eval.evaluate import EvalConfig, evaluate
from dit_video.plots import read_metric
from dit_video.run import train

TINY_VAE = ["vae.base_channels=8", "vae.channel_mult=[1,1,2]", "vae.norm_groups=4"]


def textures(num_frames: int = 10) -> dict[str, np.ndarray]:
    """Smooth random textures, a different tint per scene: uint8 [N, 96, 128, 3]."""
    rng = np.random.default_rng(0)
    tints = np.array([[0.5, 1.0, 0.4], [0.8, 0.8, 0.8], [0.4, 0.5, 1.0]])
    out = {}
    for scene, tint in zip(CAMERA_SCENES, tints, strict=True):
        coarse = rng.integers(0, 256, (num_frames, 12, 16, 3)) * tint
        out[scene] = np.kron(coarse, np.ones((1, 8, 8, 1))).astype(np.uint8)
    return out


@pytest.fixture(scope="module")
def camera_run(tmp_path_factory):
    """{"shards", "vae", "run"}: 42 + 21 tiny camera clips, a 2-step VAE with validation, latent caches,
    a 2-step DiT sampling every caption at step 2."""
    threads = torch.get_num_threads()
    shards = tmp_path_factory.mktemp("camera_shards")
    make_camera(shards, num_clips=42, val_clips=21, shard_size=32, textures=textures())
    data = [f"data.shards={shards}/train-*.tar", f"data.val_shards={shards}/val-*.tar"]
    vae = tmp_path_factory.mktemp("camera_vae")
    train(compose_train("+experiment=vae_camera", *data, *TINY_DATA, *TINY_VAE, "trainer.max_steps=2",
                        "trainer.val_check_interval=2", "trainer.limit_val_batches=2", "vae_stats_batches=1",
                        f"run_dir={vae}", "trainer.enable_model_summary=false", "+trainer.enable_progress_bar=false"))
    caches = {split: encode_latents(["--shards", f"{shards}/{split}-*.tar", "--out", str(vae / "latents" / split),
                                     "--vae", str(vae), "--workers", "0"]) for split in ("train", "val")}
    run = tmp_path_factory.mktemp("camera_dit")
    train(compose_train("+experiment=camera", f"vae.path={vae}", f"data.cache={caches['train']}",
                        f"data.val_cache={caches['val']}", "data.batch_size=8", "data.num_workers=0", "num_threads=1",
                        *TINY_DIT, "trainer.max_steps=2", "trainer.log_every_n_steps=1", "optim.warmup_steps=5",
                        "eval.samples.every_n_steps=2", "eval.samples.steps=1", "eval.val_loss.every_n_steps=2",
                        f"run_dir={run}", "trainer.enable_model_summary=false", "+trainer.enable_progress_bar=false"))
    torch.set_num_threads(threads)
    return {"shards": shards, "vae": vae, "run": run}


def test_vae_validation_logs_motion_fidelity(camera_run):
    metrics = camera_run["vae"] / "metrics.csv"
    for name in ("val/motion_fidelity", "val/motion_error", "val/psnr"):
        steps, values = read_metric(metrics, name)
        assert len(values) == 1 and np.isfinite(values).all(), name
    _, fidelity = read_metric(metrics, "val/motion_fidelity")
    assert 0.0 <= fidelity[0] <= 1.0


def test_dit_training_logs_scene_and_motion_of_its_samples(camera_run):
    metrics = camera_run["run"] / "metrics.csv"
    for name in ("eval/motion_accuracy", "eval/scene_accuracy", "eval/scene_and_motion", "val/loss"):
        steps, values = read_metric(metrics, name)
        assert list(steps) == [2] and 0.0 <= values[0] <= (1.0 if name.startswith("eval/") else 10.0), name
    assert len(list((camera_run["run"] / "samples" / "step-0000002").glob("*.mp4"))) == 21  # every caption


def test_evaluate_prints_the_camera_table(camera_run, tmp_path):
    threads = torch.get_num_threads()
    try:
        report = evaluate(EvalConfig(ckpt=str(camera_run["run"]), steps=1, num_held_out=14, num_prompts=21, out=str(tmp_path),
                                     write_samples=False, num_threads=1))
    finally:
        torch.set_num_threads(threads)
    assert report["num_samples"] == 21  # the run's own camera prompts, not the shape probe
    generated = report["results"]["ema"]["camera"]
    assert set(generated) == {"scene", "motion", "both", "num_clips"} and generated["num_clips"] == 21
    reference = report["camera_reference"]
    assert reference["real"]["num_clips"] == reference["vae"]["num_clips"] == 14
    assert reference["real"]["motion"] == 1.0 and reference["real"]["scene"] == 1.0  # real held-out clips
    assert 0.0 <= reference["vae_motion_fidelity"]["motion_fidelity"] <= 1.0
    assert "probe" not in report["results"]["ema"] and "probe" in report["skipped"]
    markdown = (tmp_path / "report.md").read_text()
    assert "camera: scene and motion" in markdown and "VAE motion fidelity" in markdown


def test_temporal_difference_loss():
    video = torch.rand(2, 3, 5, 8, 8) * 2 - 1  # [B, 3, T, H, W]
    assert temporal_difference_loss(video + 0.3, video) < 1e-12  # a constant offset keeps the input's motion
    frozen = video[:, :, :1].expand_as(video)  # the first frame held: all motion lost
    assert temporal_difference_loss(frozen, video) > 0.1
    vae = CausalVAE(VAE_PRESETS["tiny"])
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    base, logs, _ = VAELoss(VAELossConfig())(vae, video, generator=torch.Generator().manual_seed(0))
    with_term, logs_t, _ = VAELoss(VAELossConfig(temporal_weight=1.0))(vae, video, generator=torch.Generator().manual_seed(0))
    assert "temporal" not in logs and logs_t["temporal"] > 0
    torch.testing.assert_close(with_term, base + logs_t["temporal"])
    with pytest.raises(ValueError, match="temporal_weight"):
        VAELossConfig(temporal_weight=-1.0).validate()


def test_camera_prompts_cover_every_caption_with_distinct_seeds():
    prompts, seeds = camera_prompts(2)
    captions = {camera_caption(s, m) for s, m in camera_combinations()}
    assert len(prompts) == 2 * len(captions) and set(prompts) == captions and len(set(seeds)) == len(seeds)
    assert camera_prompts(3)[1][: len(seeds)] == seeds  # more repeats keep the first clips
    with pytest.raises(ValueError, match="seeds_per_prompt"):
        camera_prompts(0)


def test_motion_benchmark_remeasures_a_camera_demo_folder(camera_run, tmp_path, capsys):
    """benchmarks/motion.py on a folder laid out as the camera demo writes it: the table is sampled
    and scored again, the demo's training-stage times are kept, its own sample/score times added."""
    folder = tmp_path / "demo-camera"
    folder.mkdir()
    (folder / "dit").symlink_to(camera_run["run"], target_is_directory=True)
    shards = camera_run["shards"]
    seconds = {"data": 1.0, "vae": 60.0, "latents": 6.0, "dit": 120.0, "sample": 9e9, "score": 9e9, "total": 9e9}
    table = {"rows": {}, "seconds": seconds, "settings": {"sampler": "euler", "steps": 1, "cfg": 5.0, "shift": 3.0},
             "seeds_per_prompt": 1, "held_out": f"{shards}/val-*.tar", "references": f"{shards}/train-*.tar"}
    (folder / "camera_table.json").write_text(json.dumps(table))
    threads = torch.get_num_threads()
    try:
        fresh = remeasure(folder, read_table(folder), seeds_per_prompt=None, steps=None, cfg=2.0, shift=None)
    finally:
        torch.set_num_threads(threads)
    rows = fresh["rows"]
    assert fresh["num_generated"] == 21 and rows["generated"]["num_clips"] == 21
    assert rows["real"]["num_clips"] == rows["vae"]["num_clips"] == 21  # every held-out clip
    assert rows["real"]["motion"] == 1.0 and rows["real"]["scene"] >= 0.9  # 42 tiny references: near, not always, 1
    assert fresh["settings"]["cfg"] == 2.0 and fresh["settings"]["steps"] == 1  # given, else the demo's
    kept = {k: v for k, v in fresh["seconds"].items() if k in ("data", "vae", "latents", "dit")}
    assert kept == {"data": 1.0, "vae": 60.0, "latents": 6.0, "dit": 120.0}
    assert 0 < fresh["seconds"]["sample"] < 9e9 and fresh["seconds"]["total"] == pytest.approx(sum(
        v for k, v in fresh["seconds"].items() if k != "total"))
    text = report(fresh["rows"], fresh["seconds"], fresh["settings"], fresh["num_generated"])
    assert f"| real held-out clips | {rows['real']['scene']:.2f} | 1.00 |" in text
    assert "generated both / real both" in text and "minutes, every stage" in text


def test_motion_benchmark_refuses_a_folder_without_a_table(tmp_path):
    with pytest.raises(SystemExit, match="camera_table.json not found"):
        read_table(tmp_path)
    (tmp_path / "camera_table.json").write_text(json.dumps({"rows": {}, "seconds": {}, "settings": {}}))
    with pytest.raises(SystemExit, match="older demo"):
        read_table(tmp_path)
