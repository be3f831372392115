"""The held-out loss of a checkpoint, per t bucket, on the run's own validation data.

The same computation as the in-training ValidationLoss (val_loss.py, `val/loss`, `val/loss_t*`):
the validation loader the run's recorded config builds, the run's eval.val_loss seed, number of
t buckets and batches, so t and noise are fixed and every checkpoint (EMA or raw, early or late)
is scored on the same latents, noise and t. For a run trained on one process the EMA figure is
the `val/loss` it logged at that checkpoint's step.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from dit_video.build import build_data
from dit_video.data.config import resolve_shards
from dit_video.encoders.base import clip_to_video
from dit_video.errors import ConfigError
from dit_video.eval.val_loss import ValLossConfig, bucket_loss_sums, loss_metrics
from dit_video.pipeline import Pipeline


def loss_settings(config: dict, max_batches: int | None = None) -> ValLossConfig:
    """The run's eval.val_loss settings (seed, num_buckets, max_batches), max_batches overridable."""
    node = dict((config.get("eval") or {}).get("val_loss") or {})
    known = {k: v for k, v in node.items() if k in ("max_batches", "num_buckets", "seed")}
    settings = ValLossConfig(**known)
    if max_batches is not None:
        settings.max_batches = int(max_batches)
    return settings


def held_out_batches(config: dict, max_batches: int) -> tuple[list[dict], str | None]:
    """(the first `max_batches` batches of the run's validation loader, None), or ([], why not)."""
    data = config.get("data") or {}
    train_key, val_key = ("cache", "val_cache") if data.get("kind") == "latents" else ("shards", "val_shards")
    if not data.get(val_key):
        return [], "the run has no validation data (data.val_shards / data.val_cache)"
    val = data[val_key]
    if not (resolve_shards(str(Path(str(val)) / "latents-*.tar")) if train_key == "cache" else resolve_shards(val)):
        return [], f"the run's validation data is not on this machine (data.{val_key}: nothing at {val!r})"
    cfg = OmegaConf.create(config)
    cfg.data[train_key] = val  # only the validation loader is built: the training data need not be here
    cfg.data.num_workers = 0  # the batches do not depend on the worker count (dataset.py); no processes to start
    try:
        _, datamodule = build_data(cfg)
    except ConfigError as err:
        return [], f"the run's validation data cannot be read here ({str(err).splitlines()[0]})"
    batches = []
    for batch in datamodule.val_dataloader():
        if len(batches) >= max_batches:
            break
        batches.append(batch)
    if not batches:
        return [], "the run's validation loader yields no batch"
    return batches, None


@torch.no_grad()
def held_out_loss(pipe: Pipeline, batches: list[dict], settings: ValLossConfig) -> dict[str, float] | None:
    """{"val/loss", "val/loss_t0-0.1", ...} of the pipeline's DiT on `batches` (held_out_batches),
    with t and noise drawn from a generator seeded with settings.seed, as ValidationLoss does."""
    device = pipe.device

    def encode(batch):
        if "latents" in batch:  # a latent cache: the encoders already ran
            return batch["latents"].float().to(device), batch["text_emb"].to(device), batch["text_mask"].to(device), None
        latents = pipe.vae.encode(clip_to_video(batch["clip"]).to(device)).float()  # [B, C, T', H', W']
        text_emb, text_mask, pooled = pipe.encode_prompts(list(batch["caption"]))  # [B, L, D], [B, L], [B, P]|None
        return latents, text_emb.to(device), text_mask.to(device), None if pooled is None else pooled.to(device)

    generator = torch.Generator(device).manual_seed(settings.seed)
    sums, counts = bucket_loss_sums(pipe.dit, pipe.objective, batches, encode, settings.num_buckets,
                                    settings.max_batches, generator)
    return loss_metrics(sums, counts)


class HeldOut:
    """The held-out loss of one evaluation: the run's settings and validation batches, read once,
    then `loss(pipe)` per checkpoint and weights. `skipped` says why there is none (or None)."""

    def __init__(self, config: dict, max_batches: int | None = None, enabled: bool = True):
        self.settings = loss_settings(config, max_batches)
        self.batches, self.skipped = (held_out_batches(config, self.settings.max_batches) if enabled
                                      else ([], "held_out=false"))

    def loss(self, pipe: Pipeline) -> dict[str, float] | None:
        return held_out_loss(pipe, self.batches, self.settings) if self.batches else None

    def describe(self) -> dict | None:
        """What the report says about the batches: {"num_batches", "seed", "num_buckets"}."""
        if not self.batches:
            return None
        return {"num_batches": len(self.batches), "seed": self.settings.seed, "num_buckets": self.settings.num_buckets}
