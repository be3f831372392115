"""AdamW with warmup: the optimisation both LightningModules share (the EMA is in ema.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


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
