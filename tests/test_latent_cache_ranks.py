"""data_prep.encode_latents sharded over processes: torchrun --nproc_per_node 2 (CPU, gloo barrier)
writes exactly the files one process writes, byte for byte (latent shards, per-shard records,
empty-caption embedding, cache.json). The GPU half (--device auto -> cuda:LOCAL_RANK, bf16 VAE)
is not reachable here; --device cpu is the same code path with another device string.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from spawn_ranks import free_port

from data_prep.encode_latents import main as encode_main
from data_prep.make_demo import make_demo
from dit_video.encoders.causal_vae import CausalVAE, CausalVAEConfig, save_vae

ROOT = Path(__file__).resolve().parents[1]


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_two_processes_write_the_cache_one_process_writes(tmp_path, monkeypatch, capsys):
    make_demo(tmp_path / "clips", num_clips=10, val_clips=0, size=16, frames=9, shard_size=3, seed=0)  # 4 shards
    torch.manual_seed(0)
    cfg = CausalVAEConfig(base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, temporal_factor=4,
                          spatial_factor=4)
    save_vae(tmp_path / "vae", CausalVAE(cfg), cfg, torch.zeros(cfg.latent_channels), torch.ones(cfg.latent_channels))
    args = ["--shards", str(tmp_path / "clips" / "train-*.tar"), "--vae", str(tmp_path / "vae"), "--text-encoder",
            "minilm", "--num-frames", "9", "--size", "16", "16", "--batch-size", "2", "--workers", "0",
            "--device", "cpu"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    two = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                            "--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", "data_prep.encode_latents",
                            *args, "--out", str(tmp_path / "two")], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # The one-process reference runs here meanwhile, through the same main(), on one thread as the ranks do.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        encode_main([*args, "--out", str(tmp_path / "one")])
    finally:
        torch.set_num_threads(threads)
    assert "encoded 10 samples" in capsys.readouterr().out
    out, err = two.communicate(timeout=300)
    assert two.returncode == 0, err[-3000:]
    assert "encoded 10 samples" in out and "on 2 process(es)" in out, out
    one_files, two_files = files(tmp_path / "one"), files(tmp_path / "two")
    assert sum(name.endswith(".tar") for name in one_files) == 4 and any(n.endswith("cache.json") for n in one_files)
    assert one_files.keys() == two_files.keys()
    assert [name for name in one_files if one_files[name] != two_files[name]] == []
