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
        dit = pl_module.ema if c.weights == "ema" else pl_module.dit

        def encode(batch):
            if "latents" in batch:  # a latent cache (data=latents): the encoders already ran
                latents = batch["latents"].float().to(pl_module.device)  # [B, C, T', H', W']
                return latents, batch["text_emb"].to(pl_module.device), batch["text_mask"].to(pl_module.device), None
            latents = pl_module.encode_clips(batch["clip"].to(pl_module.device))  # [B, C, T', H', W']
            return (latents, *pl_module.encode_text_pooled(list(batch["caption"])))

        generator = torch.Generator(pl_module.device).manual_seed(c.seed)
        sums, counts = bucket_loss_sums(dit, pl_module.objective, loader, encode, c.num_buckets, c.max_batches, generator)
        if rank_and_world()[1] > 1:
            both = torch.stack([sums, counts])
            torch.distributed.all_reduce(both)
            sums, counts = both[0], both[1]
        metrics = loss_metrics(sums, counts)
        if metrics is not None:
            log_scalars(trainer, metrics)
        return metrics


@torch.no_grad()
def bucket_loss_sums(dit, objective, batches, encode, num_buckets: int, max_batches: int,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out loss of `dit` summed per t bucket over the first `max_batches` of `batches`:
    (sums float64 [K], counts float64 [K]). encode(batch) -> (latents [B, C, T', H', W'], text_emb
    [B, L, D], text_mask [B, L], pooled [B, P] or None). t and noise come from `generator` only, so
    a generator seeded alike gives every set of weights the same t and noise (FastVideo #609)."""
    sums = torch.zeros(num_buckets, dtype=torch.float64)
    counts = torch.zeros(num_buckets, dtype=torch.float64)
    was_training = dit.training
    dit.eval()
    try:
        for i, batch in enumerate(batches):
            if i >= max_batches:
                break
            latents, text_emb, text_mask, pooled = encode(batch)
            _, aux = objective.loss(dit, latents, text_emb, text_mask, generator=generator, pooled=pooled)
            means, n = loss_by_t_bucket(aux["t"], aux["mse_per_sample"], num_buckets)
            sums += torch.nan_to_num(means.double().cpu()) * n.cpu()
            counts += n.double().cpu()
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
