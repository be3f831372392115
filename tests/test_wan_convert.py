"""dit_video.convert on disk: what it refuses (naming the field or tensor), our one-file format, the CLI;
and the Wan fields of DiTConfig at its boundary."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_wan import WAN_21, save_wan

from dit_video.convert import dit_config_from_wan, load_dit_weights, load_wan_folder, save_dit_weights
from dit_video.convert.__main__ import main as convert_main
from dit_video.errors import CheckpointError
from dit_video.model import DiT, DiTConfig

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    """A Wan pipeline-shaped folder: the tiny transformer in transformer/, as the released repos lay it out."""
    root = tmp_path_factory.mktemp("pipeline")
    save_wan(root / "transformer", WAN_21, shard=False)
    return root


def copy_folder(src, dst, edit_config=None, edit_state=None):
    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(edit_config(config) if edit_config else config))
    state = load_file(str(src / "diffusion_pytorch_model.safetensors"))
    save_file(edit_state(state) if edit_state else state, str(dst / "diffusion_pytorch_model.safetensors"))
    return dst


def test_a_pipeline_folder_is_read_through_its_transformer(wan_dir):
    cfg, state = load_wan_folder(wan_dir, text_len=7)
    assert cfg.hidden_size == 32 and cfg.depth == 2 and cfg.text_len == 7 and cfg.axes_dim == (8, 4, 4)
    DiT(cfg).load_state_dict(state)  # strict: every tensor in place


@pytest.mark.parametrize("field, value", [
    ("image_dim", 1280),  # Wan 2.1 I2V's CLIP image cross-attention
    ("added_kv_proj_dim", 32),
    ("qk_norm", "rms_norm"),
    ("_class_name", "WanVACETransformer3DModel"),
    ("window_size", [-1, -1]),  # a key this converter does not know
])
def test_configs_it_cannot_compute_are_refused_naming_the_field(field, value):
    config = {**WAN_21, "_class_name": "WanTransformer3DModel", field: value}
    with pytest.raises(CheckpointError, match=field) as err:
        dit_config_from_wan(config)
    assert "\n" not in str(err.value)


def test_missing_extra_and_misshapen_tensors_are_refused_naming_the_tensor(wan_dir, tmp_path):
    src = wan_dir / "transformer"

    def drop(state):
        del state["blocks.1.attn2.norm_k.weight"]
        return state

    with pytest.raises(CheckpointError, match=r"blocks\.1\.attn2\.norm_k\.weight"):
        load_wan_folder(copy_folder(src, tmp_path / "missing", edit_state=drop))
    with pytest.raises(CheckpointError, match="blocks.1.norm_added_q.weight"):
        load_wan_folder(copy_folder(src, tmp_path / "extra", edit_state=lambda s: {
            **s, "blocks.1.norm_added_q.weight": torch.ones(32)}))
    with pytest.raises(CheckpointError, match=r"blocks\.0\.mlp\.fc1\.weight' has shape"):
        load_wan_folder(copy_folder(src, tmp_path / "shape", edit_config=lambda c: {**c, "ffn_dim": 64}))


def test_folders_without_config_or_safetensors_are_refused(wan_dir, tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_wan_folder(tmp_path)
    (tmp_path / "config.json").write_text((wan_dir / "transformer" / "config.json").read_text())
    torch.save({}, tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled .bin weights are not read"):
        load_wan_folder(tmp_path)


def test_cli_writes_our_format_that_loads_back(wan_dir, tmp_path, capsys):
    out = tmp_path / "wan.safetensors"
    convert_main([str(wan_dir), str(out), "--text-len", "11"])
    assert "parameters" in capsys.readouterr().out
    cfg, state, meta = load_dit_weights(out)
    want_cfg, want_state = load_wan_folder(wan_dir, text_len=11)
    assert cfg == want_cfg and meta["converted_from"] == str(wan_dir)
    assert set(state) == set(want_state) and all(torch.equal(state[k], want_state[k]) for k in state)
    with pytest.raises(SystemExit, match="no config.json"):
        convert_main([str(tmp_path), str(tmp_path / "x.safetensors")])


def test_our_format_refuses_files_without_a_config_or_with_another_shape(tmp_path):
    cfg = DiTConfig(in_channels=4, text_dim=8, hidden_size=32, depth=1, num_heads=2)
    state = DiT(cfg).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "bare.safetensors"))
    with pytest.raises(CheckpointError, match="no dit_video config"):
        load_dit_weights(tmp_path / "bare.safetensors")
    state["final_layer.linear.bias"] = torch.zeros(3)
    save_dit_weights(state, cfg, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match=r"final_layer\.linear\.bias' has shape \(3,\)"):
        load_dit_weights(tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_dit_weights(tmp_path / "nothing.safetensors")


# ---------------------------------------------------------------- DiTConfig's Wan fields


@pytest.mark.parametrize("overrides, field", [
    (dict(qk_norm=False, qk_norm_across_heads=True), "qk_norm_across_heads"),
    (dict(text_len=-1), "text_len"),
    (dict(final_modulation="tables"), "final_modulation"),
    (dict(conditioning="mmdit", text_len=8), "text_len"),
    (dict(conditioning="mmdit", qk_norm_across_heads=True), "qk_norm_across_heads"),
])
def test_wan_fields_are_validated_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"model.{field}"):
        DiTConfig(in_channels=4, text_dim=8, hidden_size=32, depth=2, num_heads=2, **overrides).validate()


def test_text_longer_than_text_len_is_refused_and_padding_never_matters():
    cfg = DiTConfig(in_channels=4, text_dim=8, hidden_size=32, depth=1, num_heads=2, text_len=5,
                    qk_norm_across_heads=True, final_modulation="table")
    torch.manual_seed(0)
    dit = DiT(cfg).eval()
    for p in dit.parameters():  # zero-initialised gates and heads would hide the text path
        torch.nn.init.normal_(p, std=0.3)
    x, t = torch.randn(1, 4, 1, 4, 4), torch.rand(1)
    with pytest.raises(ValueError, match="model.text_len=5"):
        dit(x, t, torch.randn(1, 6, 8))
    text, mask = torch.randn(1, 4, 8), torch.tensor([[True, True, False, False]])
    garbage = torch.where(mask[..., None], text, torch.randn(1, 4, 8))
    with torch.no_grad():
        short = dit(x, t, text[:, :2])  # 2 real tokens, padded to 5 by the model
        assert torch.equal(dit(x, t, text, mask), short) and torch.equal(dit(x, t, garbage, mask), short)
        assert not torch.equal(dit(x, t, text), short)  # unmasked tokens 3-4 are real: they count
