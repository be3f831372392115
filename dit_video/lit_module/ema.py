"""The EMA of the DiT's weights: fp32, outside the LightningModule's module tree, in every checkpoint.

Why outside the tree: a strategy acts on every parameter of the module it is given. DeepSpeed casts
that module to bf16 (an EMA update of 1e-4 x difference then rounds away) and ZeRO-3 partitions it
(the update then lerps empty `.data`). Held beside the module, as the frozen encoders are
(frozen.py), the EMA stays fp32 and whole, and is updated from the weights as the engine holds them:
ZeRO-3's partitioned weights are gathered one block at a time for the update.

Under FSDP2 the EMA is sharded like the weights (parallel.parallelize_dit_module): the update is a
local lerp on matching shards and the EMA costs 1/world of its size per rank; its forwards (samples,
held-out loss) are then collectives, which is why those callbacks run the same number of forwards
on every rank.

In checkpoints the EMA keeps the keys it had as a submodule, `ema.*`: `DiTModule.state_dict()`
holds them (a state-dict hook), so single-process, DDP and FSDP2 (DCP) checkpoints, `sample.py`
and the exporter read them as before. DeepSpeed writes its own module state instead, so there the
EMA goes into the checkpoint's client state (`ema_state_dict`), from rank 0 only (ZeRO-3 writes one
model-state file per rank), and is broadcast to every rank on load;
`dit_video.checkpoint.deepspeed` puts it back under `state_dict` when a ZeRO checkpoint is read.
"""

from __future__ import annotations

import contextlib
import copy
from types import SimpleNamespace

import torch
from torch import nn

from dit_video.checkpoint.deepspeed import EMA_KEY as CLIENT_KEY
from dit_video.errors import CheckpointError

EMA_PREFIX = "ema."


class EMAWeights:
    """A plain holder (not an nn.Module) of the EMA copy, so nn.Module never registers it."""

    def __init__(self, dit: nn.Module):
        self.module = copy.deepcopy(dit).requires_grad_(False).eval().float()

    def shard(self, dit: nn.Module, mesh=None) -> None:
        """FSDP2: shard the EMA copy as the DiT is (per block, then the root)."""
        from torch.distributed.fsdp import fully_shard

        for block in self.module.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self.module, mesh=mesh)

    def update(self, dit: nn.Module, decay: float) -> None:
        ema_update(self.module, dit, decay)

    def state_dict_into(self, destination: dict, prefix: str) -> None:
        self.module.state_dict(destination=destination, prefix=prefix)

    def load_state_dict(self, state: dict) -> tuple[list[str], list[str]]:
        """Load `state` (not strictly); returns (missing keys, unexpected keys)."""
        result = self.module.load_state_dict(state, strict=False)
        return list(result.missing_keys), list(result.unexpected_keys)

    @contextlib.contextmanager
    def applied(self, dit: nn.Module):
        """The EMA copy itself (a module of its own)."""
        yield self.module

    def follow_device(self, fn) -> None:
        """Apply the device of an nn.Module `_apply` function, never its dtype: `.to(device)`,
        `.cuda()` and DeepSpeed's `.bfloat16()` of the LightningModule all end in `_apply`."""
        probe = next(self.module.parameters())
        target = fn(torch.empty(0, dtype=probe.dtype, device=probe.device)).device
        if target != probe.device:
            self.module.to(target)


def _partitioned(params: list[torch.Tensor]) -> bool:
    return any(hasattr(p, "ds_id") for p in params)  # DeepSpeed ZeRO-3 marks the parameters it partitions


def _gathered(params: list[torch.Tensor]):
    """ZeRO-3 partitioned parameters gathered whole for the duration (a collective); else a no-op."""
    if not _partitioned(params):
        return contextlib.nullcontext()
    import deepspeed  # optional: only a ZeRO-3 run has partitioned parameters

    return deepspeed.zero.GatheredParameters(params)


def _pieces(module: nn.Module) -> list[list[nn.Parameter]]:
    """Parameters in `parameters()` order, split per block (one all-gather unit under ZeRO-3)
    so a gather never holds more than one block beyond the partitions."""
    pieces: list[list[nn.Parameter]] = [list(module.parameters(recurse=False))]
    for child in module.children():
        if isinstance(child, nn.ModuleList):
            pieces += [list(block.parameters()) for block in child]
        else:
            pieces.append(list(child.parameters()))
    return [p for p in pieces if p]


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, in the EMA's dtype (fp32), one fused call per piece.

    `model`'s weights may be bf16 (DeepSpeed casts them) or partitioned (ZeRO-3: gathered here,
    a collective every rank runs); in fp32 the update is the same single fused lerp as ever.
    """
    ema_params = list(ema.parameters())
    params = list(model.parameters())
    if not _partitioned(params):
        torch._foreach_lerp_(ema_params, [p.detach().to(e.dtype) for e, p in zip(ema_params, params, strict=True)],
                             1.0 - decay)
        return
    done = 0
    for piece in _pieces(model):
        targets = ema_params[done : done + len(piece)]
        with _gathered(piece):
            torch._foreach_lerp_(targets, [p.detach().to(e.dtype) for e, p in zip(targets, piece, strict=True)],
                                 1.0 - decay)
        done += len(piece)


def ema_decay_at(step: int, decay: float) -> float:
    """Warm the EMA up so short runs are not dominated by the random init (decay -> cfg value)."""
    return min(decay, (1.0 + step) / (10.0 + step))


def ema_to_client_state(ema: nn.Module, checkpoint: dict, is_global_zero: bool) -> None:
    """DeepSpeed save: the EMA into the client state, on rank 0 only (every rank holds it whole)."""
    if is_global_zero:
        checkpoint[CLIENT_KEY] = {EMA_PREFIX + k: v.detach().cpu() for k, v in ema.state_dict().items()}


@torch.no_grad()
def ema_from_client_state(ema: nn.Module, checkpoint: dict) -> None:
    """DeepSpeed load (collective): rank 0's saved EMA into `ema` on every rank.

    Under ZeRO-3 only rank 0's model-state file holds it; the broadcast runs on every rank
    whatever the stage, so every rank makes the same collectives."""
    saved = checkpoint.pop(CLIENT_KEY, None)
    if saved is not None:
        ema.load_state_dict({k[len(EMA_PREFIX) :]: v for k, v in saved.items()})
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        has = torch.tensor([saved is not None], dtype=torch.int32, device=next(ema.parameters()).device)
        torch.distributed.broadcast(has, src=0)
        if not bool(has):
            raise CheckpointError(f"DeepSpeed checkpoint holds no EMA ('{CLIENT_KEY}'): not written by dit-video's DiT training")
        for tensor in ema.state_dict().values():
            torch.distributed.broadcast(tensor, src=0)
    elif saved is None:
        raise CheckpointError(f"DeepSpeed checkpoint holds no EMA ('{CLIENT_KEY}'): not written by dit-video's DiT training")


class AdapterEMA:
    """The EMA of a LoRA run: fp32 copies of the trainable (adapter) tensors only.

    The frozen base never moves, so its EMA would equal it: shadowing 1.3B (or 14B) frozen weights
    in fp32 would cost 4 bytes per parameter for nothing. Forwards with the EMA weights (samples,
    held-out loss) swap the EMA adapters into the trained DiT for their duration (`applied`).
    Under FSDP2 the copies are re-taken from the sharded adapters (`shard`): a local lerp per shard.
    """

    def __init__(self, dit: nn.Module):
        self.tensors = _trainable_copies(dit)
        self._pairs = None  # (EMA tensors, the DiT's adapter parameters): found once, not at every step

    def shard(self, dit: nn.Module, mesh=None) -> None:
        self.tensors = _trainable_copies(dit)  # DTensor clones keep the adapters' sharding
        self._pairs = None  # fully_shard replaced the parameters

    def follow_device(self, fn) -> None:
        probe = next(iter(self.tensors.values()))
        target = fn(torch.empty(0, dtype=probe.dtype, device=probe.device)).device
        if target != probe.device:
            self.tensors = {k: v.to(target) for k, v in self.tensors.items()}
            self._pairs = None

    @torch.no_grad()
    def update(self, dit: nn.Module, decay: float) -> None:
        if self._pairs is None:
            params = dict(dit.named_parameters())
            self._pairs = (list(self.tensors.values()), [params[k] for k in self.tensors])
        targets, sources = self._pairs
        torch._foreach_lerp_(targets, [p.detach().to(t.dtype) for t, p in zip(targets, sources, strict=True)], 1.0 - decay)

    def state_dict_into(self, destination: dict, prefix: str) -> None:
        destination.update({prefix + k: v for k, v in self.tensors.items()})

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> tuple[list[str], list[str]]:
        """Copy `state` in; returns (missing keys, unexpected keys)."""
        for k, v in state.items():
            if k in self.tensors:
                self.tensors[k].copy_(v)
        return sorted(set(self.tensors) - set(state)), sorted(set(state) - set(self.tensors))

    @property
    def tree(self) -> SimpleNamespace:
        """The EMA tensors as nested attributes (`tree.blocks.0.attn.qkv.lora_A.default.weight`): what
        torch.distributed.checkpoint walks to place the `ema.*` keys of the state dict. Not a module."""
        root = SimpleNamespace()
        for name, tensor in self.tensors.items():
            *path, leaf = name.split(".")
            node = root
            for part in path:
                if not hasattr(node, part):
                    setattr(node, part, SimpleNamespace())
                node = getattr(node, part)
            setattr(node, leaf, tensor)
        return root

    @contextlib.contextmanager
    def applied(self, dit: nn.Module):
        """`dit` with the EMA adapters in place of its own for the duration (restored after)."""
        params = dict(dit.named_parameters())
        with torch.no_grad():
            saved = {k: params[k].detach().clone() for k in self.tensors}
            for k, v in self.tensors.items():
                params[k].copy_(v)
        try:
            yield dit
        finally:
            with torch.no_grad():
                for k, v in saved.items():
                    params[k].copy_(v)


def _trainable_copies(dit: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in dit.named_parameters() if p.requires_grad}
