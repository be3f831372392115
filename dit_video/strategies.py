"""Which Lightning strategy a run uses: conf/strategy/*.yaml -> StrategyConfig -> the Trainer's
`strategy` argument (DDP, FSDP2 through ModelParallelStrategy, or DeepSpeed ZeRO with the JSON
config `deepspeed_config` writes). What each strategy does to the model itself (FSDP2, activation
checkpointing, compile, sequence parallelism) is dit_video/parallel.py's job.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, ModelParallelStrategy

from dit_video.parallel import SP_ATTENTIONS, ParallelConfig, data_parallel_sampler_kwargs

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
    sequence_parallel_size: int = 1  # ranks per sequence (ddp, fsdp): tokens split over them; 1 = off
    sp_attention: str = "ulysses"  # ulysses (all-to-all over heads; heads % size == 0) | ring (any heads)
    parallel: dict | None = None  # ParallelConfig fields: AC, compile, FSDP2 dtypes

    def validate(self) -> None:
        if self.kind not in STRATEGY_KINDS:
            raise ValueError(f"strategy.kind={self.kind!r}: use one of {', '.join(STRATEGY_KINDS)}")
        if self.zero_stage not in (1, 2, 3):
            raise ValueError(f"strategy.zero_stage={self.zero_stage}: use 1, 2 or 3")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("strategy.offload_params needs strategy.zero_stage=3 (only ZeRO-3 partitions parameters)")
        if self.sequence_parallel_size < 1:
            raise ValueError(f"strategy.sequence_parallel_size={self.sequence_parallel_size} must be >= 1 (1 = off)")
        if self.sequence_parallel_size > 1 and self.kind not in ("ddp", "fsdp"):
            raise ValueError(f"strategy.sequence_parallel_size > 1 needs strategy=ddp or strategy=fsdp "
                             f"(got kind={self.kind!r})")
        if self.sp_attention not in SP_ATTENTIONS:
            raise ValueError(f"strategy.sp_attention={self.sp_attention!r}: use one of {', '.join(SP_ATTENTIONS)}")

    def parallel_config(self) -> ParallelConfig:
        fields = dict(self.parallel or {})
        unknown = sorted(set(fields) - set(ParallelConfig.__dataclass_fields__))
        if unknown:
            raise ValueError(f"strategy.parallel: unknown field(s) {unknown}; known: {sorted(ParallelConfig.__dataclass_fields__)}")
        fields["fsdp"] = self.kind == "fsdp"
        fields["deepspeed"] = self.kind == "deepspeed"
        fields["deepspeed_zero3"] = self.kind == "deepspeed" and self.zero_stage == 3
        fields["sequence_parallel_size"], fields["sp_attention"] = self.sequence_parallel_size, self.sp_attention
        return ParallelConfig(**fields)


def deepspeed_config(cfg: StrategyConfig, micro_batch_size: int, gradient_clipping: float = 1.0,
                     bf16: bool = True) -> dict:
    """The DeepSpeed JSON config for `cfg` (what Lightning's DeepSpeedStrategy or a plain
    `deepspeed.initialize` gets). The optimizer comes from the LightningModule (our AdamW). No
    `gradient_accumulation_steps`: Lightning sets it from the Trainer and refuses a config that has it."""
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
        "gradient_clipping": gradient_clipping,
        # A non-finite gradient makes the ZeRO optimizer skip the step (NonFiniteGuard counts it).
        "bf16": {"enabled": bf16, "check_grad_overflow": True},
        "zero_optimization": zero,
        # Our AdamW (decay on matrices only) is a torch optimizer, not DeepSpeed's fused one.
        "zero_allow_untested_optimizer": True,
        # With offload, DeepSpeed otherwise insists on its compiled CPU Adam.
        "zero_force_ds_cpu_optimizer": False,
    }


def lightning_strategy(cfg: StrategyConfig, micro_batch_size: int, gradient_clipping: float | None,
                       precision: str | None, world_size: int = 1, fsdp_strategy: type | None = None):
    """The Lightning Trainer `strategy` argument for `cfg` ("auto" for a single process).

    world_size: devices x nodes; FSDP shards over all of them (Lightning's "auto" would make the
    data-parallel dimension the node count and leave the rest to tensor parallelism).
    fsdp_strategy: the ModelParallelStrategy class for kind=fsdp (training passes
    dit_video.checkpoint.strategy.SafeModelParallelStrategy, whose resume unpickles no code).
    """
    cfg.validate()
    sp = cfg.sequence_parallel_size
    if world_size % sp:
        raise ValueError(f"strategy.sequence_parallel_size={sp} must divide the world size {world_size} "
                         "(trainer.devices x trainer.num_nodes)")
    if cfg.kind == "single":
        return "auto"
    if cfg.kind == "ddp":
        kwargs = dict(process_group_backend=cfg.process_group_backend, find_unused_parameters=cfg.find_unused_parameters)
        return DDPStrategy(**kwargs) if sp == 1 else _sequence_parallel(DDPStrategy, sp)(**kwargs)
    if cfg.kind == "fsdp":
        # FSDP2 itself is applied by DiTModule.configure_model -> parallelize_dit_module. It shards over
        # all dp x sp ranks (the data_parallel mesh dimension is the whole world), as gradients need.
        kwargs = dict(data_parallel_size=world_size, tensor_parallel_size=1, save_distributed_checkpoint=True,
                      process_group_backend=cfg.process_group_backend)
        base = fsdp_strategy or ModelParallelStrategy
        return base(**kwargs) if sp == 1 else _sequence_parallel(base, sp)(**kwargs)
    bf16 = precision is not None and str(precision).startswith("bf16")
    return DeepSpeedStrategy(config=deepspeed_config(cfg, micro_batch_size, gradient_clipping or 0.0, bf16),
                             process_group_backend=cfg.process_group_backend)


def _sequence_parallel(strategy_cls, sequence_parallel_size: int):
    """`strategy_cls` whose DistributedSampler (map-style datasets) gives every rank of a
    sequence-parallel group the same samples; our own loaders read the same numbers via
    dit_video.data.datamodule's `_rank_world`."""

    class SequenceParallel(strategy_cls):
        @property
        def distributed_sampler_kwargs(self) -> dict:
            return data_parallel_sampler_kwargs(self.global_rank, self.world_size, sequence_parallel_size)

    SequenceParallel.__name__ = SequenceParallel.__qualname__ = f"SequenceParallel{strategy_cls.__name__}"
    return SequenceParallel
