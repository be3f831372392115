"""Who made what: the environment of a run, the metadata a checkpoint records, a sample's identity.

Written into run folders (environment.json), checkpoints (`dit_video` entry) and the JSON sidecar
and container tags of every generated video.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from dit_video.checkpoint.load import checkpoint_sha256


def git(*args: str) -> str | None:
    """`git <args>` run in this package's folder (the code that runs, whatever the working
    directory); None when git or the repository is not there."""
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, check=False,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def run_metadata(cfg: DictConfig) -> dict:
    """What a checkpoint records about the run that made it (plain JSON types only)."""
    return {"config": OmegaConf.to_container(cfg, resolve=True), "git_commit": git("rev-parse", "HEAD") or None}


def environment_info() -> dict:
    """What produced a run: git commit (and whether the tree was dirty), command line, Python,
    platform, CPU/GPU, thread count and the versions of every installed distribution."""
    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "argv": list(sys.argv),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "packages": dict(sorted((d.metadata["Name"], d.version) for d in metadata.distributions()
                                if d.metadata["Name"])),
    }


def write_environment(run_dir: str | Path) -> Path:
    """<run_dir>/environment.json from `environment_info()`."""
    path = Path(run_dir) / "environment.json"
    path.write_text(json.dumps(environment_info(), indent=1))
    return path


def config_hash(config: dict) -> str:
    """sha256 of a config as canonical JSON (sorted keys): equal configs, equal hashes."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def sample_identity(ckpt: str | Path, meta: dict, weights: str) -> dict:
    """Who made a sample: model, checkpoint file + sha256, training-config hash, weights, commit."""
    d = meta["dit_config"]
    return {
        "model": f"DiT depth={d['depth']} hidden={d['hidden_size']} patch={list(d['patch_size'])}",
        "checkpoint": str(ckpt),
        "checkpoint_sha256": checkpoint_sha256(ckpt),
        "config_sha256": config_hash(meta["config"]),
        "weights": weights,
        "git_commit": meta.get("git_commit"),
    }
