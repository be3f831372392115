"""Hostile sharded checkpoints run no code and allocate nothing, through every way a checkpoint
enters dit-video: sample.py, the notebook API, evaluate, export, and training (ckpt_path=, +resume=).

Three crafted DCP folders, each made from a genuine one (a 1-step FSDP2 run of the tiny demo on
tests/tiny_run.py's shards and VAE, built once per module):
  dotted_global  `.metadata` is a protocol-4 pickle calling filesystem.Path.write_text(marker)
  bytes_entry    a legitimate `.metadata`; two non-tensor entries (the optimizer's learning rate,
                 which resume reads, and an extra state_dict entry, which sampling reads) hold
                 pickles that run `touch marker` when unpickled with weights_only=False
  oversized      `.metadata` declares an EMA weight of 4 PiB, backed by its few stored bytes
Each ends in one CheckpointError line naming the folder; the marker file never appears.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from hydra import compose, initialize_config_dir
from test_checkpoint import _dotted_global_pickle
from tiny_run import ROOT, TINY_DATA, TINY_DIT, compose_train, tiny_run
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata

from dit_video import api
from dit_video.checkpoint.export import main as export_main
from dit_video.checkpoint.load import load_training_checkpoint
from dit_video.errors import CheckpointError
from dit_video.eval.evaluate import main as evaluate_main
from dit_video.run import train

KINDS = ["dotted_global", "bytes_entry", "oversized"]
REASON = {  # what each refusal says after the folder's name
    "dotted_global": r"torch.distributed.checkpoint.filesystem.Path.write_text is not allowed in a DCP .metadata",
    "bytes_entry": r"entry '(state_dict.extra|optimizer_0.param_groups.0.lr)' cannot be loaded safely "
                   r"\(weights_only=True.*posix.system",
    "oversized": r".metadata declares a chunk of 'state_dict.ema.x_embedder.proj.weight' of 4.0 PiB",
}


class _TouchesMarker:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # what torch.load(weights_only=False) would run
        return (os.system, (f"touch {self.marker}",))


def _train_cfg(run, run_dir: Path, *extra: str):
    data = [f"data.shards={run['shards']}/train-*.tar", f"data.val_shards={run['shards']}/val-*.tar"]
    return compose_train("+experiment=demo", *data, *TINY_DATA, *TINY_DIT, f"vae.path={run['vae']}",
                         "trainer.max_steps=1", "optim.warmup_steps=5", "strategy=fsdp",
                         "strategy.process_group_backend=gloo", "eval=off", "checkpoint_reserve_gb=0",
                         "+trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
                         f"run_dir={run_dir}", *extra)


def _train(cfg) -> None:
    threads = torch.get_num_threads()
    try:
        train(cfg)
    finally:  # in-process FSDP (world size 1): leave no process group behind for later tests
        torch.set_num_threads(threads)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def genuine(run, tmp_path_factory) -> Path:
    """A real FSDP2 checkpoint folder (DCP shards, .metadata, meta.pt) with optimizer state."""
    run_dir = tmp_path_factory.mktemp("fsdp_run")
    _train(_train_cfg(run, run_dir))
    folder = (run_dir / "checkpoints" / "last.ckpt").resolve()
    assert (folder / ".metadata").is_file() and list(folder.glob("*.distcp"))
    return folder


def _craft(kind: str, genuine: Path, folder: Path, marker: Path) -> None:
    if kind == "bytes_entry":  # re-saved whole, with two non-tensor entries replaced by payloads
        state = load_training_checkpoint(genuine, sections=["state_dict", "optimizer_0"])
        state = {"state_dict": state["state_dict"], "optimizer_0": state["optimizer_0"]}
        state["optimizer_0"]["param_groups"][0]["lr"] = _TouchesMarker(marker)
        state["state_dict"]["extra"] = _TouchesMarker(marker)
        dcp.save(state, checkpoint_id=str(folder), no_dist=True)
        shutil.copy(genuine / "meta.pt", folder / "meta.pt")
        return
    shutil.copytree(genuine, folder)
    if kind == "dotted_global":
        (folder / ".metadata").write_bytes(_dotted_global_pickle(marker))
    else:  # oversized
        with open(folder / ".metadata", "rb") as f:
            md = pickle.load(f)  # the genuine file this test wrote
        key = "state_dict.ema.x_embedder.proj.weight"
        huge = torch.Size([2**25, 2**25])  # 2**50 float32 values
        md.state_dict_metadata[key] = TensorStorageMetadata(md.state_dict_metadata[key].properties, huge,
                                                            [ChunkStorageMetadata(torch.Size([0, 0]), huge)])
        (folder / ".metadata").write_bytes(pickle.dumps(md))


@pytest.fixture(scope="module")
def crafted(genuine, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """kind -> (run directory whose checkpoints/latest and last.ckpt name the crafted folder, marker)."""
    out = {}
    for kind in KINDS:
        run_dir = tmp_path_factory.mktemp(f"hostile_{kind}")
        marker = run_dir / "marker"
        ckpts = run_dir / "checkpoints"
        ckpts.mkdir()
        _craft(kind, genuine, ckpts / genuine.name, marker)
        (ckpts / "latest").write_text(genuine.name + "\n")
        (ckpts / "last.ckpt").symlink_to(genuine.name)
        out[kind] = (run_dir, marker)
    return out


def _one_line_naming(text: str, path: Path, kind: str) -> None:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text[-2000:]
    assert re.search(re.escape(f"checkpoint '{path}'") + r".*" + REASON[kind], lines[0]), lines[0]


@pytest.mark.parametrize("kind", KINDS)
def test_notebook_api_sample_py_evaluate_and_export_refuse(kind, crafted, capsys, tmp_path):
    run_dir, marker = crafted[kind]
    folder = run_dir / "checkpoints" / "step-00000001.ckpt"
    # the notebook API, given the folder or the run directory (checkpoints/last.ckpt -> folder)
    for given, named in ((folder, folder), (run_dir, run_dir / "checkpoints" / "last.ckpt")):
        with pytest.raises(CheckpointError) as err:
            api.load_pipeline(given)
        _one_line_naming(str(err.value), named, kind)
    # sample.py (its Hydra main, run on the composed config) and evaluate: "error: ...", exit code 2
    spec = importlib.util.spec_from_file_location("sample_cli", ROOT / "sample.py")
    sample_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sample_cli)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("sample", overrides=[f"ckpt={folder}", "steps=1", f"out={tmp_path}", "num_threads=1"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_code:
        sample_cli.main(cfg)
    assert exit_code.value.code == 2
    _one_line_naming(capsys.readouterr().err.removeprefix("error: "), folder, kind)
    assert evaluate_main([f"ckpt={folder}", "steps=1", f"out={tmp_path / 'eval'}", "num_threads=1"]) == 2
    _one_line_naming(capsys.readouterr().err.removeprefix("error: "), folder, kind)
    with pytest.raises(SystemExit) as exit_code:
        export_main(["export", str(folder), str(tmp_path / "ema.safetensors")])
    assert exit_code.value.code == 2 and not (tmp_path / "ema.safetensors").exists()
    _one_line_naming(capsys.readouterr().err.removeprefix("error: "), folder, kind)
    assert not marker.exists()


def test_export_command_line_refuses_a_bytes_entry(crafted, tmp_path):
    run_dir, marker = crafted["bytes_entry"]
    folder = run_dir / "checkpoints" / "step-00000001.ckpt"
    proc = subprocess.run([sys.executable, "-m", "dit_video.checkpoint", "export", str(folder), str(tmp_path / "e.st")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    _one_line_naming(proc.stderr.removeprefix("error: "), folder, "bytes_entry")
    assert not marker.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_training_with_ckpt_path_refuses(kind, run, crafted, tmp_path):
    run_dir, marker = crafted[kind]
    folder = run_dir / "checkpoints" / "step-00000001.ckpt"
    with pytest.raises(CheckpointError) as err:
        _train(_train_cfg(run, tmp_path, f"ckpt_path={folder}"))
    _one_line_naming(str(err.value), folder, kind)
    assert not marker.exists() and not (tmp_path / "checkpoints" / "step-00000001.ckpt").exists()


def test_training_with_resume_refuses_a_bytes_entry_on_the_resume_path(run, crafted):
    """+resume= continues the run in its folder: ckpt_path=auto finds the crafted folder, passes the
    metadata checks (it is legitimate), and the strategy's resume meets the learning rate's pickle."""
    run_dir, marker = crafted["bytes_entry"]
    with pytest.raises(CheckpointError) as err:
        _train(_train_cfg(run, run_dir, f"+resume={run_dir}"))
    _one_line_naming(str(err.value), run_dir / "checkpoints" / "step-00000001.ckpt", "bytes_entry")
    assert "optimizer_0.param_groups.0.lr" in str(err.value)  # refused where Lightning's resume reads
    assert not marker.exists()
