"""Samplers for the rectified-flow convention of `flow.py` (integrate from t = 1 to t = 0)."""

from __future__ import annotations

import torch

from dit_video.diffusion.flow import shift_time


def pad_text(text_emb: torch.Tensor, text_mask: torch.Tensor, length: int):
    """Right-pad [B, L, D] / [B, L] to `length` tokens with masked-out zeros."""
    extra = length - text_emb.shape[1]
    if extra <= 0:
        return text_emb, text_mask
    text_emb = torch.nn.functional.pad(text_emb, (0, 0, 0, extra))  # [B, length, D]
    text_mask = torch.nn.functional.pad(text_mask, (0, extra), value=False)  # [B, length]
    return text_emb, text_mask


def flow_timesteps(steps: int, shift: float = 1.0, device=None) -> torch.Tensor:
    """steps + 1 times from 1 to 0 (uniform, then shifted) [steps + 1]."""
    return shift_time(torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64), shift)


class GuidedVelocity:
    """v(x, t) with classifier-free guidance: v_u + cfg (v_c - v_u), one batched forward.

    The conditional and unconditional halves share one forward pass (the batch is doubled), which
    is faster than two passes at small batch sizes on every backend we run.
    """

    def __init__(self, model, text_emb, text_mask, null_text_emb=None, null_text_mask=None, cfg: float = 1.0):
        self.model, self.cfg = model, cfg
        if cfg != 1.0:
            if null_text_emb is None:
                raise ValueError("cfg != 1 needs null_text_emb/null_text_mask (the encoded empty caption)")
            b = text_emb.shape[0]
            if null_text_emb.shape[0] == 1:  # one unconditional embedding shared by the batch
                null_text_emb = null_text_emb.expand(b, -1, -1)
                null_text_mask = null_text_mask.expand(b, -1)
            length = max(text_emb.shape[1], null_text_emb.shape[1])
            cond = pad_text(text_emb, text_mask, length)
            uncond = pad_text(null_text_emb.to(text_emb), null_text_mask, length)
            self.text_emb = torch.cat([cond[0], uncond[0]])  # [2B, L, D]
            self.text_mask = torch.cat([cond[1], uncond[1]])  # [2B, L]
        else:
            self.text_emb, self.text_mask = text_emb, text_mask

    def __call__(self, x: torch.Tensor, t: float) -> torch.Tensor:
        b = x.shape[0]
        if self.cfg == 1.0:
            return self.model(x, x.new_full((b,), t), self.text_emb, self.text_mask).float()
        v = self.model(torch.cat([x, x]), x.new_full((2 * b,), t), self.text_emb, self.text_mask).float()
        v_cond, v_uncond = v.chunk(2)  # [B, C, T, H, W] each
        return v_uncond + self.cfg * (v_cond - v_uncond)


@torch.no_grad()
def euler(velocity, noise: torch.Tensor, steps: int, shift: float = 1.0, progress=None) -> torch.Tensor:
    """Explicit Euler on dx/dt = v from t = 1 to 0; returns x_0 [B, C, T, H, W] (float32)."""
    ts = flow_timesteps(steps, shift).tolist()
    x = noise.float()
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        x = x + (t_next - t) * velocity(x, t)
        if progress is not None:
            progress(i + 1, steps)
    return x


SAMPLERS = {"euler": euler}


@torch.no_grad()
def sample(
    model,
    text_emb: torch.Tensor,
    text_mask: torch.Tensor,
    shape: tuple[int, ...],
    *,
    null_text_emb: torch.Tensor | None = None,
    null_text_mask: torch.Tensor | None = None,
    sampler: str = "euler",
    steps: int = 30,
    cfg: float = 5.0,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    progress=None,
) -> torch.Tensor:
    """Noise + text -> latents, usable without Lightning.

    model: v(x [B,C,T,H,W], t [B], text_emb [B,L,D], text_mask [B,L]) -> [B,C,T,H,W].
    shape: latent shape (B, C, T, H, W). Returns latents [B, C, T, H, W] float32.
    The same generator state gives the same noise, hence the same samples.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is unknown; choose one of {sorted(SAMPLERS)}")
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    if noise is None:
        noise = torch.randn(shape, generator=generator, device=text_emb.device)
    velocity = GuidedVelocity(model, text_emb, text_mask, null_text_emb, null_text_mask, cfg)
    return SAMPLERS[sampler](velocity, noise, steps, shift=shift, progress=progress)
