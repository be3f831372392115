"""Stage 1: our causal video VAE's LightningModule (reconstruction + KL, optionally LPIPS and a GAN)."""

from __future__ import annotations

import dataclasses

import lightning as L
import torch

from dit_video.encoders.base import clip_to_video, video_to_clip
from dit_video.lit_module.optim import OptimConfig, build_optimizer
from dit_video.metrics.image_metrics import psnr, ssim
from dit_video.metrics.motion import motion_fidelity


class VAEModule(L.LightningModule):
    """Stage 1: train our causal video VAE on clips (reconstruction + KL, optionally LPIPS and a
    3D patch discriminator; `objective` is a dit_video.encoders.causal_vae.VAELoss).

    Without a discriminator: Lightning's automatic optimisation, one AdamW. With one: two AdamWs
    (VAE, discriminator) stepped in `training_step` (manual optimisation), so gradient clipping
    (`gradient_clip_val`) and the warmup schedulers are applied here. Validation reports
    val/rec_loss, val/psnr and val/ssim of the posterior-mean reconstruction, and
    val/motion_fidelity (the share of clips whose reconstruction moves as the input does: same
    camera-motion label, dit_video.metrics.motion) with val/motion_error (their distance in frame
    fractions over the clip).
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
            self._average_discriminator_gradients()
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

    # DDP takes charge of the parameters that require a gradient when it wraps the module, and
    # reduces them in the first backward after each forward. The discriminator's gradient comes
    # from a second backward (its own loss, after the VAE's): DDP would expect it in the first one
    # and fail at the next step. So it is frozen while DDP wraps the module (configure_model runs
    # just before, on_fit_start just after), and its gradients are averaged over ranks here.

    def configure_model(self) -> None:
        if self.adversarial and self.trainer.world_size > 1:
            self.objective.discriminator.requires_grad_(False)

    def on_fit_start(self) -> None:
        if self.adversarial:
            self.objective.discriminator.requires_grad_(True)

    def _average_discriminator_gradients(self) -> None:
        world = self.trainer.world_size
        if world == 1:
            return
        grads = [p.grad for p in self.objective.discriminator.parameters() if p.grad is not None]
        flat = torch.cat([g.flatten() for g in grads])  # one all-reduce for the whole critic
        torch.distributed.all_reduce(flat)
        for g, mean in zip(grads, (flat / world).split([g.numel() for g in grads]), strict=True):
            g.copy_(mean.view_as(g))

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
        video = clip_to_video(batch["clip"]).float()  # [B, 3, T, H, W] in [-1, 1]
        video_hat = self.vae.decode(self.vae.encode(video).mean).float()  # posterior mean: deterministic
        diff = video_hat - video
        rec_loss = diff.abs().mean() if self.objective.cfg.recon == "l1" else diff.pow(2).mean()
        recon = video_hat.clamp(-1, 1)
        bs = video.shape[0]
        self.log("val/rec_loss", rec_loss, batch_size=bs)
        self.log("val/psnr", psnr(recon, video).mean(), prog_bar=True, batch_size=bs)
        self.log("val/ssim", ssim((recon + 1) / 2, (video + 1) / 2).mean(), batch_size=bs)  # on [0, 1] images
        if video.shape[2] > 1:  # motion needs two frames; the uint8 round trip is what a sample goes through
            motion = motion_fidelity(batch["clip"].cpu().numpy(), video_to_clip(recon).cpu().numpy())
            self.log("val/motion_fidelity", motion["motion_fidelity"], batch_size=bs)
            self.log("val/motion_error", motion["motion_error"], batch_size=bs)

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
