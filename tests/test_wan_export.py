"""python -m dit_video.export --format diffusers: folders diffusers loads, whose outputs equal ours;
a converted Wan comes back bit for bit; DiTs diffusers' Wan cannot compute are refused naming the field."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_wan import WAN_22, assert_close, load_wan, padded_text, save_wan, wan_forward

from dit_video.convert import load_wan_folder, save_diffusers_folder, save_dit_weights
from dit_video.errors import CheckpointError
from dit_video.export import export, main
from dit_video.model import DiT, DiTConfig
from dit_video.model.config import wan_rope_axes_dim

pytest.importorskip("diffusers")

# One of our own DiTs in the Wan layout (as a from-scratch run would configure it), head_dim 16.
OURS = dict(in_channels=4, text_dim=12, hidden_size=48, depth=2, num_heads=3, mlp_ratio=2.5, patch_size=(1, 2, 2),
            freq_dim=32, qk_norm_across_heads=True, final_modulation="table", text_len=6,
            rope_axes_dim=wan_rope_axes_dim(16))


def random_dit(cfg: DiTConfig) -> DiT:
    """A DiT whose every parameter is random (zero-initialised gates and heads would hide most of the model)."""
    torch.manual_seed(1)
    dit = DiT(cfg).eval()
    with torch.no_grad():
        for p in dit.parameters():
            p.copy_(torch.randn(p.shape) * 0.2)
    return dit


def test_our_wan_layout_dit_exports_to_a_folder_diffusers_runs_identically(tmp_path):
    dit = random_dit(DiTConfig(**OURS))
    src = save_dit_weights(dit.state_dict(), dit.cfg, tmp_path / "ours.safetensors")
    out, cfg = export(src, tmp_path / "diffusers")
    assert cfg == dit.cfg and (out / "config.json").is_file()
    wan = load_wan(out)
    gen = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, 4, 3, 4, 6, generator=gen), torch.tensor([0.1, 0.8])
    text, mask = torch.randn(2, 5, 12, generator=gen), torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]).bool()
    with torch.no_grad():
        ours, theirs = dit(x, t, text, mask), wan_forward(wan, x, t, padded_text(text, mask, 6))
    assert theirs.abs().mean() > 0.1
    assert_close(ours, theirs, "output")
    # ... and a bfloat16 export holds bfloat16 tensors, the float32 ones rounded, which diffusers loads
    out16, _ = export(src, tmp_path / "bf16", dtype="bfloat16")
    stored = load_file(str(out16 / "diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in stored.values()} == {torch.bfloat16}
    loaded = load_wan(out16).state_dict()
    assert all(torch.equal(loaded[k], v.to(torch.bfloat16).to(loaded[k].dtype)) for k, v in wan.state_dict().items())


def test_a_converted_wan_exports_back_bit_for_bit_and_shards_like_diffusers(tmp_path):
    """diffusers folder -> ours -> diffusers folder (sharded on the way out): every tensor unchanged."""
    src = save_wan(tmp_path / "wan", WAN_22, shard=False)
    cfg, state = load_wan_folder(src, text_len=9)
    out = save_diffusers_folder(state, cfg, tmp_path / "back", shard_bytes=30_000)
    index = json.loads((out / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    original, back = load_wan(src).state_dict(), load_wan(out).state_dict()
    assert set(original) == set(back) and all(torch.equal(original[k], back[k]) for k in original)
    config, back_config = (json.loads((f / "config.json").read_text()) for f in (src, out))
    assert {k: v for k, v in config.items() if not k.startswith("_")} == {
        k: v for k, v in back_config.items() if not k.startswith("_")}


@pytest.mark.parametrize("overrides, field", [
    (dict(qk_norm_across_heads=False), "qk_norm_across_heads"),  # our default: QK norm per head
    (dict(final_modulation="linear"), "final_modulation"),
    (dict(modulation="adaln_zero"), "modulation"),
    (dict(conditioning="mmdit", qk_norm_across_heads=False, text_len=0), "conditioning"),
    (dict(pos_embed="sincos"), "pos_embed"),
    (dict(rope_axes_dim=None), "rope_axes_dim"),  # our automatic split (4, 6, 6), Wan's is (8, 4, 4)
    (dict(time_scale=1.0), "time_scale"),
    (dict(text_len=0), "text_len"),
])
def test_dits_diffusers_wan_cannot_compute_are_refused_naming_the_field(overrides, field, tmp_path):
    cfg = DiTConfig(**{**OURS, **overrides})
    with pytest.raises(CheckpointError, match=f"model.{field}=") as err:
        save_diffusers_folder(DiT(cfg).state_dict(), cfg, tmp_path / "out")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_cli_arguments_and_existing_outputs(tmp_path, capsys):
    dit = random_dit(DiTConfig(**OURS))
    src = save_dit_weights(dit.state_dict(), dit.cfg, tmp_path / "ours.safetensors")
    main([f"ckpt={src}", f"out={tmp_path / 'd'}", "--format", "diffusers"])
    assert "max_sequence_length=6" in capsys.readouterr().out  # a text_len other than Wan's 512 is pointed out
    with pytest.raises(SystemExit, match="exists and is not empty"):
        main([f"ckpt={src}", f"out={tmp_path / 'd'}"])
    with pytest.raises(SystemExit):
        main([f"out={tmp_path / 'e'}"])  # ckpt= missing
    assert "ckpt= is required" in capsys.readouterr().err
    main([f"ckpt={src}", f"out={tmp_path / 'copy.safetensors'}", "--format", "safetensors"])
    with pytest.raises(SystemExit, match="weights='best'"):
        main([f"ckpt={tmp_path / 'run'}", f"out={tmp_path / 'f'}", "weights=best"])


def test_a_from_scratch_training_run_in_the_wan_layout_exports_to_diffusers(tmp_path_factory, tmp_path):
    """Our own run, not converted weights: the demo recipe with the Wan layout fields, 2 steps through
    train(); `export ckpt=<run>` gives a folder diffusers runs as our DiT with the run's EMA weights."""
    from tiny_run import TINY_DATA, compose_train, tiny_run

    from dit_video.convert.wan import dit_to_wan_state
    from dit_video.export import dit_weights
    from dit_video.run import train

    world = tiny_run(tmp_path_factory)
    layout = ["model.qk_norm=true", "+model.qk_norm_across_heads=true", "+model.cross_attn_norm=true",
              "+model.final_modulation=table", "+model.text_len=16", "model.freq_dim=32",
              f"model.rope_axes_dim=[{','.join(map(str, wan_rope_axes_dim(32)))}]"]
    threads = torch.get_num_threads()
    try:
        train(compose_train("+experiment=demo", f"data.shards={world['shards']}/train-*.tar", "data.val_shards=null",
                            *TINY_DATA, "model.depth=2", "model.hidden_size=64", "model.num_heads=2", *layout,
                            f"vae.path={world['vae']}", "trainer.max_steps=2", "eval.samples.every_n_steps=0",
                            f"run_dir={tmp_path / 'run'}", "trainer.enable_model_summary=false"))
    finally:
        torch.set_num_threads(threads)
    out, cfg = export(tmp_path / "run", tmp_path / "diffusers")
    _, state, _ = dit_weights(tmp_path / "run", "ema")
    dit = DiT(cfg).eval()
    dit.load_state_dict(state)
    wan = load_wan(out)
    gen = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, cfg.in_channels, 2, 4, 4, generator=gen), torch.tensor([0.2, 0.9])
    text, mask = torch.randn(2, 7, cfg.text_dim, generator=gen), torch.tensor([[1] * 3 + [0] * 4, [1] * 7]).bool()
    with torch.no_grad():
        ours, theirs = dit(x, t, text, mask), wan_forward(wan, x, t, padded_text(text, mask, cfg.text_len))
    assert cfg.qk_norm_across_heads and cfg.final_modulation == "table"
    assert_close(ours, theirs, "output")  # small after 2 steps (zero-initialised gates): the weights below carry the test
    loaded, exported = wan.state_dict(), dit_to_wan_state(state, cfg)
    assert exported.keys() == loaded.keys() and all(torch.equal(loaded[k], v) for k, v in exported.items())  # the run's EMA
