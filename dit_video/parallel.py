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
    checkpoint_every_n_blocks: int = 1  # 1 = every block (full AC); n > 1 = every n-th block (selective AC)
    compile: bool = False  # torch.compile each block (first compile ~36 s on CPU; cached after)
    fsdp: bool = False  # shard parameters with FSDP2 fully_shard per block, then the root (needs a process group)
    fsdp_param_dtype: str | None = "bfloat16"  # FSDP2 all-gather/compute dtype of the weights; None = keep float32
    fsdp_reshard_after_forward: bool = True  # ZeRO-3 (True) or keep gathered weights until backward (ZeRO-2-like)


def parallelize(model: nn.Module, cfg: ParallelConfig, mesh=None) -> nn.Module:
    """Apply `cfg` to a model with a `blocks` ModuleList (the DiT); returns the same model object.

    mesh: a DeviceMesh for FSDP (None = the default process group).
    """
    blocks: nn.ModuleList = model.blocks
    if cfg.checkpoint_every_n_blocks < 1:
        raise ValueError(f"checkpoint_every_n_blocks={cfg.checkpoint_every_n_blocks} must be >= 1")
    for i, block in enumerate(blocks):
        # Selective (per-layer) AC trades memory for less recompute: only every n-th block
        # recomputes, the others keep their activations (torchtitan's "selective layer" AC).
        if cfg.activation_checkpointing and i % cfg.checkpoint_every_n_blocks == 0:
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


def parallelize_dit_module(module: nn.Module, cfg: ParallelConfig, mesh=None) -> None:
    """What DiTModule.configure_model calls: `parallelize` the trained DiT; under FSDP also shard its
    EMA copy the same way, so the per-step EMA update is a local op on matching shards and the EMA
    is saved sharded with the rest. The frozen VAE and text encoder are left alone: they hold no
    optimizer state, so sharding them would only add all-gathers to every forward.

    mesh: Lightning's ModelParallelStrategy device mesh ("data_parallel" dimension used), or None.
    """
    dp_mesh = mesh["data_parallel"] if mesh is not None else None
    if getattr(module, "_dit_video_parallelized", False):
        return  # configure_model may run more than once (e.g. fit then validate)
    parallelize(module.dit, cfg, dp_mesh)
    if cfg.fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in module.ema.blocks:
            fully_shard(block, mesh=dp_mesh)
        fully_shard(module.ema, mesh=dp_mesh)
    module._dit_video_parallelized = True


# ----------------------------------------------------------------------------- Lightning strategies

STRATEGY_KINDS = ("single", "ddp", "fsdp", "deepspeed")


@dataclass
class StrategyConfig:
    """conf/strategy/*.yaml: how training is spread over processes (one file per choice)."""

    kind: str = "single"  # single | ddp | fsdp (FSDP2 via ModelParallelStrategy) | deepspeed
    process_group_backend: str | None = None  # None = nccl on GPU, gloo on CPU
    find_unused_parameters: bool = False  # ddp: only if some parameters get no gradient in a step
    zero_stage: int = 2  # deepspeed: ZeRO stage 1/2/3
    offload_optimizer: bool = False  # deepspeed: optimizer states in CPU memory (ZeRO-Offload)
    offload_params: bool = False  # deepspeed stage 3: parameters in CPU memory too (ZeRO-Infinity, CPU)
    sequence_parallel_size: int = 1  # Ulysses ranks per sequence (dit_video/distributed.py); 1 = off
    parallel: dict | None = None  # ParallelConfig fields: AC, compile, FSDP2 dtypes

    def validate(self) -> None:
        if self.kind not in STRATEGY_KINDS:
            raise ValueError(f"strategy.kind={self.kind!r}: use one of {', '.join(STRATEGY_KINDS)}")
        if self.zero_stage not in (1, 2, 3):
            raise ValueError(f"strategy.zero_stage={self.zero_stage}: use 1, 2 or 3")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("strategy.offload_params needs strategy.zero_stage=3 (only ZeRO-3 partitions parameters)")
        if self.sequence_parallel_size != 1:
            raise ValueError(
                "strategy.sequence_parallel_size > 1 is not wired into training yet: "
                "dit_video.distributed.ulysses_attention is the tested building block"
            )

    def parallel_config(self) -> ParallelConfig:
        fields = dict(self.parallel or {})
        unknown = sorted(set(fields) - set(ParallelConfig.__dataclass_fields__))
        if unknown:
            raise ValueError(f"strategy.parallel: unknown field(s) {unknown}; known: {sorted(ParallelConfig.__dataclass_fields__)}")
        fields["fsdp"] = self.kind == "fsdp"
        return ParallelConfig(**fields)


def deepspeed_config(cfg: StrategyConfig, micro_batch_size: int, grad_accum: int = 1, gradient_clipping: float = 1.0,
                     bf16: bool = True) -> dict:
    """The DeepSpeed JSON config for `cfg` (what Lightning's DeepSpeedStrategy or a plain
    `deepspeed.initialize` gets). The optimizer comes from the LightningModule (our AdamW)."""
    zero: dict = {
        "stage": cfg.zero_stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": 5e8,
    }
    if cfg.zero_stage == 3:
        # Gather each block's weights once per forward; keep small params resident.
        zero |= {"stage3_prefetch_bucket_size": 5e8, "stage3_param_persistence_threshold": 1e6,
                 "stage3_gather_16bit_weights_on_model_save": False}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": gradient_clipping,
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
        # Our AdamW (decay on matrices only) is a torch optimizer, not DeepSpeed's fused one.
        "zero_allow_untested_optimizer": True,
        # With offload, DeepSpeed otherwise insists on its compiled CPU Adam.
        "zero_force_ds_cpu_optimizer": False,
    }


def lightning_strategy(cfg: StrategyConfig, micro_batch_size: int, gradient_clipping: float | None,
                       precision: str | None, world_size: int = 1):
    """The Lightning Trainer `strategy` argument for `cfg` ("auto" for a single process).

    world_size: devices x nodes; FSDP shards over all of them (Lightning's "auto" would make the
    data-parallel dimension the node count and leave the rest to tensor parallelism).
    """
    cfg.validate()
    if cfg.kind == "single":
        return "auto"
    if cfg.kind == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(process_group_backend=cfg.process_group_backend,
                           find_unused_parameters=cfg.find_unused_parameters)
    if cfg.kind == "fsdp":
        from lightning.pytorch.strategies import ModelParallelStrategy

        # FSDP2 itself is applied by DiTModule.configure_model -> parallelize_dit_module.
        return ModelParallelStrategy(data_parallel_size=world_size, tensor_parallel_size=1,
                                     save_distributed_checkpoint=True,
                                     process_group_backend=cfg.process_group_backend)
    from lightning.pytorch.strategies import DeepSpeedStrategy

    bf16 = precision is not None and str(precision).startswith("bf16")
    return DeepSpeedStrategy(config=deepspeed_config(cfg, micro_batch_size, 1, gradient_clipping or 0.0, bf16),
                             process_group_backend=cfg.process_group_backend)
