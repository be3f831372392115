"""Parallelism from the outside: activation checkpointing, torch.compile, FSDP2 and sequence
parallelism (Ulysses or ring attention), per DiT block.

The model (dit_video/model) never branches on any of these; `parallelize` rewrites a built model
in place, torchtitan-style, and is what a LightningModule's `configure_model` calls. Order
matters and follows torchtitan: checkpointing wraps the block, compile compiles the wrapped block
(so the recompute is compiled too), and FSDP shards last (each block is one all-gather unit,
then the root picks up the embeddings and the final layer).

Parameter names (state_dict keys) are unchanged by all of them, so checkpoints move freely between
a plain model and a parallelized one.

Sequence parallelism (`shard_sequence`) is applied before the others. The world is a
(data-parallel, sequence-parallel) grid in row-major order: ranks sp*d ... sp*d + sp-1 form one
sequence-parallel group, which reads the batches of data-parallel rank d
(`dit_video.data.dataset.dist_info`, `data_parallel_sampler_kwargs`). Gradients are still averaged over
all dp x sp ranks (DDP, FSDP2 over the whole world); `gather_sequence`'s backward makes that exact.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from dit_video.distributed import gather_sequence, ring_attention, ulysses_attention
from dit_video.model.attention import attention as full_attention
from dit_video.model.blocks import SelfAttention

SP_ATTENTIONS = ("ulysses", "ring")  # dit_video/distributed.py: ulysses_attention, ring_attention


@dataclass
class ParallelConfig:
    activation_checkpointing: bool = False  # recompute each block's activations in backward (full AC)
    checkpoint_every_n_blocks: int = 1  # 1 = every block (full AC); n > 1 = every n-th block (selective AC)
    compile: bool = False  # torch.compile each block (first compile ~36 s on CPU; cached after)
    fsdp: bool = False  # shard parameters with FSDP2 fully_shard per block, then the root (needs a process group)
    fsdp_param_dtype: str | None = "bfloat16"  # FSDP2 all-gather/compute dtype of the weights; None = keep float32
    fsdp_reshard_after_forward: bool = True  # ZeRO-3 (True) or keep gathered weights until backward (ZeRO-2-like)
    sequence_parallel_size: int = 1  # ranks that split one sequence's tokens (needs a process group); 1 = off
    sp_attention: str = "ulysses"  # self-attention across the split: ulysses (heads % sp == 0) | ring (any heads)
    deepspeed: bool = False  # DeepSpeed runs bf16 weights without autocast: inputs_follow_weights
    # DeepSpeed ZeRO-3 gathers a module's own weights when that module is entered; the fused QKV
    # kernel (model/fused.py) reads the QK-norm weights from the attention layer, so attention
    # layers become ZeRO-3 "leaf" modules that gather all their weights on entry.
    deepspeed_zero3: bool = False


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
        # The root casts its inputs itself (below) instead of FSDP's cast-everything: a bf16 t has
        # ~128 distinct values in [0.5, 1), while the objective and sampler use fp32 t.
        root = dataclasses.replace(policy, cast_forward_inputs=False)
        fully_shard(model, mesh=mesh, mp_policy=root, reshard_after_forward=cfg.fsdp_reshard_after_forward)
        if dtype is not None:
            inputs_follow_weights(model, dtype)
    if cfg.deepspeed:
        inputs_follow_weights(model)
    return model


def inputs_follow_weights(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Cast the floating inputs of `model`'s forward and forward_packed (x, text_emb, pooled) to
    `dtype` (None: the weights' dtype at each call), all but `t` (the second argument): the timestep
    embedding makes its sinusoids from fp32 t. For DiTs run in bf16 weights without autocast
    (FSDP2's param_dtype, DeepSpeed's bf16 engine)."""

    def cast(value, to: torch.dtype):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.to(to)
        if isinstance(value, (list, tuple)):  # forward_packed: a list of latents [C, T_i, H_i, W_i]
            return type(value)(cast(v, to) for v in value)
        return value

    def hook(module, args, kwargs):
        to = dtype if dtype is not None else next(module.parameters()).dtype
        args = tuple(a if i == 1 else cast(a, to) for i, a in enumerate(args))
        return args, {k: v if k == "t" else cast(v, to) for k, v in kwargs.items()}

    model.register_forward_pre_hook(hook, with_kwargs=True)
    forward_packed = model.forward_packed

    def packed(*args, **kwargs):
        args, kwargs = hook(model, args, kwargs)
        return forward_packed(*args, **kwargs)

    model.forward_packed = packed
    return model


def checkpointed(block: nn.Module) -> nn.Module:
    """Make a block's forward recompute in backward (non-reentrant torch.utils.checkpoint).

    The composable `checkpoint` installs forward hooks instead of wrapping the module (which
    the older checkpoint_wrapper does), so the module tree and the `blocks.3.attn...` names stay.
    """
    from torch.distributed._composable import checkpoint

    return checkpoint(block)


def parallelize_dit_module(module: nn.Module, cfg: ParallelConfig, mesh=None):
    """What DiTModule.configure_model calls: `shard_sequence` (sequence parallelism) and
    `parallelize` the trained DiT; under FSDP also shard its EMA copy (fp32, outside the module tree)
    the same way, so the per-step EMA update is a local op on matching shards, the EMA costs 1/world
    of its size per rank, and it is saved sharded with the rest (its forwards are then collectives:
    eval/samples.py and eval/val_loss.py run the same number on every rank). The frozen VAE and text
    encoder are left alone: no optimizer state, so sharding them would only add all-gathers.

    mesh: Lightning's ModelParallelStrategy device mesh ("data_parallel" dimension used), or None.
    Returns this rank's sequence-parallel process group (None without sequence parallelism).
    """
    dp_mesh = mesh["data_parallel"] if mesh is not None else None
    if getattr(module, "_dit_video_parallelized", False):
        return module._dit_video_sequence_group  # configure_model may run more than once (e.g. fit then validate)
    group = None
    if cfg.sequence_parallel_size > 1:
        # Only the trained DiT: the EMA copy (samples, held-out loss) runs whole sequences per rank.
        group = sequence_parallel_group(cfg.sequence_parallel_size)
        shard_sequence(module.dit, group, cfg.sp_attention)
    parallelize(module.dit, cfg, dp_mesh)
    if cfg.deepspeed_zero3:
        from deepspeed.utils import set_z3_leaf_modules

        # Only the trained DiT: the EMA lives outside the module tree, whole and fp32 (lit_module/ema.py).
        set_z3_leaf_modules(module.dit, [SelfAttention], raise_if_not_found=False)  # MMDiT blocks have none
    if cfg.fsdp:
        module.ema_weights.shard(module.dit, dp_mesh)  # the EMA copy sharded as the DiT (lit_module/ema.py)
    module._dit_video_parallelized, module._dit_video_sequence_group = True, group
    return group


# ----------------------------------------------------------------------------- sequence parallelism


def sequence_parallel_group(size: int):
    """This rank's sequence-parallel process group: consecutive ranks [size*d, size*(d+1)).

    Collective: every rank of the default group must call it (each `new_group` is)."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    if world % size:
        raise ValueError(f"strategy.sequence_parallel_size={size} must divide the world size {world} "
                         "(trainer.devices x trainer.num_nodes)")
    mine = None
    for first in range(0, world, size):
        ranks = list(range(first, first + size))
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = group
    return mine


def shard_sequence(dit: nn.Module, group, attention: str = "ulysses") -> nn.Module:
    """Split a DiT's training forward along the token sequence over the ranks of `group`.

    Hooks only (the model code stays free of torch.distributed), active for forwards in training
    mode; eval-mode forwards run the whole sequence on each rank as before:
      1. the patch embedding's output [B, N, D] -> this rank's contiguous tokens [B, N/P, D];
      2. every self-attention: its RoPE table rows cut to the same tokens, and its `attend`
         runs Ulysses or ring attention across the group (cross-attention and MLPs are per token);
      3. the final layer's output [B, N/P, C_out*p] -> all ranks' tokens [B, N, C_out*p]
         (`gather_sequence`), so unpatchify and the objective's loss see the whole sequence.
    Every rank of the group must get the same inputs (batch, noise, t): checked at the first forward.
    """
    import torch.distributed as dist

    if attention not in SP_ATTENTIONS:
        raise ValueError(f"strategy.sp_attention={attention!r}: use one of {', '.join(SP_ATTENTIONS)}")
    cfg, P, rank = dit.cfg, dist.get_world_size(group), dist.get_rank(group)
    unsupported = {"conditioning": (cfg.conditioning, "cross_attn"), "pos_embed": (cfg.pos_embed, "rope")}
    for field, (value, needed) in unsupported.items():
        if value != needed:  # joint text+video attention / absolute positions added to all N tokens
            raise ValueError(f"sequence parallelism supports model.{field}={needed} only (got {value!r})")
    if attention == "ulysses" and cfg.num_heads % P:
        raise ValueError(f"strategy.sp_attention=ulysses needs model.num_heads={cfg.num_heads} divisible by "
                         f"strategy.sequence_parallel_size={P}: change either, or use strategy.sp_attention=ring")
    sp_attention = partial(ulysses_attention if attention == "ulysses" else ring_attention, group=group)
    # Set by each DiT forward and kept until the next one: activation checkpointing recomputes
    # blocks during backward, after the forward has returned, and must shard the same way.
    state = {"sharded": False, "checked": False}

    def mine(table: torch.Tensor, n: int) -> torch.Tensor:
        return table.narrow(-2, rank * n, n)  # rows (tokens) rank*n ... rank*n + n-1

    def start(module, args, kwargs):
        state["sharded"] = module.training
        if module.training and not state["checked"]:
            inputs = dict(zip(("x", "t"), args[:2], strict=False)) | kwargs  # x, t given by position or name
            _check_same_inputs(inputs["x"], inputs["t"], group)
            state["checked"] = True

    def split_tokens(module, args, tokens):  # [B, N, D] -> [B, N/P, D]
        if not state["sharded"]:
            return tokens
        if tokens.shape[1] % P:
            raise ValueError(f"{tokens.shape[1]} tokens per clip do not split over strategy.sequence_parallel_size="
                             f"{P}: pick data.num_frames/data.size so the token count is a multiple of it")
        return mine(tokens, tokens.shape[1] // P)

    def split_rope(module, args):  # (x [B, N/P, D], rope ([N, hd], [N, hd]), ...) -> rope rows ([N/P, hd], ...)
        if not state["sharded"]:
            return None
        x, rope, *rest = args
        return (x, tuple(mine(table, x.shape[1]) for table in rope), *rest)

    def attend(q, k, v, mask=None, backend="sdpa"):
        if state["sharded"]:
            if mask is not None:  # forward_packed bypasses the token split; its PackedMask would be wrong here
                raise ValueError("sequence parallelism does not support packed sequences (DiT.forward_packed)")
            return sp_attention(q, k, v, backend=backend)  # [B, H, N/P, hd]
        return full_attention(q, k, v, mask=mask, backend=backend)

    def gather_tokens(module, args, out):  # [B, N/P, C_out*p] -> [B, N, C_out*p]
        return gather_sequence(out, group) if state["sharded"] else out

    dit.register_forward_pre_hook(start, with_kwargs=True)
    dit.x_embedder.register_forward_hook(split_tokens)
    for block in dit.blocks:
        block.attn.register_forward_pre_hook(split_rope)
        block.attn.attend = attend
    dit.final_layer.register_forward_hook(gather_tokens)
    return dit


def _check_same_inputs(x: torch.Tensor, t: torch.Tensor, group) -> None:
    """Raise if the ranks of a sequence-parallel group got different noisy latents or t."""
    import torch.distributed as dist

    summary = torch.stack([x.double().sum(), x.double().square().sum(), t.double().sum()]).detach()  # [3]
    mine = summary.clone()
    dist.all_reduce(summary, group=group)
    if not torch.allclose(summary, mine * dist.get_world_size(group), rtol=1e-6):
        raise RuntimeError("the ranks of one sequence-parallel group got different inputs: their data loader must "
                           "shard by data-parallel rank (dit_video.data.dataset.dist_info) and their noise/t RNG "
                           "must agree (dit_video.distributed.share_rng)")


def data_parallel_sampler_kwargs(global_rank: int, world_size: int, sequence_parallel_size: int) -> dict:
    """Which data shard a rank reads: its data-parallel coordinate in the (dp, sp) grid."""
    return {"num_replicas": world_size // sequence_parallel_size, "rank": global_rank // sequence_parallel_size}
