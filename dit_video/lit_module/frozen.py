"""Frozen encoders that ride along with a LightningModule without being in its module tree."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


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
