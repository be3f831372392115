"""The pooled text vector (model.pooled_text_dim) end to end: training inputs, the objective,
CFG sampling, and `pooled_text_dim: auto` from a real CLIP text encoder."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from test_model import randomize_zero_init, tiny_config  # the same tiny sizes as the base model's tests
from tiny_text_models import save_tokenizer, tiny_model

from dit_video.build import build_dit_config
from dit_video.diffusion.flow import FlowConfig, RectifiedFlow
from dit_video.diffusion.sampling import sample
from dit_video.encoders.text import HFTextEncoder
from dit_video.errors import ConfigError
from dit_video.lit_module import DiTModule, OptimConfig
from dit_video.model import DiT
from dit_video.pipeline import Pipeline

# ---------------------------------------------------------------- pooled vector through training and sampling


class PooledTextEncoder(torch.nn.Module):
    """Stand-in for a CLIP-like encoder: word-hash tokens [B, L, 24] and their mean as the pooled
    vector [B, 10] (a fixed projection), so different captions give different pooled vectors."""

    dim, pooled_dim, max_length = 24, 10, 6

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.register_buffer("table", torch.randn(97, self.dim, generator=gen))
        self.register_buffer("to_pooled", torch.randn(self.dim, self.pooled_dim, generator=gen))

    def encode(self, captions: list[str]):
        emb = torch.zeros(len(captions), self.max_length, self.dim)
        mask = torch.zeros(len(captions), self.max_length, dtype=torch.bool)
        mask[:, 0] = True  # a BOS-like token, so "" still has one real token
        for i, caption in enumerate(captions):
            for j, word in enumerate(caption.split()[: self.max_length - 1]):
                emb[i, j + 1] = self.table[sum(map(ord, word)) % 97]
                mask[i, j + 1] = True
        return emb, mask

    def encode_pooled(self, captions: list[str]):
        emb, mask = self.encode(captions)
        pooled = (emb.sum(1) / mask.sum(1, keepdim=True)) @ self.to_pooled  # [B, P]
        return emb, mask, pooled


class FrameVAE(torch.nn.Module):
    """Stand-in VAE: uint8-derived video [B, 3, T, H, W] -> latents [B, 4, T, H/2, W/2] and back."""

    latent_channels, temporal_factor, spatial_factor = 4, 1, 2

    def encode(self, video):
        pooled = torch.nn.functional.avg_pool3d(video.float(), (1, 2, 2))  # [B, 3, T, H/2, W/2]
        return torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1)  # [B, 4, T, H/2, W/2]

    def decode(self, latents):
        return latents[:, :3].repeat_interleave(2, -1).repeat_interleave(2, -2).clamp(-1, 1)  # [B, 3, T, H, W]


def test_pooled_vector_flows_through_training_inputs_objective_and_sampling():
    torch.manual_seed(0)
    text_encoder, vae = PooledTextEncoder(), FrameVAE()
    cfg = tiny_config(pooled_text_dim=text_encoder.pooled_dim)
    dit = randomize_zero_init(DiT(cfg))
    objective = RectifiedFlow(FlowConfig(caption_dropout=0.0))  # keep both captions
    meta = {"dit_config": {"in_channels": 4}, "latent_shape": [3, 4, 4], "config": {"data": {"fps": 8}}}
    module = DiTModule(dit, objective, vae, text_encoder, OptimConfig(), 0.99, meta)

    # Training inputs: the pooled vector of each (possibly dropped) caption comes along.
    clip = torch.randint(0, 255, (2, 3, 8, 8, 3), dtype=torch.uint8)
    latents, text_emb, text_mask, pooled = module.model_inputs({"clip": clip, "caption": ["a red box", "blue"]})
    assert pooled.shape == (2, text_encoder.pooled_dim)
    assert not torch.allclose(pooled[0], pooled[1])
    loss, _ = objective.loss(dit, latents, text_emb, text_mask, generator=torch.Generator().manual_seed(0),
                             pooled=pooled)
    other, _ = objective.loss(dit, latents, text_emb, text_mask, generator=torch.Generator().manual_seed(0),
                              pooled=pooled.flip(0))
    assert torch.isfinite(loss) and loss != other  # the objective really passed it to the model
    with pytest.raises(ValueError, match="data=latents does not store pooled text vectors"):
        module.model_inputs({"latents": latents, "caption": ["a", "b"]})

    # Sampling with CFG: prompts' and empty caption's pooled vectors both reach the model.
    pipe = Pipeline(dit, vae, text_encoder, objective, meta)
    a = pipe.generate(["a red box"], [0], steps=2, cfg=3.0, autocast=False, return_latents=True)[1]
    b = pipe.generate(["a red box"], [0], steps=2, cfg=3.0, autocast=False, return_latents=True)[1]
    torch.testing.assert_close(a, b)
    c = pipe.generate(["a red box"], [0], steps=2, cfg=3.0, negative_prompt="blue", autocast=False,
                      return_latents=True)[1]
    assert not torch.allclose(a, c)
    _, mask_, pooled_ = text_encoder.encode_pooled(["x"])
    with pytest.raises(ValueError, match="needs null_pooled"):
        sample(dit, *text_encoder.encode(["x"]), (1, 4, 3, 4, 4), null_text_emb=text_encoder.encode([""])[0],
               null_text_mask=text_encoder.encode([""])[1], cfg=3.0, steps=1, pooled=pooled_)


def test_pooled_text_dim_auto_takes_a_real_clip_encoders_pooled_dim(tmp_path, monkeypatch):
    """A tiny random CLIP text model saved offline (tests/tiny_text_models.py): run.py's
    `pooled_text_dim: auto` takes its pooled_dim, and its pooled vector drives the DiT."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny_model("clip").save_pretrained(tmp_path)
    save_tokenizer(tmp_path, "clip")
    enc = HFTextEncoder(tmp_path, max_length=16)
    node = OmegaConf.create(dict(preset="demo", hidden_size=64, depth=2, num_heads=4, pooled_text_dim="auto"))
    cfg = build_dit_config(node, in_channels=4, text_dim=enc.dim, pooled_dim=enc.pooled_dim)
    assert cfg.pooled_text_dim == enc.pooled_dim > 0
    with pytest.raises(ConfigError, match="pooled_text_dim=auto but the text encoder gives no pooled vector"):
        build_dit_config(node, in_channels=4, text_dim=enc.dim, pooled_dim=0)
    dit = randomize_zero_init(DiT(cfg))
    x, t = torch.randn(2, 4, 2, 4, 4), torch.rand(2)
    text_emb, text_mask, pooled = enc.encode_pooled(["red square moves left", "blue disc"])
    out = dit(x, t, text_emb, text_mask, pooled=pooled)
    assert not torch.allclose(dit(x, t, text_emb, text_mask, pooled=pooled.flip(0)), out)
