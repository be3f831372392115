"""Checkpoint files: atomic step checkpoints, `latest`, keep-last-K, ckpt_path=auto, disk-space
check, refusing pickled code, the replay fallback for stateless loaders, and the EMA exporter.

Runs a real Lightning Trainer with StepCheckpoint + SafeCheckpointIO on tiny models in process.
"""

from __future__ import annotations

import os

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader

from dit_video.checkpoint.export import export_ema, load_exported
from dit_video.checkpoint.paths import LATEST, checkpoint_name, complete_checkpoints, resolve_ckpt_path
from dit_video.checkpoint.resume import ResumableData, with_loader_state
from dit_video.checkpoint.save import SafeCheckpointIO, StepCheckpoint, check_free_space
from dit_video.errors import CheckpointError


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.net(batch).square().mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def batches(n=64):
    return DataLoader(torch.randn(n, 4, generator=torch.Generator().manual_seed(0)), batch_size=4)


def trainer(tmp_path, steps, callbacks=(), **kw):
    return L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, plugins=[SafeCheckpointIO()],
                     callbacks=list(callbacks), default_root_dir=str(tmp_path), **kw)


def test_step_checkpoints_keep_last_k_and_point_latest(tmp_path):
    ckpt = StepCheckpoint(tmp_path / "ckpts", every_n_steps=2, keep=2)
    trainer(tmp_path, 7, [ckpt]).fit(Tiny(), batches())
    names = [p.name for p in complete_checkpoints(tmp_path / "ckpts")]
    assert names == [checkpoint_name(6), checkpoint_name(7)]  # every 2 steps + the end, newest 2 kept
    assert (tmp_path / "ckpts" / LATEST).read_text().strip() == checkpoint_name(7)
    assert os.readlink(tmp_path / "ckpts" / "last.ckpt") == checkpoint_name(7)
    assert not list((tmp_path / "ckpts").glob(".*.tmp"))
    state = torch.load(tmp_path / "ckpts" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 7


def test_ckpt_path_auto_resolution(tmp_path):
    d = tmp_path / "ckpts"
    assert resolve_ckpt_path(None, d) is None
    assert resolve_ckpt_path("auto", d) is None  # first attempt of a job: fresh start
    d.mkdir()
    for step in (2, 10):
        torch.save({"x": step}, d / checkpoint_name(step))
    (d / f".{checkpoint_name(12)}.tmp").write_bytes(b"partial")  # a killed write
    assert resolve_ckpt_path("auto", d) == str(d / checkpoint_name(10))  # no pointer: newest complete
    (d / LATEST).write_text(checkpoint_name(2))
    assert resolve_ckpt_path("auto", d) == str(d / checkpoint_name(2))  # the pointer wins
    (d / LATEST).write_text(checkpoint_name(99))  # stale pointer: fall back to the newest complete
    assert resolve_ckpt_path("auto", d) == str(d / checkpoint_name(10))
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_ckpt_path(str(d / "nope.ckpt"), d)


def test_resume_restores_model_optimizer_and_continues(tmp_path):
    ckpt = StepCheckpoint(tmp_path / "a", every_n_steps=3)
    torch.manual_seed(0)
    model = Tiny()
    trainer(tmp_path, 3, [ckpt]).fit(model, batches())
    resumed = Tiny()
    t = trainer(tmp_path, 5, [StepCheckpoint(tmp_path / "a", every_n_steps=100)])
    t.fit(resumed, batches(), ckpt_path=resolve_ckpt_path("auto", tmp_path / "a"), weights_only=True)
    assert t.global_step == 5
    assert (tmp_path / "a" / LATEST).read_text().strip() == checkpoint_name(5)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this calls os.system: what a malicious checkpoint does
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    evil = tmp_path / "evil.ckpt"
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "payload": _RunsCode(marker)}, evil)
    with pytest.raises(CheckpointError, match="weights_only"):
        SafeCheckpointIO().load_checkpoint(evil)
    with pytest.raises(CheckpointError, match="weights_only"):  # through Trainer.fit(ckpt_path=...)
        trainer(tmp_path, 1).fit(Tiny(), batches(), ckpt_path=str(evil))
    assert not marker.exists()


def test_not_enough_disk_space_fails_before_writing(tmp_path):
    with pytest.raises(CheckpointError, match="not enough disk space"):
        check_free_space(tmp_path, needed=1, reserve=2**62)
    ckpt = StepCheckpoint(tmp_path / "c", every_n_steps=1, reserve_gb=2.0**32)  # 4 EiB must stay free
    with pytest.raises(CheckpointError, match=r"not enough disk space.*checkpoint_reserve_gb"):
        trainer(tmp_path, 2, [ckpt]).fit(Tiny(), batches())
    assert list((tmp_path / "c").iterdir()) == []  # nothing half-written


class _Recorder(Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append(batch.clone())


class _Stateless(L.LightningDataModule):
    def train_dataloader(self):
        return batches()


def test_replay_fallback_resumes_a_stateless_loader_at_the_right_batch(tmp_path):
    assert isinstance(with_loader_state(_Stateless()), ResumableData)
    full = _Recorder()
    trainer(tmp_path, 6, [full]).fit(Tiny(), datamodule=with_loader_state(_Stateless()))
    first = _Recorder()
    trainer(tmp_path, 4, [StepCheckpoint(tmp_path / "r", 4), first]).fit(Tiny(), datamodule=with_loader_state(_Stateless()))
    second = _Recorder()
    trainer(tmp_path, 6, [second]).fit(Tiny(), datamodule=with_loader_state(_Stateless()),
                                       ckpt_path=str(tmp_path / "r" / checkpoint_name(4)), weights_only=True)
    resumed = first.seen + second.seen
    assert len(resumed) == 6 and all(torch.equal(a, b) for a, b in zip(resumed, full.seen, strict=True))


def test_export_ema_to_safetensors_and_back(tmp_path):
    from dit_video.model import DiT, DiTConfig

    cfg = DiTConfig(in_channels=4, text_dim=8, hidden_size=32, depth=2, num_heads=2)
    ema = DiT(cfg)
    with torch.no_grad():
        for p in ema.parameters():
            p.normal_()
    state = {f"ema.{k}": v for k, v in ema.state_dict().items()} | {"dit.x": torch.zeros(1)}
    meta = {"dit_config": {"hidden_size": 32, "depth": 2}, "latent_shape": [5, 8, 8]}
    torch.save({"state_dict": state, "dit_video": meta}, tmp_path / "step.ckpt")
    out = export_ema(tmp_path / "step.ckpt", tmp_path / "ema.safetensors")
    weights, meta_back = load_exported(out)
    assert meta_back == meta
    fresh = DiT(cfg)
    fresh.load_state_dict(weights)  # strict: exactly the DiT's keys
    for key, value in ema.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)
    with open(out, "rb") as f:  # safetensors: a JSON header and raw bytes, nothing to unpickle
        assert f.read(16)[8:9] == b"{"


def test_sharded_checkpoint_metadata_with_pickled_code_is_refused(tmp_path):
    import pickle

    import torch.distributed.checkpoint as dcp

    from dit_video.checkpoint.load import load_training_checkpoint
    from dit_video.checkpoint.verify import verify_checkpoint

    folder = tmp_path / checkpoint_name(3)
    state = {"state_dict": {"ema.w": torch.arange(6.0).reshape(2, 3), "dit.w": torch.ones(2)}}
    dcp.save(state, checkpoint_id=str(folder), no_dist=True)  # the layout ModelParallelStrategy writes
    torch.save({"global_step": 3, "dit_video": {"latent_shape": [1, 2, 2]}}, folder / "meta.pt")
    verify_checkpoint(folder)  # DCP's own metadata types pass the allowlist
    loaded = load_training_checkpoint(folder)
    assert loaded["global_step"] == 3 and torch.equal(loaded["state_dict"]["ema.w"], state["state_dict"]["ema.w"])

    marker = tmp_path / "pwned"
    (folder / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))  # DCP would pickle.load this
    for load in (verify_checkpoint, load_training_checkpoint, lambda p: resolve_ckpt_path(str(p), tmp_path)):
        with pytest.raises(CheckpointError, match="posix.system is not allowed|system is not allowed"):
            load(folder)
    assert not marker.exists()


# ----------------------------------------------------------------------------- hostile DCP folders (issue 14)


def _dcp_folder(folder, state=None):
    """A DCP folder as ModelParallelStrategy writes it (shards + .metadata + meta.pt); `state`
    defaults to weights and an optimizer's plain hyperparameters (stored as DCP "bytes" entries)."""
    import torch.distributed.checkpoint as dcp

    state = state or {"state_dict": {"ema.w": torch.arange(6.0).reshape(2, 3), "dit.w": torch.ones(2)},
                      "optimizer_0": {"param_groups": [{"lr": 0.1, "betas": (0.9, 0.99)}]}}
    dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    torch.save({"global_step": 3, "dit_video": {"latent_shape": [1, 2, 2]}}, folder / "meta.pt")
    return folder


def _dotted_global_pickle(marker) -> bytes:
    """Protocol-4 pickle of `filesystem.Path.write_text(filesystem.Path(marker), "pwned")`: names
    from a DCP module, capitalised, resolved as a dotted path by pickle.find_class."""
    import pickle

    def text(s: str) -> bytes:
        return pickle.SHORT_BINUNICODE + bytes([len(s.encode())]) + s.encode()

    fs = "torch.distributed.checkpoint.filesystem"
    return (pickle.PROTO + b"\x04" + text(fs) + text("Path.write_text") + pickle.STACK_GLOBAL
            + text(fs) + text("Path") + pickle.STACK_GLOBAL + text(str(marker)) + pickle.TUPLE1 + pickle.REDUCE
            + text("pwned") + pickle.TUPLE2 + pickle.REDUCE + pickle.STOP)


def _every_dcp_reader(tmp_path):
    from dit_video.checkpoint.load import load_training_checkpoint
    from dit_video.checkpoint.verify import verify_checkpoint

    return (verify_checkpoint, load_training_checkpoint, lambda p: resolve_ckpt_path(str(p), tmp_path))


def test_dcp_metadata_with_a_dotted_global_is_refused(tmp_path):
    folder = _dcp_folder(tmp_path / checkpoint_name(3))
    marker = tmp_path / "pwned"
    (folder / ".metadata").write_bytes(_dotted_global_pickle(marker))
    for load in _every_dcp_reader(tmp_path):
        with pytest.raises(CheckpointError, match=r"step-00000003.ckpt': torch.distributed.checkpoint.filesystem"
                                                  r".Path.write_text is not allowed"):
            load(folder)
    assert not marker.exists()


def test_dcp_bytes_entry_holding_code_is_refused_and_plain_values_load(tmp_path):
    from dit_video.checkpoint.load import load_training_checkpoint

    good = load_training_checkpoint(_dcp_folder(tmp_path / "good.ckpt"))
    assert good["optimizer_0"]["param_groups"] == [{"lr": 0.1, "betas": (0.9, 0.99)}]  # weights_only=True suffices
    marker = tmp_path / "pwned"
    evil = _dcp_folder(tmp_path / "evil.ckpt", {"state_dict": {"ema.w": torch.ones(2), "extra": _RunsCode(marker)}})
    with pytest.raises(CheckpointError, match=r"evil.ckpt': entry 'state_dict.extra' cannot be loaded safely "
                                              r"\(weights_only=True.*posix.system"):
        load_training_checkpoint(evil, sections=["state_dict"])
    assert not marker.exists()


def _grow_tensor(md, folder):  # a petabyte tensor backed by its 24 stored bytes
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata

    entry = md.state_dict_metadata["state_dict.ema.w"]
    huge = torch.Size([2**25, 2**25])
    md.state_dict_metadata["state_dict.ema.w"] = TensorStorageMetadata(
        entry.properties, huge, [ChunkStorageMetadata(torch.Size([0, 0]), huge)])


def _grow_shape_only(md, folder):  # the same chunk, in a tensor declared 2**20 times as tall
    entry = md.state_dict_metadata["state_dict.ema.w"]
    entry.size = torch.Size([2**21, 3])


def _share_storage(md, folder):  # 2000 chunks that all point at the same stored bytes
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

    entry = md.state_dict_metadata["state_dict.ema.w"]
    info = md.storage_data[MetadataIndex("state_dict.ema.w", torch.Size([0, 0]))]
    entry.size = torch.Size([2 * 2000, 3])
    entry.chunks = [ChunkStorageMetadata(torch.Size([2 * i, 0]), torch.Size([2, 3])) for i in range(2000)]
    for i in range(2000):
        md.storage_data[MetadataIndex("state_dict.ema.w", torch.Size([2 * i, 0]))] = info


def _long_list_index(md, folder):  # the loader would grow a list to 10 million entries
    md.planner_data["optimizer_0.param_groups.0.lr"] = ("optimizer_0", "param_groups", 10**7, "lr")


def _outside_folder(md, folder):
    (folder.parent / "elsewhere.distcp").write_bytes((folder / "__0_0.distcp").read_bytes())
    for info in md.storage_data.values():
        info.relative_path = "../elsewhere.distcp"


def _past_the_end(md, folder):
    for info in md.storage_data.values():
        info.offset += 10**9


def _stream_transform(md, folder):
    for info in md.storage_data.values():
        info.transform_descriptors = ["stream.zstd"]


@pytest.mark.parametrize("craft, reason", [
    pytest.param(_grow_tensor, r"declares a chunk of 'state_dict.ema.w' of 4.0 PiB stored in", id="petabyte"),
    pytest.param(_grow_shape_only, r"declares 'state_dict.ema.w' as 2097152x3 float32 \(24.0 MiB\) but its shards "
                 r"hold", id="taller"),
    pytest.param(_share_storage, r"declares 46.9 KiB of tensors but its shard files hold", id="shared_bytes"),
    pytest.param(_long_list_index, r"gives 'optimizer_0.param_groups.0.lr' the nesting path", id="list_index"),
    pytest.param(_outside_folder, r"points 'state_dict.ema.w' at '../elsewhere.distcp', outside the folder",
                 id="outside"),
    pytest.param(_past_the_end, r"places 'state_dict.ema.w' at bytes 10000\d+\+\d+ of __0_0.distcp", id="past_end"),
    pytest.param(_stream_transform, r"asks for stream transforms \['stream.zstd'\]", id="transform"),
])
def test_dcp_declarations_the_shards_do_not_hold_are_refused_before_allocating(tmp_path, craft, reason):
    import pickle

    folder = _dcp_folder(tmp_path / checkpoint_name(3))
    with open(folder / ".metadata", "rb") as f:
        md = pickle.load(f)  # this test's own file
    craft(md, folder)
    (folder / ".metadata").write_bytes(pickle.dumps(md))
    for load in _every_dcp_reader(tmp_path):
        with pytest.raises(CheckpointError, match=f"step-00000003.ckpt': .metadata {reason}"):
            load(folder)


def _bytes_read() -> int:
    """Bytes this process has read through read()/pread() so far (Linux /proc/self/io)."""
    return int(next(line for line in open("/proc/self/io") if line.startswith("rchar:")).split()[1])


def test_verifying_a_checkpoint_file_reads_no_tensor_data(tmp_path):
    """Issue 13 item 11: verification before the real load reads the pickle, not the weights."""
    from dit_video.checkpoint.verify import verify_checkpoint

    path = tmp_path / "big.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(8 * 2**20)}, "global_step": 1}, path)  # 32 MiB of weights
    before = _bytes_read()
    verify_checkpoint(path)
    assert _bytes_read() - before < 2**20  # the zip directory and the pickle, not the 32 MiB
    marker = tmp_path / "pwned"
    for legacy in (False, True):  # the zip format is mapped; the pre-1.6 format is read whole, still safely
        evil = tmp_path / f"evil-{legacy}.ckpt"
        torch.save({"state_dict": {}, "payload": _RunsCode(marker)}, evil, _use_new_zipfile_serialization=not legacy)
        with pytest.raises(CheckpointError, match=r"evil-.*weights_only=True.*posix.system"):
            verify_checkpoint(evil)
    assert not marker.exists()
