"""Parallelism from the outside: activation checkpointing, torch.compile and FSDP2, per DiT block.

The model (dit_video/model) never branches on any of these; `parallelize` rewrites a built model
in place, torchtitan-style, and is what a LightningModule's `configure_model` calls. Order
matters and follows torchtitan: checkpointing wraps the block, compile compiles the wrapped block
(so the recompute is compiled too), and FSDP shards last (each block is one all-gather unit,
then the root picks up the embeddings and the final layer).

Parameter names (state_dict keys) are unchanged by all three, so checkpoints move freely between
a plain model and a parallelized one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ParallelConfig:
    activation_checkpointing: bool = False  # recompute each block's activations in backward (full AC)
    compile: bool = False  # torch.compile each block (first compile ~36 s on CPU; cached after)
    fsdp: bool = False  # shard parameters with FSDP2 fully_shard per block, then the root (needs a process group)
    fsdp_param_dtype: str | None = "bfloat16"  # FSDP2 all-gather/compute dtype of the weights; None = keep float32
    fsdp_reshard_after_forward: bool = True  # ZeRO-3 (True) or keep gathered weights until backward (ZeRO-2-like)


def parallelize(model: nn.Module, cfg: ParallelConfig, mesh=None) -> nn.Module:
    """Apply `cfg` to a model with a `blocks` ModuleList (the DiT); returns the same model object.

    mesh: a DeviceMesh for FSDP (None = the default process group).
    """
    blocks: nn.ModuleList = model.blocks
    for i, block in enumerate(blocks):
        if cfg.activation_checkpointing:
            block = checkpointed(block)
        if cfg.compile:
            # Module.compile compiles in place: the module object and its parameter names stay.
            block.compile()
        blocks[i] = block
    if cfg.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        dtype = getattr(torch, cfg.fsdp_param_dtype) if cfg.fsdp_param_dtype else None
        # Gradients are reduced in float32 whatever the compute dtype: bf16 reductions lose
        # precision summed over many ranks.
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=cfg.fsdp_reshard_after_forward)
        fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=cfg.fsdp_reshard_after_forward)
    return model


def checkpointed(block: nn.Module) -> nn.Module:
    """Make a block's forward recompute in backward (non-reentrant torch.utils.checkpoint).

    The composable `checkpoint` installs forward hooks instead of wrapping the module (which
    the older checkpoint_wrapper does), so the module tree and the `blocks.3.attn...` names stay.
    """
    from torch.distributed._composable import checkpoint

    return checkpoint(block)
