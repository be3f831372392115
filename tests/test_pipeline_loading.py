"""Pipeline loading and devices: sampling from an FSDP2-sharded (DCP) checkpoint on one process,
device/dtype selection, and noise that depends on the seed only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from spawn_ranks import free_port
from tiny_run import tiny_run

from dit_video.errors import CheckpointError
from dit_video.pipeline import Pipeline, autocast_dtype, resolve_device

PROMPTS = ["a red square moving left", "a blue circle moving up"]
SAMPLING = {"steps": 2, "cfg": 3.0}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def full_ckpt(run):
    return run["run"] / "checkpoints" / "last.ckpt"


# ----------------------------------------------------------------------------- devices


def test_autocast_dtype_per_device():
    assert autocast_dtype(torch.device("cpu")) == torch.bfloat16
    assert autocast_dtype(torch.device("cuda"), bf16_supported=True) == torch.bfloat16  # Ampere and newer
    assert autocast_dtype(torch.device("cuda:1"), bf16_supported=False) == torch.float16  # V100, T4
    assert autocast_dtype(torch.device("meta")) is None  # no autocast where torch has none


def test_resolve_device():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == expected and resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device=cuda: CUDA is not available"):
            resolve_device("cuda")


def test_explicit_cpu_equals_default_and_bf16_weights_sample(full_ckpt):
    default = Pipeline.from_checkpoint(full_ckpt)
    cpu = Pipeline.from_checkpoint(full_ckpt, device="cpu")
    assert default.device.type == resolve_device(None).type and cpu.device == torch.device("cpu")
    clips = cpu.generate(PROMPTS, [0, 1], **SAMPLING)
    np.testing.assert_array_equal(default.to("cpu").generate(PROMPTS, [0, 1], **SAMPLING), clips)
    half = Pipeline.from_checkpoint(full_ckpt, device="cpu", dtype=torch.bfloat16)
    assert next(half.dit.parameters()).dtype == torch.bfloat16
    assert half.generate(PROMPTS, [0, 1], **SAMPLING).shape == clips.shape


# ----------------------------------------------------------------------------- sharded checkpoints


def write_sharded_worker(rank: int, world_size: int, port: int, full: str, out: str) -> None:
    """One gloo rank: the tiny run's DiT and EMA, sharded with FSDP2 as DiTModule.configure_model
    does under strategy=fsdp, saved as Lightning's ModelParallelStrategy saves (DCP + meta.pt)."""
    import copy

    from lightning.fabric.strategies.fsdp import _distributed_checkpoint_save
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh

    from dit_video.checkpoint.verify import load_checkpoint_file
    from dit_video.lit_module import DiTModule, OptimConfig
    from dit_video.model import DiT, DiTConfig
    from dit_video.parallel import ParallelConfig, parallelize_dit_module

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world_size)
    try:
        ckpt = load_checkpoint_file(full)
        module = DiTModule(DiT(DiTConfig.from_dict(ckpt["dit_video"]["dit_config"])), None, nn.Identity(), nn.Identity(),
                           OptimConfig(), 0.99, ckpt["dit_video"])
        module.load_state_dict(ckpt["state_dict"])
        mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("data_parallel",))
        parallelize_dit_module(module, ParallelConfig(fsdp=True, fsdp_param_dtype=None), mesh)
        state = module.state_dict()
        assert all(isinstance(v, torch.distributed.tensor.DTensor) for v in state.values())  # really sharded
        _distributed_checkpoint_save({"state_dict": state}, out)
        if rank == 0:
            meta = copy.copy(ckpt)
            meta.pop("state_dict"), meta.pop("optimizer_states", None)
            torch.save(meta, f"{out}/meta.pt")
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def sharded_ckpt(full_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded") / "step-00000003.ckpt"
    out.mkdir()
    port = free_port()
    torch.multiprocessing.spawn(write_sharded_worker, args=(2, port, str(full_ckpt), str(out)), nprocs=2)
    return out


def test_sampling_from_a_sharded_checkpoint_equals_the_full_one(full_ckpt, sharded_ckpt):
    from dit_video.checkpoint.paths import resolve_checkpoint
    from dit_video.identity import sample_identity

    assert len(list(sharded_ckpt.glob("*.distcp"))) == 2  # one shard file per rank
    for weights in ("ema", "raw"):
        full = Pipeline.from_checkpoint(full_ckpt, weights=weights, device="cpu")
        sharded = Pipeline.from_checkpoint(sharded_ckpt, weights=weights, device="cpu")
        for (name, a), (_, b) in zip(full.dit.state_dict().items(), sharded.dit.state_dict().items(), strict=True):
            assert torch.equal(a, b), name
        np.testing.assert_array_equal(sharded.generate(PROMPTS, [3, 4], **SAMPLING),
                                      full.generate(PROMPTS, [3, 4], **SAMPLING))
    # The CLI and the notebook API take the folder (or a run whose last.ckpt links to it).
    assert resolve_checkpoint(sharded_ckpt) == sharded_ckpt
    run_dir = sharded_ckpt.parent / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").symlink_to(sharded_ckpt)
    assert resolve_checkpoint(run_dir) == run_dir / "checkpoints" / "last.ckpt"
    identity = sample_identity(sharded_ckpt, sharded.meta, "raw")
    assert len(identity["checkpoint_sha256"]) == 64


def test_sample_cli_samples_from_a_sharded_checkpoint(sharded_ckpt, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "sample.py", f"ckpt={sharded_ckpt}", "steps=1", "gif=false",
                           f"out={tmp_path}", "device=cpu", "num_threads=1"], cwd=root, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list(tmp_path.glob("*.mp4"))) == 2  # conf/sample.yaml's two default prompts


def test_sharded_checkpoint_without_metadata_is_refused(tmp_path):
    (tmp_path / "broken.ckpt").mkdir()
    (tmp_path / "broken.ckpt" / "__0_0.distcp").write_bytes(b"")
    (tmp_path / "broken.ckpt" / ".metadata").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="broken.ckpt"):
        Pipeline.from_checkpoint(tmp_path / "broken.ckpt")


@pytest.mark.slow
def test_sampling_from_a_real_fsdp_run(run, tmp_path):
    """A 2-process FSDP2 training run (train.py under torchrun, gloo) writes DCP folders; one
    process samples from the run directory, and gets what torch's own DCP converter gives."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    root = Path(__file__).resolve().parents[1]
    port = free_port()
    run_dir = tmp_path / "fsdp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={port}", "train.py", "+experiment=demo", f"data.shards={run['shards']}/train-*.tar",
           f"data.val_shards={run['shards']}/val-*.tar", "data.batch_size=4", "data.num_workers=0",
           "data.shuffle_buffer=32", "num_threads=1", "model.depth=2", "model.hidden_size=64", "model.num_heads=2",
           f"vae.path={run['vae']}", "trainer.max_steps=2", "optim.warmup_steps=5", "eval=off", "strategy=fsdp",
           "strategy.process_group_backend=gloo", "trainer.devices=2", "checkpoint_reserve_gb=0",
           f"run_dir={run_dir}", "trainer.enable_model_summary=false"]
    env = dict(os.environ, OMP_NUM_THREADS="1", DIT_VIDEO_QUIET="1")
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    folder = (run_dir / "checkpoints" / "last.ckpt").resolve()
    assert folder.is_dir() and len(list(folder.glob("*.distcp"))) == 2

    from dit_video.api import load_pipeline

    sharded = load_pipeline(run_dir, weights="ema")  # the run directory, as sample.py/evaluate take it
    # The same checkpoint through torch's converter (it unpickles .metadata unchecked: fine for
    # a file this test just wrote), as one full file.
    dcp_to_torch_save(folder, tmp_path / "converted.pt")
    converted = torch.load(tmp_path / "converted.pt", weights_only=True)
    full = torch.load(folder / "meta.pt", weights_only=True) | {"state_dict": converted["state_dict"]}
    torch.save(full, tmp_path / "full.ckpt")
    reference = Pipeline.from_checkpoint(tmp_path / "full.ckpt", weights="ema", device="cpu")
    np.testing.assert_array_equal(sharded.generate(PROMPTS, [5, 6], **SAMPLING),
                                  reference.generate(PROMPTS, [5, 6], **SAMPLING))
