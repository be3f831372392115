"""The frozen VAE and text encoder live outside DiTModule's module tree (FrozenEncodersMixin):
no parameter, state_dict key or submodule of theirs is visible to the optimizer, to checkpoints or
to a strategy (DDP, FSDP2, DeepSpeed ZeRO-3; the ZeRO-3 check runs in test_distributed_deepspeed.py),
yet `module.vae` / `module.text_encoder` work and follow the module's `.to()`."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """The real tiny causal VAE (saved and reloaded like a trained one) and the MiniLM text encoder."""
    from test_encoder_loading import _saved_vae

    from dit_video.encoders import HFTextEncoder, load_vae, minilm_path

    return load_vae(_saved_vae(tmp_path_factory.mktemp("frozen"))), HFTextEncoder(minilm_path(), max_length=16)


def make_module(vae, text_encoder, meta: dict | None = None):
    from dit_video.diffusion import build_objective
    from dit_video.lit_module import DiTModule, OptimConfig
    from dit_video.model import DiT, DiTConfig

    objective = build_objective(OmegaConf.to_container(OmegaConf.load(ROOT / "conf/objective/rectified_flow.yaml")))
    dit = DiT(DiTConfig(in_channels=vae.latent_channels, text_dim=text_encoder.dim, hidden_size=32, depth=1,
                        num_heads=2))
    return DiTModule(dit, objective, vae, text_encoder, OptimConfig(), 0.9, meta or {})


def test_encoders_are_outside_the_module_tree_but_reachable(encoders):
    vae, text_encoder = encoders
    module = make_module(vae, text_encoder)
    assert module.vae is vae and module.text_encoder is text_encoder
    encoder_params = {id(p) for enc in encoders for p in enc.parameters()}
    assert len(encoder_params) > 100  # the real encoders, with weights a strategy would shard

    assert {k.split(".", 1)[0] for k in module.state_dict()} == {"dit", "ema"}
    params = {id(p) for p in module.parameters()}
    # The EMA is outside the tree too (lit_module/ema.py), yet in the state dict as ema.*.
    assert params == {id(p) for p in module.dit.parameters()}
    assert not params & {id(p) for p in module.ema.parameters()}
    assert not params & encoder_params
    assert not {id(m) for m in module.modules()} & {id(m) for enc in encoders for m in enc.modules()}
    optimizer = module.configure_optimizers()["optimizer"]
    assert not {id(p) for g in optimizer.param_groups for p in g["params"]} & encoder_params

    # Still frozen, in eval after module.train(), and used by the training inputs.
    module.train()
    assert not vae.training and not text_encoder.training
    assert not any(p.requires_grad for enc in encoders for p in enc.parameters())
    clip = torch.randint(0, 256, (1, 5, 32, 32, 3), dtype=torch.uint8)  # [B, T, H, W, 3]
    latents, text_emb, text_mask, _ = module.model_inputs({"clip": clip, "caption": ["a red square"]})
    assert latents.shape[:2] == (1, vae.latent_channels) and text_emb.shape[-1] == text_encoder.dim


def test_encoders_follow_the_module_dtype_and_device(encoders):
    vae, text_encoder = copy.deepcopy(encoders)
    module = make_module(vae, text_encoder)
    text_emb, _ = module.encode_text(["a red square"])  # [1, L, D]

    module.to(torch.float64)
    assert {p.dtype for enc in (vae, text_encoder) for p in enc.parameters()} == {torch.float64}
    text_emb64, _ = module.encode_text(["a red square"])
    assert not torch.equal(text_emb64.float(), text_emb)  # really computed in float64 ...
    torch.testing.assert_close(text_emb64.float(), text_emb, atol=1e-4, rtol=1e-4)  # ... by the same weights
    module.to(torch.float32)
    assert torch.equal(module.encode_text(["a red square"])[0], text_emb)  # fp32 -> fp64 -> fp32 is exact

    # A device move (the meta device: the one besides the CPU this machine has).
    module.to("meta")
    assert all(p.is_meta for enc in (vae, text_encoder) for p in enc.parameters())


def test_assigning_an_encoder_keeps_it_frozen_and_out_of_the_tree(encoders):
    from dit_video.encoders.causal_vae import VAE_PRESETS, CausalVAE

    module = make_module(*encoders)
    other = CausalVAE(VAE_PRESETS["tiny"]).train()
    module.vae = other
    assert module.vae is other and "vae" not in module._modules
    assert not other.training and not any(p.requires_grad for p in other.parameters())
    assert not {id(p) for p in module.parameters()} & {id(p) for p in other.parameters()}


def test_checkpoints_hold_identities_not_encoder_weights(encoders):
    vae, text_encoder = encoders
    meta = {"vae": vae.identity(), "text_encoder": text_encoder.identity()}  # as run.encoder_identities
    module = make_module(vae, text_encoder, meta)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["dit_video"] is meta

    # A state dict written while the encoders were submodules loads too: their keys are dropped.
    old = dict(checkpoint["state_dict"])
    old |= {f"vae.{k}": v for k, v in vae.state_dict().items()}
    old |= {f"text_encoder.{k}": v for k, v in text_encoder.state_dict().items()}
    legacy = {"state_dict": old}
    module.on_load_checkpoint(legacy)
    assert legacy["state_dict"].keys() == checkpoint["state_dict"].keys()
    module.load_state_dict(legacy["state_dict"])  # strict
