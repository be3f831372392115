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
        sums = torch.zeros(k, dtype=torch.float64)
        counts = torch.zeros(k, dtype=torch.float64)
        generator = torch.Generator(pl_module.device).manual_seed(c.seed)
        try:
            for i, batch in enumerate(loader):
                if i >= c.max_batches:
                    break
                if "latents" in batch:  # a latent cache (data=latents): the encoders already ran
                    latents, pooled = batch["latents"].float().to(pl_module.device), None  # [B, C, T', H', W']
                    text_emb, text_mask = batch["text_emb"].to(pl_module.device), batch["text_mask"].to(pl_module.device)
                else:
                    latents = pl_module.encode_clips(batch["clip"].to(pl_module.device))  # [B, C, T', H', W']
                    text_emb, text_mask, pooled = pl_module.encode_text_pooled(list(batch["caption"]))
                _, aux = pl_module.objective.loss(dit, latents, text_emb, text_mask, generator=generator, pooled=pooled)
                means, n = loss_by_t_bucket(aux["t"], aux["mse_per_sample"], k)
                sums += torch.nan_to_num(means.double().cpu()) * n.cpu()
                counts += n.double().cpu()
        finally:
            dit.train(was_training)
        if rank_and_world()[1] > 1:
            both = torch.stack([sums, counts])
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
