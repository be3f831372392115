"""Multi-process test helpers: spawn gloo ranks, and the collective-parity check every such test runs.

Collective parity. A rank that skips a collective only hangs on a real cluster, and gloo accepts
host (CPU) tensors that NCCL refuses, so on this CPU machine neither shows by itself. Every
multi-process test therefore records each rank's collectives (op, group, shapes, dtypes, devices)
with `record_collectives` and fails (`assert_collective_parity`) when

  - the ranks' sequences differ (one rank made a collective another did not, or other shapes), or
  - a tensor is not on the strategy's device, or, with `host_tensors=True`, our code (dit_video/)
    hands a collective a *host* tensor.

Host tensors emulate a machine whose module device is not the default tensor device (a GPU run)
on a CPU-only one: a TorchFunctionMode tags every tensor made without an explicit device (the
factories: zeros, tensor, randn, ...) or moved with `.cpu()`/`.to("cpu")` as host, and results of
ops on host tensors stay host; tensors that exist when recording starts (the module's weights) and
tensors moved with `.to(device)` are device tensors. So `torch.zeros(k).cpu()` fed to an all_reduce
fails here as it would under NCCL, while `torch.zeros(k, device=module.device)` passes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.overrides import TorchFunctionMode

# torch.distributed entry points that move tensors between ranks (those FSDP2, DTensor, DeepSpeed,
# Lightning and our code call); object collectives pickle on a device torch picks itself.
TENSOR_COLLECTIVES = (
    "all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_single", "all_gather_into_tensor",
    "all_gather_coalesced", "_all_gather_base", "reduce_scatter", "reduce_scatter_single", "reduce_scatter_tensor",
    "_reduce_scatter_base", "broadcast", "reduce", "all_to_all", "all_to_all_single", "gather", "scatter",
    "batch_isend_irecv", "send", "recv", "isend", "irecv", "barrier", "monitored_barrier",
)
OBJECT_COLLECTIVES = ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list")
FUNCTIONAL = ("all_reduce", "all_gather_tensor", "all_gather_single", "reduce_scatter_tensor",
              "reduce_scatter_single", "all_to_all_single", "broadcast")
_FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.tensor, torch.as_tensor, torch.arange,
              torch.linspace, torch.rand, torch.randn, torch.randint, torch.randperm, torch.eye, torch.from_numpy,
              torch.empty_strided, torch.scalar_tensor}
_TORCH_DIRS = (os.path.dirname(torch.__file__), os.path.dirname(__file__) + os.sep + "spawn_ranks.py")
_OURS = os.sep + "dit_video" + os.sep


def free_port() -> int:
    """A TCP port on 127.0.0.1 free right now, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, dist.P2POp):
        return [value.tensor]
    return []


def _is_host(t: torch.Tensor) -> bool:
    return getattr(t, "_spawn_ranks_host", False)


def _mark(value) -> None:
    for t in _tensors(value):
        try:
            t._spawn_ranks_host = True
        except (AttributeError, RuntimeError):  # a tensor type without __dict__: left untagged
            pass


def _in_place(func) -> bool:
    name = getattr(func, "__name__", "")
    return (name.endswith("_") and not name.endswith("__")) or (name.startswith("__i") and name.endswith("__"))


def _to_target(args, kwargs):
    """The device (or tensor) a Tensor.to call moves to; None when it only casts."""
    if kwargs.get("device") is not None:
        return kwargs["device"]
    return next((a for a in args[1:] if isinstance(a, (str, torch.device, torch.Tensor))), None)


class HostTensors(TorchFunctionMode):
    """Tags host tensors (see the module docstring); everything else passes through unchanged."""

    paused = False  # inside CollectiveLog.device_tensors(): a module being built is on the device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.paused:
            return out
        if func in _FACTORIES:
            made_on_host = kwargs.get("device") is None and not (func is torch.as_tensor and _tensors(args[:1]))
        elif func is torch.Tensor.cpu:
            made_on_host = True
        elif func is torch.Tensor.to and _to_target(args, kwargs) is not None:
            target = _to_target(args, kwargs)
            # A literal "cpu" is the host; a torch.device (module.device) or a tensor's is the module's device.
            made_on_host = _is_host(target) if isinstance(target, torch.Tensor) else (
                isinstance(target, str) and target.startswith("cpu"))
            if not made_on_host and out is args[0] and _is_host(out):
                out = out.view_as(out)  # "moved": here .to() returned the host tensor itself; a new, untagged view
        elif _in_place(func):  # x.copy_(host), x += y: x stays where it is
            made_on_host = bool(args) and isinstance(args[0], torch.Tensor) and _is_host(args[0])
        else:
            made_on_host = any(_is_host(t) for t in _tensors(args) + _tensors(kwargs))
        if made_on_host and out is not None:
            _mark(out)
        return out


def _group_desc(group) -> str:
    """'world' or 'group of N' (ranks differ between the groups of a dp x sp grid, sizes do not)."""
    if group is None or group is dist.GroupMember.WORLD:
        return "world"
    try:
        return f"group of {len(dist.get_process_group_ranks(group))}"
    except Exception:  # a functional-collective group spec (mesh, name, rank list)
        return f"group {type(group).__name__}"


class CollectiveLog:
    """The collectives of this process, in call order (outermost calls only)."""

    def __init__(self, device: torch.device, host_tensors: bool):
        self.device, self.host_tensors = torch.device(device), host_tensors
        self.entries: list[dict] = []
        self._depth = threading.local()
        self._mode: HostTensors | None = None

    def _caller(self) -> str:
        frame = sys._getframe(2)
        while frame is not None and frame.f_code.co_filename.startswith(_TORCH_DIRS):
            frame = frame.f_back
        return f"{frame.f_code.co_filename}:{frame.f_lineno}" if frame is not None else "?"

    def wrap(self, name: str, fn, objects: bool = False):
        @functools.wraps(fn)
        def recorded(*args, **kwargs):
            depth = getattr(self._depth, "n", 0)
            if depth == 0:
                group = kwargs.get("group", next((a for a in args if isinstance(a, dist.ProcessGroup)), None))
                tensors = [] if objects else _tensors(args) + _tensors({k: v for k, v in kwargs.items() if k != "group"})
                if name in ("gather", "scatter"):  # only the root passes the list: compare what every rank sends
                    tensors = tensors[:1]
                caller = self._caller()
                self.entries.append({
                    "op": name, "group": _group_desc(group),
                    "tensors": [[list(t.shape), str(t.dtype)] for t in tensors],
                    "devices": [str(t.device) for t in tensors],
                    "host": [_is_host(t) for t in tensors] if self.host_tensors and _OURS in caller else [],
                    "caller": caller,
                })
            self._depth.n = depth + 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth.n = depth

        return recorded

    def track_host_tensors(self) -> None:
        """From now on, tag host tensors (tensors that exist already count as on the device)."""
        self.host_tensors = True
        if self._mode is None:
            self._mode = HostTensors()
            self._mode.__enter__()

    @contextlib.contextmanager
    def device_tensors(self):
        """Tensors made inside (a module being built, as a strategy would place it) are device tensors."""
        paused = self._mode is not None and self._mode.paused
        if self._mode is not None:
            self._mode.paused = True
        try:
            yield
        finally:
            if self._mode is not None:
                self._mode.paused = paused

    def dump(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.entries))


def record_collectives(device: str | torch.device = "cpu", host_tensors: bool = False) -> CollectiveLog:
    """Start recording this process's collectives (call once per process, before any of them).

    device: the strategy's device every collective tensor must be on. host_tensors: also tag host
    tensors from now on (see the module docstring), so tensors created later without a device fail
    when our code hands them to a collective; existing tensors (the module) count as on `device`."""
    from torch.distributed import _functional_collectives as funcol
    from torch.distributed import distributed_c10d as c10d

    log = CollectiveLog(device, host_tensors)
    for names, module, objects in ((TENSOR_COLLECTIVES, c10d, False), (OBJECT_COLLECTIVES, c10d, True)):
        for name in names:
            if hasattr(module, name):
                wrapped = log.wrap(name, getattr(module, name), objects)
                setattr(module, name, wrapped)
                if hasattr(dist, name):
                    setattr(dist, name, wrapped)
    for name in FUNCTIONAL:
        if hasattr(funcol, name):
            setattr(funcol, name, log.wrap(f"functional.{name}", getattr(funcol, name)))
    if host_tensors:
        log.track_host_tensors()
    return log


def parity_problems(logs: dict[int, list[dict]], device: str | torch.device = "cpu") -> list[str]:
    """What is wrong with the ranks' collective logs ({rank: entries}); [] when they agree."""
    device = torch.device(device)
    problems = []
    signature = {r: [(e["op"], e["group"], e["tensors"]) for e in entries] for r, entries in logs.items()}
    first = min(logs)
    for rank, sig in signature.items():
        if sig != signature[first]:
            at = next((i for i, (a, b) in enumerate(zip(sig, signature[first], strict=False)) if a != b),
                      min(len(sig), len(signature[first])))
            mine = logs[rank][at] if at < len(sig) else "nothing"
            theirs = logs[first][at] if at < len(signature[first]) else "nothing"
            problems.append(f"rank {rank} and rank {first} differ at collective #{at} ({len(sig)} vs "
                            f"{len(signature[first])} in all): {mine} vs {theirs}")
    for rank, entries in logs.items():
        for e in entries:
            if any(torch.device(d).type != device.type for d in e["devices"]):
                problems.append(f"rank {rank}: {e['op']} from {e['caller']} got tensors on {e['devices']}, "
                                f"not on the strategy's device {device}")
            if any(e["host"]):
                problems.append(f"rank {rank}: {e['op']} from {e['caller']} got a host tensor (made without "
                                f"device= or moved with .cpu()): NCCL refuses it on a GPU run")
    return problems


def assert_collective_parity(folder: str | Path, world: int, device: str | torch.device = "cpu",
                             min_entries: int = 1) -> list[dict]:
    """Read `collectives-<rank>.json` of every rank from `folder`, assert parity; returns rank 0's log."""
    logs = {r: json.loads((Path(folder) / f"collectives-{r}.json").read_text()) for r in range(world)}
    problems = parity_problems(logs, device)
    assert not problems, "collective parity:\n  " + "\n  ".join(problems[:10])
    assert len(logs[0]) >= min_entries, f"only {len(logs[0])} collectives recorded: is the recorder installed?"
    return logs[0]


# ----------------------------------------------------------------------------- spawned gloo ranks


def _recorded(target, rank: int, store: str, queue, log_dir: str, host_tensors: bool) -> None:
    log = record_collectives("cpu", host_tensors)
    try:
        target(rank, store, queue)
    finally:
        log.dump(Path(log_dir) / f"collectives-{rank}.json")


def spawn_ranks(target, store: str, world: int, timeout: float = 120.0, host_tensors: bool = False) -> dict:
    """Start target(rank, store, queue) on `world` spawned processes, wait, and return
    {rank: result} from the (rank, result) pairs they put on the queue. A hung rank is killed and
    fails the test; a rank whose assertion fails exits non-zero, which fails it too. Every rank's
    collectives are recorded and must agree (`assert_collective_parity`)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    log_dir = Path(store).parent / "collectives"
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = [ctx.Process(target=_recorded, args=(target, r, store, queue, str(log_dir), host_tensors))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    logs = {r: json.loads(f.read_text()) for r in range(world) if (f := log_dir / f"collectives-{r}.json").is_file()}
    problems = "\n  ".join(parity_problems(logs)[:10]) if logs else "no collective logs"
    assert not alive, f"a rank hung; collective parity so far:\n  {problems}"
    assert [p.exitcode for p in procs] == [0] * world, (
        f"a rank failed (its traceback is in the captured stderr); collective parity:\n  {problems}")
    results = dict(queue.get(timeout=5) for _ in range(world))
    assert_collective_parity(log_dir, world)
    return results
