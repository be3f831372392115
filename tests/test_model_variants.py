"""DiT variants chosen by config: MMDiT joint attention, per-block adaLN-Zero, pooled text, absolute positions."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_model import randomize_zero_init, tiny_config  # the same tiny sizes as the base model's tests

from dit_video.model import DiT, DiTConfig
from dit_video.model.mmdit import DualStreamBlock, SingleStreamBlock
from dit_video.model.pos_embed import sincos_1d, sincos_3d, sincos_axes_dim
from dit_video.parallel import ParallelConfig, parallelize

VARIANTS = {
    "cross_attn+adaln_zero": dict(modulation="adaln_zero"),
    "mmdit": dict(conditioning="mmdit", num_dual_blocks=1),
    "mmdit+adaln_zero": dict(conditioning="mmdit", num_dual_blocks=1, modulation="adaln_zero"),
    "mmdit+single_only": dict(conditioning="mmdit", num_dual_blocks=0),
    "pooled": dict(pooled_text_dim=10),
    "mmdit+pooled+sincos": dict(conditioning="mmdit", num_dual_blocks=1, pooled_text_dim=10, pos_embed="sincos"),
    "sincos": dict(pos_embed="sincos"),
    "learned": dict(pos_embed="learned", max_grid=(6, 4, 6)),
}


def inputs(cfg: DiTConfig, shape=(2, 5, 6, 10), text_len=7, seed=0) -> dict:
    """Model kwargs with the second sample's caption padded after 3 tokens (and a pooled vector if configured)."""
    gen = torch.Generator().manual_seed(seed)
    B, T, H, W = shape
    args = dict(
        x=torch.randn(B, cfg.in_channels, T, H, W, generator=gen),
        t=torch.rand(B, generator=gen),
        text_emb=torch.randn(B, text_len, cfg.text_dim, generator=gen),
        text_mask=torch.ones(B, text_len, dtype=torch.bool),
    )
    args["text_mask"][-1, 3:] = False
    if cfg.pooled_text_dim:
        args["pooled"] = torch.randn(B, cfg.pooled_text_dim, generator=gen)
    return args


# ---------------------------------------------------------------- every variant


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_shapes_zero_init_and_structure(name):
    cfg = tiny_config(**VARIANTS[name])
    model = DiT(cfg)
    args = inputs(cfg, shape=(2, 5, 6, 10))
    out = model(**args)
    assert out.shape == args["x"].shape
    assert torch.equal(out, torch.zeros_like(out))  # adaLN-Zero init holds for every variant
    out = randomize_zero_init(model)(**args)
    assert torch.isfinite(out).all() and out.abs().max() > 0
    kinds = [type(b) for b in model.blocks]
    if cfg.conditioning == "mmdit":
        n = cfg.num_dual_blocks
        assert kinds == [DualStreamBlock] * n + [SingleStreamBlock] * (cfg.depth - n)
    assert hasattr(model, "t_block") == (cfg.modulation == "adaln_single")


@pytest.mark.parametrize("name", ["cross_attn+adaln_zero", "mmdit", "mmdit+adaln_zero", "mmdit+pooled+sincos", "learned"])
def test_variant_trains_and_loss_falls(name):
    """30 AdamW steps on one fixed batch of a rectified-flow regression: the loss falls and every
    parameter receives gradient (catches dead modules, e.g. a stream whose output is never used)."""
    torch.manual_seed(0)
    cfg = tiny_config(**VARIANTS[name])
    model = DiT(cfg)
    args = inputs(cfg, shape=(2, 3, 4, 6), text_len=5)
    x0, noise = args.pop("x"), torch.randn(2, cfg.in_channels, 3, 4, 6, generator=torch.Generator().manual_seed(1))
    t = args.pop("t")
    x_t = (1 - t)[:, None, None, None, None] * x0 + t[:, None, None, None, None] * noise
    target = noise - x0
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        opt.zero_grad()
        loss = (model(x_t, t, **args) - target).pow(2).mean()
        loss.backward()
        if step == 3:
            dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
            assert not dead, f"parameters with no gradient: {dead}"
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.7 * first, f"loss {first:.3f} -> {last:.3f}"


@pytest.mark.parametrize("name", ["mmdit", "mmdit+adaln_zero", "cross_attn+adaln_zero"])
def test_activation_checkpointing_keeps_outputs_and_grads(name):
    """parallelize wraps every block (dual- and single-stream alike): outputs, grads and names unchanged."""
    cfg = tiny_config(**VARIANTS[name])
    torch.manual_seed(0)
    model = randomize_zero_init(DiT(cfg))
    args = inputs(cfg)

    def output_and_grads(m):
        m.zero_grad(set_to_none=True)
        out = m(**args)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}

    out_a, grads_a = output_and_grads(model)
    wrapped = parallelize(copy.deepcopy(model), ParallelConfig(activation_checkpointing=True))
    assert wrapped.state_dict().keys() == model.state_dict().keys()
    calls = []
    for block in wrapped.blocks:
        block.register_forward_pre_hook(lambda *a: calls.append(1))
    out_b, grads_b = output_and_grads(wrapped)
    assert len(calls) == 2 * cfg.depth  # every block recomputed in backward, not only the first kind
    torch.testing.assert_close(out_b, out_a, atol=1e-6, rtol=1e-5)
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], atol=1e-6, rtol=1e-4, msg=n)


@pytest.mark.slow
def test_compile_keeps_mmdit_outputs():
    cfg = tiny_config(**VARIANTS["mmdit"])
    model = randomize_zero_init(DiT(cfg))
    args = inputs(cfg)
    reference = model(**args)
    compiled = parallelize(copy.deepcopy(model), ParallelConfig(activation_checkpointing=True, compile=True))
    torch.testing.assert_close(compiled(**args), reference, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- MMDiT


@pytest.mark.parametrize("name", ["mmdit", "mmdit+single_only"])
def test_mmdit_ignores_padded_text_tokens(name):
    cfg = tiny_config(**VARIANTS[name])
    model = randomize_zero_init(DiT(cfg))
    args = inputs(cfg)
    out = model(**args)
    mask = args["text_mask"]
    changed = args["text_emb"].clone()
    changed[~mask] = torch.randn(int((~mask).sum()), cfg.text_dim) * 10
    torch.testing.assert_close(model(**{**args, "text_emb": changed}), out, atol=1e-6, rtol=1e-6)
    # ... while a real token does matter, and an all-true mask equals passing no mask.
    changed[1, 0] += 1.0
    assert not torch.allclose(model(**{**args, "text_emb": changed})[1], out[1])
    args_full = {**args, "text_mask": torch.ones_like(mask)}
    torch.testing.assert_close(model(**args_full), model(**{**args, "text_mask": None}))


def test_mmdit_math_and_sdpa_backends_agree():
    cfg = tiny_config(**VARIANTS["mmdit"])
    sdpa = randomize_zero_init(DiT(cfg))
    math_model = DiT(tiny_config(**VARIANTS["mmdit"], attn_backend="math"))
    math_model.load_state_dict(sdpa.state_dict())
    args = inputs(cfg)
    torch.testing.assert_close(sdpa(**args), math_model(**args), atol=1e-5, rtol=1e-5)


def test_mmdit_rope_only_on_video_tokens():
    """Text tokens carry no position: permuting the real text tokens of a caption (and its mask)
    leaves the output unchanged, as set attention over unpositioned keys should. Video tokens do
    carry position through RoPE: the same content in another frame order gives another output."""
    cfg = tiny_config(**VARIANTS["mmdit"])
    model = randomize_zero_init(DiT(cfg))
    args = inputs(cfg)
    out = model(**args)
    perm = torch.tensor([2, 0, 1, 5, 3, 6, 4])
    permuted = {**args, "text_emb": args["text_emb"][:, perm], "text_mask": args["text_mask"][:, perm]}
    torch.testing.assert_close(model(**permuted), out, atol=1e-5, rtol=1e-5)
    flipped = {**args, "x": args["x"].flip(2)}
    assert not torch.allclose(model(**flipped).flip(2), out, atol=1e-4)


# ---------------------------------------------------------------- pooled text vector


def test_pooled_vector_changes_the_output_and_is_required():
    cfg = tiny_config(**VARIANTS["pooled"])
    model = randomize_zero_init(DiT(cfg))
    args = inputs(cfg)
    out = model(**args)
    other = {**args, "pooled": args["pooled"].flip(0)}
    assert not torch.allclose(model(**other), out)
    with pytest.raises(ValueError, match="pooled_text_dim=10"):
        model(**{**args, "pooled": None})
    plain = DiT(tiny_config())
    with pytest.raises(ValueError, match="pooled_text_dim=0"):
        plain(**inputs(plain.cfg), pooled=torch.randn(2, 10))


# ---------------------------------------------------------------- absolute positions


def test_sincos_3d_is_the_per_axis_1d_embedding():
    """Token (t, h, w) holds [sincos(t) | sincos(h) | sincos(w)] in chunks of sincos_axes_dim(D)."""
    grid, dim = (3, 4, 5), 64
    table = sincos_3d(grid, dim)
    assert table.shape == (60, 64)
    dt, dh, dw = sincos_axes_dim(dim)
    assert dt + dh + dw == dim and dt % 2 == dh % 2 == 0
    t, h, w = 2, 1, 3
    n = (t * 4 + h) * 5 + w
    expected = torch.cat([sincos_1d(torch.tensor([float(p)]), d)[0] for p, d in ((t, dt), (h, dh), (w, dw))])
    torch.testing.assert_close(table[n], expected)
    assert len({tuple(row.tolist()) for row in table}) == 60  # every position distinct


def test_sincos_works_at_any_grid_size():
    cfg = tiny_config(pos_embed="sincos")
    model = randomize_zero_init(DiT(cfg))
    for shape in ((1, 1, 2, 2), (1, 9, 12, 4)):
        args = inputs(cfg, shape=shape)
        assert model(**args).shape == args["x"].shape
    assert not any("pos" in n for n, _ in model.named_parameters())  # nothing learned


def test_learned_pos_embed_uses_corner_and_errors_beyond_max_grid():
    cfg = tiny_config(pos_embed="learned", max_grid=(3, 2, 4))
    model = randomize_zero_init(DiT(cfg))
    assert model.pos_embed.table.shape == (3, 2, 4, cfg.hidden_size)
    # A grid smaller than max_grid reads the table's corner (raster order).
    torch.testing.assert_close(model.pos_embed((2, 1, 3)), model.pos_embed.table[:2, :1, :3].reshape(6, -1))
    assert model(**inputs(cfg, shape=(1, 3, 4, 8))).shape == (1, 4, 3, 4, 8)  # exactly max_grid
    msg = r"token grid \(3, 2, 5\) exceeds model.max_grid=\(3, 2, 4\) along W"
    with pytest.raises(ValueError, match=msg):
        model(**inputs(cfg, shape=(1, 3, 4, 10)))
    with pytest.raises(ValueError, match=msg):
        cfg.validate((3, 4, 10))


def test_positions_matter_for_every_pos_embed():
    """With any pos_embed, the same patch content at another place gives another output there."""
    for overrides in (dict(), dict(pos_embed="sincos"), dict(pos_embed="learned", max_grid=(5, 3, 5))):
        cfg = tiny_config(**overrides)
        model = randomize_zero_init(DiT(cfg))
        args = inputs(cfg)
        out = model(**args)
        rolled = model(**{**args, "x": args["x"].roll(1, dims=2)}).roll(-1, dims=2)
        assert not torch.allclose(rolled, out, atol=1e-4), overrides


# ---------------------------------------------------------------- config and compatibility


def test_bad_variant_configs_raise_naming_the_field():
    with pytest.raises(ValueError, match=r"model.conditioning='joint' is unknown; pick one of cross_attn, mmdit"):
        DiT(tiny_config(conditioning="joint"))
    with pytest.raises(ValueError, match=r"model.modulation='adaln' is unknown"):
        DiT(tiny_config(modulation="adaln"))
    with pytest.raises(ValueError, match=r"model.pos_embed='alibi' is unknown"):
        DiT(tiny_config(pos_embed="alibi"))
    with pytest.raises(ValueError, match=r"model.num_dual_blocks=2 must be in \[0, depth=2\)"):
        DiT(tiny_config(conditioning="mmdit", num_dual_blocks=2))
    with pytest.raises(ValueError, match=r"model.num_dual_blocks=1 only applies to model.conditioning=mmdit"):
        DiT(tiny_config(num_dual_blocks=1))
    with pytest.raises(ValueError, match=r"model.max_grid=None must be three positive integers"):
        DiT(tiny_config(pos_embed="learned"))
    with pytest.raises(ValueError, match=r"model.pooled_text_dim=-1"):
        DiT(tiny_config(pooled_text_dim=-1))


def test_default_model_keeps_its_checkpoint_keys():
    """The default (cross_attn, adaln_single, rope, no pooled) model has exactly the pre-variant
    parameter names, so existing checkpoints load; the explicit defaults build the same model."""
    cfg = tiny_config()
    keys = set(DiT(cfg).state_dict())
    per_block = {
        "modulation", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
        *(f"attn.{m}.{p}" for m in ("qkv", "proj") for p in ("weight", "bias")),
        *(f"cross_attn.{m}.{p}" for m in ("q", "kv", "proj") for p in ("weight", "bias")),
        *(f"{a}.{n}.weight" for a in ("attn", "cross_attn") for n in ("q_norm", "k_norm")),
    }
    expected = {
        "x_embedder.proj.weight", "x_embedder.proj.bias", "t_block.1.weight", "t_block.1.bias",
        *(f"t_embedder.mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")),
        *(f"text_proj.{m}.{p}" for m in ("fc1", "fc2") for p in ("weight", "bias")),
        *(f"blocks.{i}.{k}" for i in range(cfg.depth) for k in per_block),
        *(f"final_layer.{k}" for k in ("adaLN_modulation.1.weight", "adaLN_modulation.1.bias", "linear.weight", "linear.bias")),
    }
    assert keys == expected
    torch.manual_seed(0)
    a = DiT(cfg)
    torch.manual_seed(0)
    b = DiT(tiny_config(conditioning="cross_attn", modulation="adaln_single", pos_embed="rope", pooled_text_dim=0))
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), n


def test_adaln_zero_costs_six_d_squared_per_block():
    """Per-block adaLN-Zero adds 6 D^2 + 6 D parameters per block and drops the shared 6 D^2 + 6 D t_block
    and the 6 D tables (the saving adaLN-single was chosen for, see blocks.py)."""
    single, zero = tiny_config(), tiny_config(modulation="adaln_zero")
    D, depth = single.hidden_size, single.depth
    count = lambda cfg: sum(p.numel() for p in DiT(cfg).parameters())  # noqa: E731
    expected = depth * (6 * D * D + 6 * D) - (6 * D * D + 6 * D) - depth * 6 * D
    assert count(zero) - count(single) == expected


def test_mmdit_parameter_count_closed_form():
    """Dual block: two streams of (qkv 3D^2 + proj D^2 + MLP 2 r D^2 + biases); single block: fused
    linear1 D x (3D + rD) and linear2 (D + rD) x D. Checked against the built model."""
    cfg = tiny_config(**VARIANTS["mmdit"], qk_norm=False)
    D, F = cfg.hidden_size, int(cfg.hidden_size * cfg.mlp_ratio)
    model = DiT(cfg)
    stream = (D * 3 * D + 3 * D) + (D * D + D) + (D * F + F) + (F * D + D) + 6 * D  # + adaLN table
    single = (D * (3 * D + F) + 3 * D + F) + ((D + F) * D + D) + 3 * D
    assert sum(p.numel() for p in model.blocks[0].parameters()) == 2 * stream
    assert sum(p.numel() for p in model.blocks[1].parameters()) == single
    assert math.isclose(sum(p.numel() for p in model.blocks[1].parameters()) / (D * D), 3 + 2 * 4, rel_tol=0.1)


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
    from dit_video.diffusion.flow import FlowConfig, RectifiedFlow
    from dit_video.lit_module import DiTModule, OptimConfig
    from dit_video.pipeline import Pipeline

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
    from dit_video.diffusion.sampling import sample

    _, mask_, pooled_ = text_encoder.encode_pooled(["x"])
    with pytest.raises(ValueError, match="needs null_pooled"):
        sample(dit, *text_encoder.encode(["x"]), (1, 4, 3, 4, 4), null_text_emb=text_encoder.encode([""])[0],
               null_text_mask=text_encoder.encode([""])[1], cfg=3.0, steps=1, pooled=pooled_)


def test_demo_variant_yamls_build_and_match_the_demo_size():
    """conf/model/dit_demo_{mmdit,adaln_zero}.yaml: the mmdit demo has the demo's block budget
    (2 dual x 24 D^2 + 4 single x 12 D^2 = 6 x 16 D^2) and adaLN-Zero adds 6 D^2 per block."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from dit_video.run import build_dit_config

    conf = Path(__file__).parent.parent / "conf" / "model"
    counts = {}
    for name in ("dit_demo", "dit_demo_mmdit", "dit_demo_adaln_zero"):
        cfg = build_dit_config(OmegaConf.load(conf / f"{name}.yaml"), in_channels=4, text_dim=384)
        with torch.device("meta"):
            counts[name] = sum(p.numel() for p in DiT(cfg).parameters())
    D, depth = 192, 6
    assert counts["dit_demo_mmdit"] == pytest.approx(counts["dit_demo"], rel=0.01)
    assert counts["dit_demo_adaln_zero"] - counts["dit_demo"] == depth * (6 * D * D + 6 * D) - (6 * D * D + 6 * D) - depth * 6 * D


def test_pooled_text_dim_auto_takes_a_real_clip_encoders_pooled_dim(tmp_path, monkeypatch):
    """A tiny random CLIP text model saved offline (tests/tiny_text_models.py): run.py's
    `pooled_text_dim: auto` takes its pooled_dim, and its pooled vector drives the DiT."""
    from omegaconf import OmegaConf
    from tiny_text_models import save_tokenizer, tiny_model

    from dit_video.encoders.text import HFTextEncoder
    from dit_video.run import ConfigError, build_dit_config

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
