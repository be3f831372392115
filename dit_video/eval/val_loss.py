"""Held-out loss during training: fixed t and noise, so successive evaluations differ only by the weights."""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import torch

from dit_video.callbacks import log_scalars
from dit_video.diffusion import loss_by_t_bucket, t_bucket_names
from dit_video.distributed import rank_and_world


@dataclass
class ValLossConfig:
    every_n_steps: int = 0  # 0 = off
    max_batches: int = 4  # held-out batches per evaluation (per rank)
    num_buckets: int = 10  # t buckets of val/loss_t*
    seed: int = 0  # fixes t and noise: successive evaluations differ only by the weights
    weights: str = "ema"  # ema | raw


class ValidationLoss(L.Callback):
    """Every `every_n_steps`: held-out loss with fixed t and noise, overall and per t bucket."""

    def __init__(self, cfg: ValLossConfig):
        self.cfg = cfg

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step > 0 and step % self.cfg.every_n_steps == 0:
            self.evaluate(trainer, pl_module)

    @torch.no_grad()
    def evaluate(self, trainer, pl_module) -> dict[str, float] | None:
        loader = trainer.datamodule.val_dataloader() if trainer.datamodule is not None else []
        c, k = self.cfg, self.cfg.num_buckets
        dit = pl_module.ema if c.weights == "ema" else pl_module.dit
        was_training = dit.training
        dit.eval()
        try:
            sums, counts = held_out_sums(pl_module, dit, loader, c)
        finally:
            dit.train(was_training)
        if rank_and_world()[1] > 1:
            both = torch.stack([sums, counts])  # [2, K] on the module's device: NCCL refuses host tensors
            torch.distributed.all_reduce(both)
            sums, counts = both[0], both[1]
        if counts.sum() == 0:
            return None
        metrics = {"val/loss": float(sums.sum() / counts.sum())}
        for name, s, n in zip(t_bucket_names(k, prefix="val/loss_t"), sums.tolist(), counts.tolist(), strict=True):
            if n > 0:
                metrics[name] = s / n
        log_scalars(trainer, metrics)
        return metrics


def held_out_sums(pl_module, dit, loader, cfg: ValLossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss sum [K], sample count [K]) per t bucket over this rank's first `cfg.max_batches`
    batches, float64 on the module's device.

    Every rank runs the same number of forwards: under FSDP2 (or ZeRO-3 raw weights) a forward
    of the sharded DiT is a collective, so a rank out of batches while another still has one runs
    a dummy batch whose result is dropped (one tiny all-reduce per batch agrees on it)."""
    k, device = cfg.num_buckets, pl_module.device
    sums = torch.zeros(k, dtype=torch.float64, device=device)
    counts = torch.zeros(k, dtype=torch.float64, device=device)
    generator = torch.Generator(device).manual_seed(cfg.seed)
    world = rank_and_world()[1]
    batches = iter(loader)
    for _ in range(cfg.max_batches):
        batch = next(batches, None)
        if world > 1:
            more = torch.tensor([batch is not None], dtype=torch.int32, device=device)
            torch.distributed.all_reduce(more, op=torch.distributed.ReduceOp.MAX)
            if not bool(more):
                break
        elif batch is None:
            break
        if batch is None:  # another rank still has a batch: the same forward, result dropped
            latents, text_emb, text_mask, pooled = dummy_inputs(pl_module, dit)
            pl_module.objective.loss(dit, latents, text_emb, text_mask, generator=torch.Generator(device), pooled=pooled)
            continue
        latents = pl_module.encode_clips(batch["clip"].to(device))  # [B, C, T', H', W']
        text_emb, text_mask, pooled = pl_module.encode_text_pooled(list(batch["caption"]))
        _, aux = pl_module.objective.loss(dit, latents, text_emb, text_mask, generator=generator, pooled=pooled)
        means, n = loss_by_t_bucket(aux["t"], aux["mse_per_sample"], k)  # [K], [K] on the device
        sums += torch.nan_to_num(means.double()) * n
        counts += n.double()
    return sums, counts


def dummy_inputs(pl_module, dit) -> tuple:
    """(latents [1, C, T', H', W'], text_emb [1, 1, Dt], text_mask [1, 1], pooled [1, P] or None) of
    zeros at the run's latent shape (meta["latent_shape"]): a forward for a rank without a batch."""
    cfg, device = dit.cfg, pl_module.device
    latents = torch.zeros(1, cfg.in_channels, *pl_module.meta["latent_shape"], device=device)
    text_emb = torch.zeros(1, 1, cfg.text_dim, device=device)
    text_mask = torch.ones(1, 1, dtype=torch.bool, device=device)
    pooled = torch.zeros(1, cfg.pooled_text_dim, device=device) if cfg.pooled_text_dim else None
    return latents, text_emb, text_mask, pooled
