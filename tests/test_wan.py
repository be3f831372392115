"""Wan transformers in our DiT: tiny random diffusers WanTransformer3DModels, saved offline, converted;
forward, gradients and packed forward equal diffusers' to 1e-5 (fp32); the released shapes' sizes."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_wan import WAN_21, WAN_22, assert_close, load_wan, padded_text, save_wan, wan_forward

from dit_video.convert import dit_config_from_wan, load_wan_folder
from dit_video.convert.wan import dit_to_wan_state
from dit_video.model import DiT, dit_config
from dit_video.model.rope import rope_table

diffusers = pytest.importorskip("diffusers")

TEXT_LEN = 9  # caption tokens both models attend to (Wan's pipeline pads to 512)
LATENTS = {"wan21": (3, 4, 6), "wan22": (4, 6, 3)}  # (T, H, W) latent sizes the patches divide


@pytest.fixture(scope="module", params=["wan21", "wan22"])
def pair(request, tmp_path_factory):
    """(our converted DiT, diffusers' model reloaded offline, latent size) for one tiny config."""
    name = request.param
    folder = save_wan(tmp_path_factory.mktemp(name), WAN_21 if name == "wan21" else WAN_22, shard=name == "wan22")
    assert (folder / "diffusion_pytorch_model.safetensors.index.json").is_file() == (name == "wan22")
    cfg, state = load_wan_folder(folder, text_len=TEXT_LEN)
    dit = DiT(cfg)
    dit.load_state_dict(state)
    return dit.eval(), load_wan(folder), LATENTS[name]


def inputs(dit: DiT, latent_shape, batch: int, text_lens: list[int], seed: int):
    """x, t, text_emb (garbage after each caption's length), text_mask; and diffusers' zero-padded text."""
    gen = torch.Generator().manual_seed(seed)
    cfg = dit.cfg
    x = torch.randn(batch, cfg.in_channels, *latent_shape, generator=gen)
    t = torch.rand(batch, generator=gen)
    L = max(text_lens)
    text_emb = torch.randn(batch, L, cfg.text_dim, generator=gen)
    text_mask = torch.arange(L)[None] < torch.tensor(text_lens)[:, None]  # [B, L]
    return x, t, text_emb, text_mask, padded_text(text_emb, text_mask, TEXT_LEN)


@pytest.mark.parametrize("t_values, text_lens", [([0.0, 1.0], [1, TEXT_LEN]), ([0.37, 0.81], [4, 2])])
def test_forward_equals_diffusers(pair, t_values, text_lens):
    dit, wan, latent_shape = pair
    x, _, text_emb, text_mask, padded = inputs(dit, latent_shape, 2, text_lens, seed=1)
    t = torch.tensor(t_values)
    with torch.no_grad():
        ours = dit(x, t, text_emb, text_mask)
        theirs = wan_forward(wan, x, t, padded)
    assert ours.shape == theirs.shape == (2, dit.cfg.out_dim, *latent_shape)
    assert theirs.abs().mean() > 0.1  # a random model whose output depends on the inputs
    assert_close(ours, theirs, "output")


def test_gradients_equal_diffusers(pair):
    """Parameter gradients (mapped to Wan's names and layout), latent and caption gradients."""
    dit, wan, latent_shape = pair
    x, t, text_emb, text_mask, padded = inputs(dit, latent_shape, 2, [3, 6], seed=2)
    weight = torch.randn(2, dit.cfg.out_dim, *latent_shape, generator=torch.Generator().manual_seed(3))
    ours_x, theirs_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours_text, theirs_text = text_emb.clone().requires_grad_(), padded.clone().requires_grad_()
    dit.zero_grad()
    wan.zero_grad()
    (dit(ours_x, t, ours_text, text_mask) * weight).sum().backward()
    (wan_forward(wan, theirs_x, t, theirs_text) * weight).sum().backward()
    assert_close(ours_x.grad, theirs_x.grad, "latents")
    real = text_mask[..., None]
    assert_close(ours_text.grad * real, theirs_text.grad[:, : text_emb.shape[1]] * real, "text_emb")
    assert not ours_text.grad[~text_mask].any()  # padding is zeroed: no gradient reaches it
    grads = dit_to_wan_state({k: p.grad for k, p in dit.named_parameters()}, dit.cfg)
    theirs = dict(wan.named_parameters())
    assert set(grads) == set(theirs)
    for name, grad in grads.items():
        assert_close(grad, theirs[name].grad, name)


def test_packed_forward_and_gradients_equal_diffusers(pair):
    """Clips of different sizes, t and caption lengths in one packed sequence == diffusers on each alone."""
    dit, wan, latent_shape = pair
    pt, ph, pw = dit.cfg.patch_size
    T, H, W = latent_shape
    shapes = [(T, H, W), (pt, 2 * ph, 3 * pw), (T + pt, H - ph, W)]
    gen = torch.Generator().manual_seed(4)
    clips = [torch.randn(dit.cfg.in_channels, *s, generator=gen) for s in shapes]
    t = torch.tensor([0.2, 0.9, 0.55])
    text_lens = [2, 7, 5]
    _, _, text_emb, text_mask, padded = inputs(dit, latent_shape, 3, text_lens, seed=5)
    weights = [torch.randn(dit.cfg.out_dim, *s, generator=gen) for s in shapes]
    dit.zero_grad()
    wan.zero_grad()
    outs = dit.forward_packed(clips, t, text_emb, text_mask)
    sum((o * w).sum() for o, w in zip(outs, weights, strict=True)).backward()
    for i, clip in enumerate(clips):
        theirs = wan_forward(wan, clip[None], t[i : i + 1], padded[i : i + 1])[0]
        (theirs * weights[i]).sum().backward()
        assert_close(outs[i].detach(), theirs.detach(), f"clip {i}")
    grads = dit_to_wan_state({k: p.grad for k, p in dit.named_parameters()}, dit.cfg)
    for name, param in wan.named_parameters():
        assert_close(grads[name], param.grad, name)


def test_per_frame_t_equals_wan_2_2_per_token_timesteps(pair):
    """Wan 2.2 TI2V gives every token its own timestep (first frame clean for image-to-video); our
    per-latent-frame t [B, T] is that timestep map, constant over each frame's tokens."""
    dit, wan, latent_shape = pair
    x, _, text_emb, text_mask, padded = inputs(dit, latent_shape, 2, [5, 3], seed=6)
    pt = dit.cfg.patch_size[0]
    grid = dit.cfg.grid(latent_shape)
    t_tokens = torch.tensor([[0.0] + [0.7] * (grid[0] - 1), [0.3] * grid[0]])  # [B, T'] per token frame
    t_frames = t_tokens.repeat_interleave(pt, dim=1)  # [B, T] per latent frame
    with torch.no_grad():
        ours = dit(x, t_frames, text_emb, text_mask)
        theirs = wan_forward(wan, x, t_tokens.repeat_interleave(grid[1] * grid[2], dim=1), padded)  # [B, N] timesteps
    assert_close(ours, theirs, "output")


def test_converted_weights_round_trip_to_the_same_wan_tensors(pair, tmp_path):
    """wan -> ours -> wan is the identity on every tensor (the layout permutations invert exactly)."""
    dit, wan, _ = pair
    back = dit_to_wan_state(dit.state_dict(), dit.cfg)
    theirs = wan.state_dict()
    assert set(back) == set(theirs)
    for name, tensor in back.items():
        assert torch.equal(tensor, theirs[name]), name


# ---------------------------------------------------------------- the released sizes

# Totals of the released transformers. The model cards name them "1.3B" and "14B"; the exact counts are
# those of diffusers' WanTransformer3DModel at the released config (built below on the meta device) and
# match the released bf16 file of the 1.3B model (2.84 GB = 2 bytes x 1.419e9).
RELEASED = {
    "Wan2.1-T2V-1.3B": (dict(num_attention_heads=12, ffn_dim=8960, num_layers=30), 1_418_996_800, 1.3e9),
    "Wan2.1-T2V-14B": (dict(num_attention_heads=40, ffn_dim=13824, num_layers=40), 14_288_491_584, 14e9),
}


@pytest.mark.parametrize("preset", list(RELEASED))
def test_released_presets_have_the_released_parameter_counts(preset):
    kwargs, total, card = RELEASED[preset]
    with torch.device("meta"):
        ours = sum(p.numel() for p in DiT(dit_config(preset, in_channels=16, text_dim=4096)).parameters())
        theirs = sum(p.numel() for p in diffusers.WanTransformer3DModel(**kwargs).parameters())
    assert ours == theirs == total
    assert abs(ours - card) / card < 0.1  # the model card's rounded name


def test_released_config_json_converts_to_the_preset(tmp_path):
    """The config.json of Wan-AI/Wan2.1-T2V-1.3B-Diffusers (its published values) maps to our preset."""
    config = {"_class_name": "WanTransformer3DModel", "_diffusers_version": "0.33.0.dev0", "added_kv_proj_dim": None,
              "attention_head_dim": 128, "cross_attn_norm": True, "eps": 1e-06, "ffn_dim": 8960, "freq_dim": 256,
              "image_dim": None, "in_channels": 16, "num_attention_heads": 12, "num_layers": 30, "out_channels": 16,
              "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 1024, "text_dim": 4096}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert dit_config_from_wan(config) == dit_config("Wan2.1-T2V-1.3B", in_channels=16, text_dim=4096)


def test_rope_table_equals_wans_at_the_released_480p_grid():
    """At 81 frames of 480x832 (21 x 30 x 52 tokens, positions up to 51) our float32 angles give Wan's
    float64-computed table to 1e-5, pair i of Wan's interleaved layout being channel i of our half."""
    grid = (21, 30, 52)
    cos, sin = diffusers.models.transformers.transformer_wan.WanRotaryPosEmbed(128, (1, 2, 2), 1024)(torch.zeros(1, 16, grid[0], 2 * grid[1], 2 * grid[2]))
    ours_cos, ours_sin = rope_table(grid, dit_config("Wan2.1-T2V-1.3B", in_channels=16, text_dim=4096).axes_dim, 1e4)
    assert_close(ours_cos[:, :64], cos[0, :, 0, 0::2], "cos")
    assert_close(ours_sin[:, :64], sin[0, :, 0, 1::2], "sin")
    assert torch.equal(ours_cos[:, :64], ours_cos[:, 64:])  # rotate-half: both halves of a pair share the angle
