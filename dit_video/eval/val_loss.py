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
        c = self.cfg
        with pl_module.weights(c.weights) as dit:  # the EMA copy, or a LoRA run's DiT with its EMA adapters
            sums, counts = held_out_sums(pl_module, dit, loader, c)  # dit in eval mode for the duration
        if rank_and_world()[1] > 1:
            both = torch.stack([sums, counts])  # [2, K] on the module's device: NCCL refuses host tensors
            torch.distributed.all_reduce(both)
            sums, counts = both[0], both[1]
        metrics = loss_metrics(sums, counts)
        if metrics is not None:
            log_scalars(trainer, metrics)
        return metrics


def held_out_sums(pl_module, dit, loader, cfg: ValLossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """bucket_loss_sums over this rank's first `cfg.max_batches` held-out batches of a training
    run's LightningModule: clips through its frozen encoders, or a latent cache's batches as
    they are; float64 [K] sums and counts on the module's device (collectives need them there)."""
    device = pl_module.device

    def encode(batch):
        if "latents" in batch:  # a latent cache (data=latents): the encoders already ran
            return batch["latents"].float().to(device), batch["text_emb"].to(device), batch["text_mask"].to(device), None
        latents = pl_module.encode_clips(batch["clip"].to(device))  # [B, C, T', H', W']
        return (latents, *pl_module.encode_text_pooled(list(batch["caption"])))

    generator = torch.Generator(device).manual_seed(cfg.seed)
    dummy = (lambda: dummy_inputs(pl_module, dit)) if rank_and_world()[1] > 1 else None
    return bucket_loss_sums(dit, pl_module.objective, loader, encode, cfg.num_buckets, cfg.max_batches, generator,
                            device=device, dummy=dummy)


@torch.no_grad()
def bucket_loss_sums(dit, objective, batches, encode, num_buckets: int, max_batches: int,
                     generator: torch.Generator, device: torch.device | str = "cpu",
                     dummy=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out loss of `dit` summed per t bucket over the first `max_batches` of `batches`:
    (sums float64 [K], counts float64 [K]) on `device`. encode(batch) -> (latents [B, C, T', H', W'],
    text_emb [B, L, D], text_mask [B, L], pooled [B, P] or None). t and noise come from `generator`
    only, so a generator seeded alike gives every set of weights the same t and noise (FastVideo #609).

    With `dummy` (() -> the same four inputs), every rank of the default process group runs the same
    number of forwards: under FSDP2 (or ZeRO-3 raw weights) a forward of the sharded DiT is a
    collective, so a rank out of batches while another still has one runs a dummy batch whose
    result is dropped (one tiny all-reduce per batch agrees on it)."""
    sums = torch.zeros(num_buckets, dtype=torch.float64, device=device)
    counts = torch.zeros(num_buckets, dtype=torch.float64, device=device)
    was_training = dit.training
    dit.eval()
    try:
        batches = iter(batches)
        for _ in range(max_batches):
            batch = next(batches, None)
            if dummy is not None:
                more = torch.tensor([batch is not None], dtype=torch.int32, device=device)
                torch.distributed.all_reduce(more, op=torch.distributed.ReduceOp.MAX)
                if not bool(more):
                    break
            elif batch is None:
                break
            if batch is None:  # another rank still has a batch: the same forward, result dropped
                latents, text_emb, text_mask, pooled = dummy()
                objective.loss(dit, latents, text_emb, text_mask, generator=torch.Generator(device), pooled=pooled)
                continue
            latents, text_emb, text_mask, pooled = encode(batch)
            _, aux = objective.loss(dit, latents, text_emb, text_mask, generator=generator, pooled=pooled)
            means, n = loss_by_t_bucket(aux["t"], aux["mse_per_sample"], num_buckets)  # [K], [K]
            sums += torch.nan_to_num(means.double()).to(device) * n.to(device)
            counts += n.double().to(device)
    finally:
        dit.train(was_training)
    return sums, counts


def loss_metrics(sums: torch.Tensor, counts: torch.Tensor) -> dict[str, float] | None:
    """{"val/loss", "val/loss_t0-0.1", ...} from bucket_loss_sums (None when no sample was scored);
    empty buckets are left out."""
    if counts.sum() == 0:
        return None
    metrics = {"val/loss": float(sums.sum() / counts.sum())}
    for name, s, n in zip(t_bucket_names(len(sums), prefix="val/loss_t"), sums.tolist(), counts.tolist(), strict=True):
        if n > 0:
            metrics[name] = s / n
    return metrics


def dummy_inputs(pl_module, dit) -> tuple:
    """(latents [1, C, T', H', W'], text_emb [1, 1, Dt], text_mask [1, 1], pooled [1, P] or None) of
    zeros at the run's latent shape (meta["latent_shape"]): a forward for a rank without a batch."""
    cfg, device = dit.cfg, pl_module.device
    latents = torch.zeros(1, cfg.in_channels, *pl_module.meta["latent_shape"], device=device)
    text_emb = torch.zeros(1, 1, cfg.text_dim, device=device)
    text_mask = torch.ones(1, 1, dtype=torch.bool, device=device)
    pooled = torch.zeros(1, cfg.pooled_text_dim, device=device) if cfg.pooled_text_dim else None
    return latents, text_emb, text_mask, pooled
