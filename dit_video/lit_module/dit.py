"""Stage 2: the DiT's LightningModule. `training_step` reads as the pipeline: latents, caption
dropout, text tokens, then the objective's noise-predict-MSE."""

from __future__ import annotations

import contextlib

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy

from dit_video.diffusion import loss_by_t_bucket, t_bucket_names
from dit_video.distributed import share_rng
from dit_video.encoders.base import clip_to_video
from dit_video.encoders.text_cache import TextEmbeddingCache
from dit_video.lit_module.ema import (
    EMA_PREFIX,
    AdapterEMA,
    EMAWeights,
    ema_decay_at,
    ema_from_client_state,
    ema_to_client_state,
)
from dit_video.lit_module.frozen import FrozenEncoders, FrozenEncodersMixin
from dit_video.lit_module.optim import OptimConfig, build_optimizer
from dit_video.parallel import parallelize_dit_module

T_BUCKETS = 10  # the loss-vs-t curve is logged in this many equal buckets of t


class DiTModule(FrozenEncodersMixin, L.LightningModule):
    """Text-to-video DiT training: clip -> latents -> noised -> DiT -> velocity loss."""

    def __init__(self, dit, objective, vae, text_encoder, optim: OptimConfig, ema_decay: float, meta: dict,
                 parallel=None, text_encoder_cache: int = 0, lora=None):
        super().__init__()
        self.dit = dit
        # dit_video.lora.LoRAConfig when `dit` carries peft adapters on frozen weights (apply_lora), else None.
        # Then only the adapters are checkpointed (the frozen weights are init_from's) and the EMA holds
        # only them (lit_module/ema.py, AdapterEMA).
        self.lora = lora
        self.parallel = parallel  # dit_video.parallel.ParallelConfig applied in configure_model (None = as built)
        self.sequence_group = None  # this rank's sequence-parallel process group, set in configure_model
        # LRU of caption embeddings (0 = off): valid because the text encoder is frozen and in eval.
        self.text_cache = TextEmbeddingCache(text_encoder_cache) if text_encoder_cache > 0 else None
        # fp32 and outside the module tree (lit_module/ema.py): no strategy casts or partitions it;
        # state_dict()/load_state_dict() still carry it as `ema.*`.
        self.ema_weights = AdapterEMA(dit) if lora is not None else EMAWeights(dit)
        self.register_state_dict_post_hook(_ema_into_state_dict)
        self.register_load_state_dict_pre_hook(_ema_from_state_dict)
        if lora is not None:
            self.register_state_dict_post_hook(_frozen_out_of_state_dict)
            self.register_load_state_dict_post_hook(_frozen_not_missing)
        # Outside the module tree (FrozenEncodersMixin): not optimised, sharded or checkpointed.
        self.frozen_encoders = FrozenEncoders(vae.requires_grad_(False).eval(), text_encoder.requires_grad_(False).eval())
        self.objective, self.optim_cfg, self.ema_decay = objective, optim, ema_decay
        self.meta = meta  # JSON-able: configs and encoder identities, written into every checkpoint
        self.skipped_total = 0
        self.skipped_by_reason: dict[str, int] = {}  # cumulative, logged as data/skipped_<reason>
        self.t_bucket_sum = torch.zeros(T_BUCKETS, dtype=torch.float64)  # per-bucket loss accumulators
        self.t_bucket_count = torch.zeros(T_BUCKETS, dtype=torch.long)

    @property
    def ema(self):
        """The EMA copy of the DiT (fp32; sharded like the DiT under FSDP2). A LoRA run keeps no copy, only
        its EMA adapters, here as nested attributes (no module: run it with `weights("ema")`)."""
        return self.ema_weights.tree if self.lora is not None else self.ema_weights.module

    @contextlib.contextmanager
    def weights(self, kind: str):
        """The DiT to run with `kind` weights: "raw" (the trained DiT) or "ema" (the EMA copy; a LoRA
        run's trained DiT with its EMA adapters swapped in for the duration)."""
        if kind == "raw":
            yield self.dit
        else:
            with self.ema_weights.applied(self.dit) as dit:
                yield dit

    def frozen_names(self) -> set[str]:
        """`dit.*` state-dict keys a LoRA run does not checkpoint (the frozen init_from weights)."""
        if self.lora is None:
            return set()
        return {f"dit.{n}" for n, p in self.dit.named_parameters() if not p.requires_grad}

    def train(self, mode: bool = True):
        super().train(mode)
        for frozen in (self.vae, self.text_encoder):
            frozen.eval()  # Lightning calls .train() on the whole module; frozen parts stay in eval
        return self

    def _apply(self, fn, recurse: bool = True):
        # The EMA follows device moves of the module, never dtype casts (DeepSpeed's .bfloat16()).
        if recurse and "ema_weights" in self.__dict__:
            self.ema_weights.follow_device(fn)
        return super()._apply(fn, recurse)

    def _ema_in_client_state(self) -> bool:
        """DeepSpeed saves the module state itself (the EMA goes into its client state instead)."""
        return self._trainer is not None and isinstance(self._trainer.strategy, DeepSpeedStrategy)

    @torch.no_grad()
    def encode_clips(self, clip: torch.Tensor) -> torch.Tensor:
        """uint8 [B, T, H, W, 3] -> latents [B, C, T', H', W'] (frozen VAE)."""
        return self.vae.encode(clip_to_video(clip)).float()

    @torch.no_grad()
    def encode_clip_list(self, clips: list[torch.Tensor]) -> list[torch.Tensor]:
        """Clips uint8 [T, H, W, 3] of mixed shapes -> latents [C, T', H', W'] in the same order;
        one VAE call per distinct shape (a packed batch holds a few buckets), not per clip."""
        latents: list[torch.Tensor | None] = [None] * len(clips)
        by_shape: dict[tuple, list[int]] = {}
        for i, clip in enumerate(clips):
            by_shape.setdefault(tuple(clip.shape), []).append(i)
        for idx in by_shape.values():
            encoded = self.encode_clips(torch.stack([clips[i] for i in idx]))  # [n, C, T', H', W']
            for i, z in zip(idx, encoded, strict=True):
                latents[i] = z
        return latents

    @torch.no_grad()
    def encode_text(self, captions: list[str]):
        if self.text_cache is not None:
            text_emb, text_mask = self.text_cache.encode(self.text_encoder, captions)  # [B, L, D], [B, L]
        else:
            text_emb, text_mask = self.text_encoder.encode(captions)
        return text_emb.to(self.device), text_mask.to(self.device)

    @torch.no_grad()
    def encode_text_pooled(self, captions: list[str]):
        """(text_emb [B, L, D], text_mask [B, L], pooled [B, P] or None): the text encoder's pooled
        vector only when the DiT takes one (model.pooled_text_dim > 0; not through the text cache)."""
        if not self.dit.cfg.pooled_text_dim:
            return (*self.encode_text(captions), None)
        text_emb, text_mask, pooled = self.text_encoder.encode_pooled(captions)
        return text_emb.to(self.device), text_mask.to(self.device), pooled.to(self.device)

    def drop_captions(self, captions: list[str]) -> list[str]:
        """Replace each caption by "" with probability objective.caption_dropout (CFG training)."""
        keep = torch.rand(len(captions)) >= self.objective.cfg.caption_dropout
        return [c if k else "" for c, k in zip(captions, keep.tolist(), strict=True)]

    def drop_cached_text(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Caption dropout on a latent-cache batch: dropped rows take the cached embedding of ""
        (`null_text_emb` [L0, D], encoded by the same text encoder when the cache was built). The
        same torch.rand(B) draw as drop_captions, so a seed drops the same rows on both paths."""
        keep = torch.rand(len(batch["caption"])) >= self.objective.cfg.caption_dropout  # [B]
        text_emb, text_mask = batch["text_emb"], batch["text_mask"]  # [B, L, D], [B, L]
        if keep.all():
            return text_emb, text_mask
        null_emb, null_mask = batch["null_text_emb"], batch["null_text_mask"]  # [L0, D], [L0]
        length = max(text_emb.shape[1], null_emb.shape[0])
        text_emb = torch.nn.functional.pad(text_emb, (0, 0, 0, length - text_emb.shape[1]))  # [B, L, D]
        text_mask = torch.nn.functional.pad(text_mask, (0, length - text_mask.shape[1]))  # [B, L]
        null_emb = torch.nn.functional.pad(null_emb, (0, 0, 0, length - null_emb.shape[0]))  # [L, D]
        null_mask = torch.nn.functional.pad(null_mask, (0, length - null_mask.shape[0]))  # [L]
        keep = keep.to(text_emb.device)
        text_emb = torch.where(keep[:, None, None], text_emb, null_emb[None])  # [B, L, D]
        text_mask = torch.where(keep[:, None], text_mask, null_mask[None])  # [B, L]
        used = int(text_mask.sum(1).max())  # trim padding no row needs any more, as on-the-fly padding would
        return text_emb[:, :used], text_mask[:, :used]

    def model_inputs(self, batch):
        """(latents [B, C, T', H', W'], text_emb [B, L, D], text_mask [B, L], pooled [B, P] or None) of a
        clip batch, or of a latent-cache batch (`data=latents`: the encoders ran in data_prep.encode_latents)."""
        if "latents" in batch:
            if self.dit.cfg.pooled_text_dim:
                raise ValueError(
                    "data=latents does not store pooled text vectors yet; train a model.pooled_text_dim > 0 "
                    "DiT from clips (data=demo/webvid_*) or set model.pooled_text_dim=0"
                )
            return (batch["latents"].float(), *self.drop_cached_text(batch), None)  # 1-3. precomputed
        if isinstance(batch["clip"], list):  # data.packing: clips of different shapes -> B x [C, T', H', W']
            latents = self.encode_clip_list(batch["clip"])
        else:
            latents = self.encode_clips(batch["clip"])  # 1. pixels -> latents   [B, C, T', H', W']
        captions = self.drop_captions(batch["caption"])  # 2. caption dropout for CFG
        text_emb, text_mask, pooled = self.encode_text_pooled(captions)  # 3. text -> tokens [B, L, D] (+ [B, P])
        return latents, text_emb, text_mask, pooled

    def training_step(self, batch, batch_idx):
        latents, text_emb, text_mask, pooled = self.model_inputs(batch)  # 1-3. latents, dropout, text tokens
        if isinstance(latents, list):  # a packed batch (data.packing): one DiT.forward_packed call
            loss, aux = self.objective.loss_packed(self.dit, latents, text_emb, text_mask, pooled=pooled)
        else:
            loss, aux = self.objective.loss(self.dit, latents, text_emb, text_mask, pooled=pooled)  # 4. noise, predict, MSE
        self.log_step(loss, aux, batch)
        return loss

    def log_step(self, loss, aux, batch) -> None:
        bs = len(batch["caption"])
        self.skipped_total += int(batch.get("skipped", 0))
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        if aux.get("cond_mask") is not None:  # objective.cond_*: share of latent frames given (no loss on them)
            self.log("train/cond_frames", aux["cond_mask"].float().mean(), batch_size=bs)
        self.log("data/skipped", float(self.skipped_total), batch_size=bs)
        for reason, n in batch.get("skipped_by_reason", {}).items():  # decode_error, too_short, ... (data/dataset.py)
            self.skipped_by_reason[reason] = self.skipped_by_reason.get(reason, 0) + int(n)
        for reason, n in self.skipped_by_reason.items():
            self.log(f"data/skipped_{reason}", float(n), batch_size=bs)
        # Loss against diffusion time, pooled over each logging interval (one batch spread over
        # ten buckets is too noisy to read): shows where in t training is hard.
        means, counts = loss_by_t_bucket(aux["t"], aux["mse_per_sample"], T_BUCKETS)
        self.t_bucket_sum += torch.nan_to_num(means.double().cpu()) * counts.cpu()
        self.t_bucket_count += counts.cpu()
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
            pooled = self.t_bucket_sum / self.t_bucket_count.clamp(min=1)
            for name, mean, count in zip(t_bucket_names(T_BUCKETS), pooled.tolist(), self.t_bucket_count.tolist(), strict=True):
                if count > 0:
                    self.log(name, mean, on_step=True, on_epoch=False)
            self.t_bucket_sum.zero_()
            self.t_bucket_count.zero_()

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # Right after the weights move (not in on_train_batch_end, which runs after the checkpoint
        # callbacks): a checkpoint saved at this step then holds this step's EMA too.
        self.ema_weights.update(self.dit, ema_decay_at(self.global_step + 1, self.ema_decay))

    def configure_model(self) -> None:
        """Activation checkpointing / compile / FSDP2 from dit_video/parallel.py (called by Lightning
        once per process; under ModelParallelStrategy with its device mesh)."""
        if self.parallel is not None:
            mesh = self.device_mesh if self.parallel.fsdp else None
            self.sequence_group = parallelize_dit_module(self, self.parallel, mesh)

    def on_train_batch_start(self, batch, batch_idx) -> None:
        # Sequence parallelism: the ranks sharing one sequence must draw the same noise, t and
        # caption dropout (runs after RNGState, which gives every rank its own stream).
        if self.sequence_group is not None:
            share_rng(self.sequence_group)

    def configure_optimizers(self):
        return build_optimizer(self.dit, self.optim_cfg)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["dit_video"] = self.meta
        if self._ema_in_client_state():
            ema_to_client_state(self.ema, checkpoint, self.trainer.is_global_zero)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self._ema_in_client_state():
            ema_from_client_state(self.ema, checkpoint)  # collective: rank 0's EMA to every rank
        super().on_load_checkpoint(checkpoint)


def _ema_into_state_dict(module: DiTModule, state_dict, prefix, local_metadata) -> None:
    """state_dict() post-hook: the EMA (outside the module tree) under `ema.*`, as when it was a submodule."""
    if not module._ema_in_client_state():
        module.ema_weights.state_dict_into(state_dict, prefix + EMA_PREFIX)


def _ema_from_state_dict(module: DiTModule, state_dict, prefix, local_metadata, strict, missing_keys,
                         unexpected_keys, error_msgs) -> None:
    """load_state_dict() pre-hook: `ema.*` into the EMA. Missing or unexpected keys are reported, not
    raised: load_state_dict(strict=...) decides (hooks are always called with strict=True)."""
    start = prefix + EMA_PREFIX
    keys = [k for k in state_dict if k.startswith(start)]
    if keys or not module._ema_in_client_state():
        missing, unexpected = module.ema_weights.load_state_dict({k[len(start):]: state_dict.pop(k) for k in keys})
        missing_keys.extend(start + k for k in missing)
        unexpected_keys.extend(start + k for k in unexpected)


def _frozen_out_of_state_dict(module: DiTModule, state_dict, prefix, local_metadata) -> None:
    """state_dict() post-hook of a LoRA run: drop the frozen weights (they are init_from's, unchanged)."""
    for key in module.frozen_names():
        state_dict.pop(prefix + key, None)


def _frozen_not_missing(module: DiTModule, incompatible_keys) -> None:
    """load_state_dict() post-hook of a LoRA run: the frozen weights are not in its checkpoints by design."""
    frozen = module.frozen_names()
    kept = [k for k in incompatible_keys.missing_keys if k not in frozen]
    incompatible_keys.missing_keys[:] = kept
