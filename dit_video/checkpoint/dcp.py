"""DCP checkpoint folders (FSDP2) read without running code and without trusting their sizes.

torch's own reader unpickles `.metadata` with plain `pickle.load`, and its planners load every
non-tensor entry (optimizer hyperparameters, anything not a tensor: "bytes" entries) with
`torch.load(weights_only=False)`; `_EmptyStateDictLoadPlanner` then allocates every tensor at
the size `.metadata` declares. A crafted folder could run code through either unpickling, or
ask for petabytes. Every DCP read of ours (sampling, export, evaluation, training resume) goes
through the three pieces here instead:

  read_dcp_metadata   `.metadata` through an exact allowlist of DCP's own types, then every
                      declaration checked against the files on disk (before anything is allocated)
  SafeDCPReader       torch's FileSystemReader, handed that checked metadata (never re-unpickled)
  SafeLoadPlanner,    torch's planners, loading bytes entries with weights_only=True
  SafeFullLoadPlanner

`load_dcp` runs a load with them and turns any failure into a one-line CheckpointError.
"""

from __future__ import annotations

import importlib
import math
import os
import pickle
import stat
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from dit_video.errors import CheckpointError

_MD = "torch.distributed.checkpoint.metadata"
# Exactly the (module, name) pairs DCP pickles into `.metadata`. Names are looked up as one
# attribute, never as a dotted path: pickle protocol >= 4 would resolve `Path.write_text` from
# any module that imports Path, so a rule like "any capitalised name of these modules" runs code.
_ALLOWED_GLOBALS = frozenset(
    {(_MD, name) for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata",
                              "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
                              "_MEM_FORMAT_ENCODING")}
    | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
       ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
       ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath")}  # StorageMeta.checkpoint_id
    | {("torch", name) for name, value in vars(torch).items() if isinstance(value, torch.dtype)}
)


class _NotAllowed(Exception):
    pass


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise _NotAllowed(f"{module}.{name}")
        return getattr(importlib.import_module(module), name)

    def persistent_load(self, pid):
        raise _NotAllowed(f"persistent id {str(pid)[:80]!r}")


def why(err: BaseException) -> str:
    """The line of an exception's message that says what is wrong (torch's weights_only errors
    open with advice to load unsafely, which is not what anyone should read here)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Weights only load failed", "Check the documentation"))]
    return (useful or lines or [type(err).__name__])[0][:300]


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def read_dcp_metadata(folder: str | Path) -> Metadata:
    """A DCP folder's `.metadata`, unpickled through the allowlist and checked against the shard
    files: every entry's bytes lie inside a regular file of the folder, every declared tensor is
    backed by at least its size in stored bytes, and the nesting paths are plausible. Raises a
    one-line CheckpointError naming the folder otherwise."""
    folder = Path(folder)
    path = folder / ".metadata"
    if not path.is_file():
        raise CheckpointError(f"checkpoint folder '{folder}' has no DCP .metadata (incomplete or not a checkpoint)")
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except _NotAllowed as err:
        raise CheckpointError(f"checkpoint '{folder}': {err} is not allowed in a DCP .metadata (unpickling it "
                              "could run code; refused)") from None
    except Exception as err:  # allowed types built from nonsense, truncated files, deep nesting
        raise CheckpointError(f"checkpoint '{folder}': .metadata is not DCP metadata ({type(err).__name__}: "
                              f"{why(err)})") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"checkpoint '{folder}': .metadata holds a {type(metadata).__name__}, not DCP Metadata")
    _check_declarations(folder, metadata)
    return metadata


def _check_declarations(folder: Path, md: Metadata) -> None:
    def refuse(what: str):
        raise CheckpointError(f"checkpoint '{folder}': .metadata {what}: refused before reading (corrupt or crafted)")

    entries, storage = md.state_dict_metadata, md.storage_data
    if not isinstance(entries, dict) or not isinstance(storage, dict):
        refuse("has no entry table")
    sizes: dict[str, int] = {}

    def stored(index: MetadataIndex) -> int:
        """Bytes stored for one entry (or chunk), after checking where they are."""
        info = storage.get(index)
        if not isinstance(info, _StorageInfo):
            refuse(f"declares '{index.fqn}' with no stored bytes")
        name = info.relative_path
        if not isinstance(name, str) or name in ("", ".", "..") or os.path.basename(name) != name:
            refuse(f"points '{index.fqn}' at {name!r}, outside the folder")
        if name not in sizes:
            try:
                st = os.lstat(folder / name)
            except OSError:
                refuse(f"points '{index.fqn}' at the missing file {name}")
            if not stat.S_ISREG(st.st_mode):
                refuse(f"points '{index.fqn}' at {name}, which is not a regular file")
            sizes[name] = st.st_size
        offset, length = info.offset, info.length
        if not (isinstance(offset, int) and isinstance(length, int) and 0 <= offset and 0 <= length
                and offset + length <= sizes[name]):
            refuse(f"places '{index.fqn}' at bytes {offset}+{length} of {name} ({sizes[name]} bytes)")
        if info.transform_descriptors:  # compression/encryption extensions: never written by us
            refuse(f"asks for stream transforms {list(info.transform_descriptors)!r} on '{index.fqn}'")
        return length

    declared = 0
    for fqn, entry in entries.items():
        if not isinstance(fqn, str):
            refuse(f"has a non-string key {fqn!r}")
        if isinstance(entry, BytesStorageMetadata):
            stored(MetadataIndex(fqn))
        elif isinstance(entry, TensorStorageMetadata):
            declared += _check_tensor(fqn, entry, stored, refuse)
        else:
            refuse(f"declares '{fqn}' as a {type(entry).__name__}")
    on_disk = sum(sizes.values())
    if declared > on_disk:  # chunks that share stored bytes cannot pay twice
        refuse(f"declares {_human(declared)} of tensors but its shard files hold {_human(on_disk)}")
    _check_nesting(md, len(entries), refuse)


def _check_tensor(fqn: str, entry: TensorStorageMetadata, stored, refuse) -> int:
    """Bytes the loader allocates for this tensor, after checking its chunks pay for them."""
    props, shape = entry.properties, entry.size
    if not (isinstance(props, TensorProperties) and isinstance(props.dtype, torch.dtype)
            and props.layout == torch.strided):
        refuse(f"declares '{fqn}' with tensor properties {props!r}")
    if not (isinstance(shape, torch.Size) and all(n >= 0 for n in shape)) or not isinstance(entry.chunks, list):
        refuse(f"declares '{fqn}' with the shape {shape!r}")
    itemsize = props.dtype.itemsize
    covered = backed = 0
    for chunk in entry.chunks:
        if not _chunk_inside(chunk, shape):
            refuse(f"declares a chunk of '{fqn}' {_shape_str(shape)} outside it: {chunk!r}")
        raw = math.prod(chunk.sizes) * itemsize
        length = stored(MetadataIndex(fqn, chunk.offsets))
        if raw > length:
            refuse(f"declares a chunk of '{fqn}' of {_human(raw)} stored in {_human(length)}")
        covered, backed = covered + raw, backed + length
    declared = math.prod(shape) * itemsize
    if declared > covered:  # the loader allocates the whole tensor: its chunks must pay for it
        refuse(f"declares '{fqn}' as {_shape_str(shape)} {str(props.dtype).removeprefix('torch.')} "
               f"({_human(declared)}) but its shards hold {_human(backed)}")
    return declared


def _chunk_inside(chunk, shape: torch.Size) -> bool:
    if not (isinstance(chunk, ChunkStorageMetadata) and isinstance(chunk.offsets, torch.Size)
            and isinstance(chunk.sizes, torch.Size) and len(chunk.offsets) == len(chunk.sizes) == len(shape)):
        return False
    return all(0 <= o and 0 <= s and o + s <= n for o, s, n in zip(chunk.offsets, chunk.sizes, shape, strict=True))


def _shape_str(shape) -> str:
    return "x".join(str(n) for n in shape) or "scalar"


def _check_nesting(md: Metadata, num_entries: int, refuse) -> None:
    """planner_data maps each flat key to its path in the nested state dict; a list index there
    makes the loader grow a list to that length, so an index can be no larger than the entry count."""
    paths = md.planner_data
    if not isinstance(paths, dict) or set(paths) != set(md.state_dict_metadata):
        refuse("has no nesting path for every entry (planner_data)")
    for fqn, path in paths.items():
        if not (isinstance(path, (tuple, list)) and path and isinstance(path[0], str)
                and all(isinstance(p, str) or (type(p) is int and 0 <= p < num_entries) for p in path)):
            refuse(f"gives '{fqn}' the nesting path {str(path)[:120]}")


class SafeDCPReader(FileSystemReader):
    """torch's FileSystemReader that serves metadata already checked by `read_dcp_metadata` instead
    of pickle.load-ing `.metadata` itself (tensor chunks it reads with weights_only=True)."""

    def __init__(self, folder: str | Path, metadata: Metadata):
        super().__init__(str(folder))
        self.checked = metadata

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if self.checked.storage_meta is None:
            self.checked.storage_meta = StorageMeta()
        self.checked.storage_meta.load_id = self.load_id
        return self.checked


class _BytesWeightsOnly:
    """load_bytes with weights_only=True (torch's planners use weights_only=False), into the same
    place DefaultLoadPlanner puts it."""

    checkpoint = "?"

    def load_bytes(self, read_item, value) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, map_location="cpu", weights_only=True)
        except Exception as err:
            raise CheckpointError(f"checkpoint '{self.checkpoint}': entry '{fqn}' cannot be loaded safely "
                                  f"(weights_only=True refuses pickled code and unknown types): {why(err)}") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


class SafeLoadPlanner(_BytesWeightsOnly, DefaultLoadPlanner):
    """Loads into a given state dict (training resume: the module's and optimizer's own state)."""

    def __init__(self, checkpoint: str | Path, **kwargs):
        super().__init__(**kwargs)
        self.checkpoint = str(checkpoint)


class SafeFullLoadPlanner(_BytesWeightsOnly, _EmptyStateDictLoadPlanner):
    """Rebuilds the whole state dict (or the top-level `keys`) from the metadata, as full tensors."""

    def __init__(self, checkpoint: str | Path, keys: list[str] | None = None):
        super().__init__(keys=keys)
        self.checkpoint = str(checkpoint)


def load_dcp(state: dict, folder: str | Path, metadata: Metadata, planner: DefaultLoadPlanner,
             no_dist: bool = False) -> None:
    """torch's DCP load of `folder` into `state` with the safe reader and `planner`; any failure
    (on any rank) becomes one CheckpointError naming the folder, raised on every rank."""
    try:
        _load_state_dict(state, storage_reader=SafeDCPReader(folder, metadata), planner=planner, no_dist=no_dist)
    except CheckpointException as err:  # a collective load wraps every rank's exception
        failures = [exc for exc, _ in err.failures.values()]
        ours = [exc for exc in failures if isinstance(exc, CheckpointError)]
        if ours:
            raise ours[0] from None
        raise CheckpointError(f"checkpoint '{folder}' cannot be read: {type(failures[0]).__name__}: "
                              f"{why(failures[0])}") from None
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(f"checkpoint '{folder}' cannot be read: {type(err).__name__}: {why(err)}") from None
