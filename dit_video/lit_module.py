"""Thin LightningModules: the pipeline in `training_step`, everything else injected.

Model code (dit_video/model, dit_video/encoders) knows nothing about Lightning, devices or
distribution; the objective (dit_video/diffusion) owns the noise. What remains here is the
wiring: frozen encoders in, loss out, EMA, optimiser and what goes into a checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import lightning as L
import torch
from torch import nn

from dit_video.diffusion import loss_by_t_bucket, t_bucket_names
from dit_video.encoders.base import clip_to_video
from dit_video.encoders.text_cache import TextEmbeddingCache

T_BUCKETS = 10  # the loss-vs-t curve is logged in this many equal buckets of t


@dataclass
class OptimConfig:
    lr: float = 1e-4  # peak AdamW learning rate
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas; 0.95 for beta2 is common at scale
    weight_decay: float = 0.0  # decoupled weight decay, applied to matrices only (not norms/biases)
    warmup_steps: int = 100  # linear warmup from 0 to lr, then constant
    eps: float = 1e-8  # AdamW epsilon

    def validate(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr={self.lr} must be > 0")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps={self.warmup_steps} must be >= 0")


def build_optimizer(module: nn.Module, cfg: OptimConfig):
    """AdamW (decay on >= 2-D weights only) with linear warmup, as Lightning's optimizer dict."""
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    warmup = max(1, cfg.warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, over all parameters in one fused call."""
    ema_params = list(ema.parameters())
    params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


def ema_decay_at(step: int, decay: float) -> float:
    """Warm the EMA up so short runs are not dominated by the random init (decay -> cfg value)."""
    return min(decay, (1.0 + step) / (10.0 + step))


@dataclass
class FrozenEncoders:
    """The frozen VAE and text encoder, held in a plain object (not an nn.Module) so they stay out
    of the LightningModule's module tree."""

    vae: nn.Module
    text_encoder: nn.Module

    def __iter__(self):
        return iter((self.vae, self.text_encoder))


class FrozenEncodersMixin:
    """Frozen encoders ride along with the LightningModule without being part of its module tree.

    Outside the tree, `parameters()` and `state_dict()` never hold them, so no strategy can
    optimise, shard or checkpoint them: DDP does not broadcast them, FSDP2 and DeepSpeed ZeRO-3
    do not partition them (ZeRO-3 has no per-module exclusion, deepspeedai/DeepSpeed#7271, and would
    otherwise all-gather them at every encode), and checkpoints record only their identity (meta).
    They follow every `.to()`/`.cuda()`/`.double()` of the module (`_apply`), and each
    fit/validate/test/predict moves them to the strategy's device as well, for strategies that
    place the model without `.to()` (a ZeRO-3 model built under `deepspeed.zero.Init`).
    """

    FROZEN = ("vae", "text_encoder")
    frozen_encoders: FrozenEncoders  # set by the subclass's __init__

    @property
    def vae(self) -> nn.Module:
        return self.frozen_encoders.vae

    @vae.setter
    def vae(self, value: nn.Module) -> None:
        self.frozen_encoders.vae = value.requires_grad_(False).eval()

    @property
    def text_encoder(self) -> nn.Module:
        return self.frozen_encoders.text_encoder

    @text_encoder.setter
    def text_encoder(self, value: nn.Module) -> None:
        self.frozen_encoders.text_encoder = value.requires_grad_(False).eval()

    def __setattr__(self, name: str, value) -> None:
        if name in FrozenEncodersMixin.FROZEN:  # the property, not nn.Module's submodule registration
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def _apply(self, fn, recurse: bool = True):
        # Every device/dtype conversion of nn.Module (.to, .cuda, .half, ...) ends here.
        # recurse=False (Lightning's meta-tensor materialisation) concerns this module's own tensors only.
        if recurse and "frozen_encoders" in self.__dict__:
            for encoder in self.frozen_encoders:
                encoder._apply(fn)
        return super()._apply(fn, recurse)

    def frozen_encoders_to_strategy_device(self) -> None:
        for encoder in self.frozen_encoders:
            encoder.to(self.trainer.strategy.root_device)

    def on_fit_start(self) -> None:
        self.frozen_encoders_to_strategy_device()

    def on_validation_start(self) -> None:
        self.frozen_encoders_to_strategy_device()

    def on_test_start(self) -> None:
        self.frozen_encoders_to_strategy_device()

    def on_predict_start(self) -> None:
        self.frozen_encoders_to_strategy_device()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # A state dict saved when the encoders were still submodules (a bare module.state_dict()):
        # their weights come from vae.path / text_encoder, never from a checkpoint.
        if "state_dict" not in checkpoint:  # a sharded (DCP) checkpoint: the strategy restored the model itself
            return
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.split(".", 1)[0] in self.FROZEN]:
            del state[key]


class DiTModule(FrozenEncodersMixin, L.LightningModule):
    """Text-to-video DiT training: clip -> latents -> noised -> DiT -> velocity loss."""

    def __init__(self, dit, objective, vae, text_encoder, optim: OptimConfig, ema_decay: float, meta: dict,
                 parallel=None, text_encoder_cache: int = 0):
        super().__init__()
        self.dit = dit
        self.parallel = parallel  # dit_video.parallel.ParallelConfig applied in configure_model (None = as built)
        self.sequence_group = None  # this rank's sequence-parallel process group, set in configure_model
        # LRU of caption embeddings (0 = off): valid because the text encoder is frozen and in eval.
        self.text_cache = TextEmbeddingCache(text_encoder_cache) if text_encoder_cache > 0 else None
        self.ema = copy.deepcopy(dit).requires_grad_(False).eval()
        # Outside the module tree (FrozenEncodersMixin): not optimised, sharded or checkpointed.
        self.frozen_encoders = FrozenEncoders(vae.requires_grad_(False).eval(), text_encoder.requires_grad_(False).eval())
        self.objective, self.optim_cfg, self.ema_decay = objective, optim, ema_decay
        self.meta = meta  # JSON-able: configs and encoder identities, written into every checkpoint
        self.skipped_total = 0
        self.skipped_by_reason: dict[str, int] = {}  # cumulative, logged as data/skipped_<reason>
        self.t_bucket_sum = torch.zeros(T_BUCKETS, dtype=torch.float64)  # per-bucket loss accumulators
        self.t_bucket_count = torch.zeros(T_BUCKETS, dtype=torch.long)

    def train(self, mode: bool = True):
        super().train(mode)
        for frozen in (self.ema, self.vae, self.text_encoder):
            frozen.eval()  # Lightning calls .train() on the whole module; frozen parts stay in eval
        return self

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
        ema_update(self.ema, self.dit, ema_decay_at(self.global_step + 1, self.ema_decay))

    def configure_model(self) -> None:
        """Activation checkpointing / compile / FSDP2 from dit_video/parallel.py (called by Lightning
        once per process; under ModelParallelStrategy with its device mesh)."""
        if self.parallel is not None:
            from dit_video.parallel import parallelize_dit_module

            mesh = self.device_mesh if self.parallel.fsdp else None
            self.sequence_group = parallelize_dit_module(self, self.parallel, mesh)

    def on_train_batch_start(self, batch, batch_idx) -> None:
        # Sequence parallelism: the ranks sharing one sequence must draw the same noise, t and
        # caption dropout (runs after RNGState, which gives every rank its own stream).
        if self.sequence_group is not None:
            from dit_video.distributed import share_rng

            share_rng(self.sequence_group)

    def configure_optimizers(self):
        return build_optimizer(self.dit, self.optim_cfg)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["dit_video"] = self.meta


class VAEModule(L.LightningModule):
    """Stage 1: train our causal video VAE on clips (reconstruction + KL, optionally LPIPS and a
    3D patch discriminator; `objective` is a dit_video.encoders.causal_vae.VAELoss).

    Without a discriminator: Lightning's automatic optimisation, one AdamW. With one: two AdamWs
    (VAE, discriminator) stepped in `training_step` (manual optimisation), so gradient clipping
    (`gradient_clip_val`) and the warmup schedulers are applied here. Validation reports
    val/rec_loss, val/psnr and val/ssim of the posterior-mean reconstruction.
    """

    FROZEN = ("objective.lpips.",)  # loaded from its own file: not training state, not in checkpoints

    def __init__(self, vae, objective, optim: OptimConfig, meta: dict, gradient_clip_val: float | None = None):
        super().__init__()
        self.vae, self.objective, self.optim_cfg, self.meta = vae, objective, optim, meta
        self.skipped_total = 0
        self.adversarial = objective.discriminator is not None
        self.automatic_optimization = not self.adversarial
        self.gradient_clip_val = gradient_clip_val  # manual path only (Lightning clips in the automatic one)
        self._rng_before_val: torch.Tensor | None = None  # CPU RNG state, restored after validation

    def training_step(self, batch, batch_idx):
        video = clip_to_video(batch["clip"])  # [B, 3, T, H, W] in [-1, 1]
        if self.adversarial:
            loss, logs = self.adversarial_step(video)
        else:
            loss, logs, _ = self.objective(self.vae, video, self.global_step)
        self.skipped_total += int(batch.get("skipped", 0))
        bs = video.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for name, value in logs.items():
            self.log(f"train/{name}", value, prog_bar=name == "psnr", batch_size=bs)
        self.log("data/skipped", float(self.skipped_total), batch_size=bs)
        return loss

    def adversarial_step(self, video: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """One VAE step and (from disc_start on) one discriminator step on the same reconstruction."""
        opt_vae, opt_disc = self.optimizers()
        sched_vae, sched_disc = self.lr_schedulers()
        step = self.global_step  # VAE steps only: the discriminator's are not counted (below)
        # 1. VAE loss and gradients; toggling freezes the discriminator so none reach it
        self.toggle_optimizer(opt_vae)
        loss, logs, video_hat = self.objective(self.vae, video, step)
        opt_vae.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        self.untoggle_optimizer(opt_vae)
        # 2. discriminator on real clips vs the detached reconstruction
        if step >= self.objective.cfg.disc_start:
            self.toggle_optimizer(opt_disc)
            d_loss, d_logs = self.objective.discriminator_loss(video, video_hat.detach())
            opt_disc.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            self._clip(opt_disc)
            # Through the strategy, not opt_disc.step(): Lightning counts every LightningOptimizer
            # step as a global step, which would double max_steps, checkpoint_every and warmup.
            self.trainer.strategy.optimizer_step(opt_disc.optimizer, lambda: None, self)
            sched_disc.step()  # the discriminator's warmup starts at disc_start
            self.untoggle_optimizer(opt_disc)
            logs |= d_logs
        # 3. the VAE step last, so the NonFiniteGuard verdict for this step is the VAE's
        self._clip(opt_vae)
        opt_vae.step()
        sched_vae.step()
        return loss, logs

    def _clip(self, optimizer) -> None:
        if self.gradient_clip_val:
            self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # Validation must not move the training RNG, or a run resumed from a checkpoint (which
        # skips the validation that followed it) draws other posterior noise. Lightning builds the
        # validation iterator (one draw from the CPU RNG) before any validation hook: save it here.
        self._rng_before_val = torch.get_rng_state()

    def on_validation_end(self) -> None:
        if self._rng_before_val is not None:
            torch.set_rng_state(self._rng_before_val)  # validation itself draws nothing (posterior mean)

    @torch.no_grad()
    def validation_step(self, batch, batch_idx):
        from dit_video.eval.image_metrics import psnr, ssim

        video = clip_to_video(batch["clip"]).float()  # [B, 3, T, H, W] in [-1, 1]
        video_hat = self.vae.decode(self.vae.encode(video).mean).float()  # posterior mean: deterministic
        diff = video_hat - video
        rec_loss = diff.abs().mean() if self.objective.cfg.recon == "l1" else diff.pow(2).mean()
        recon = video_hat.clamp(-1, 1)
        bs = video.shape[0]
        self.log("val/rec_loss", rec_loss, batch_size=bs)
        self.log("val/psnr", psnr(recon, video).mean(), prog_bar=True, batch_size=bs)
        self.log("val/ssim", ssim((recon + 1) / 2, (video + 1) / 2).mean(), batch_size=bs)  # on [0, 1] images

    def configure_optimizers(self):
        vae_opt = build_optimizer(self.vae, self.optim_cfg)
        if not self.adversarial:
            return vae_opt
        lr = self.objective.cfg.disc_lr or self.optim_cfg.lr
        disc_opt = build_optimizer(self.objective.discriminator, dataclasses.replace(self.optim_cfg, lr=lr))
        return [vae_opt, disc_opt]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(self.FROZEN)]:
            del state[key]
        checkpoint["dit_video"] = self.meta

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        for key, value in self.state_dict().items():
            if key.startswith(self.FROZEN):
                checkpoint["state_dict"][key] = value
