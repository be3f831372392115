"""Pretrained diffusers VAE adapters: a tiny random model of each class is saved with save_pretrained
and loaded back offline through our adapter; shapes, frame-count rules and the latent
normalisation (as the diffusers pipelines apply it) are checked in both directions."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before diffusers/huggingface_hub read it at import

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

diffusers = pytest.importorskip("diffusers")

from dit_video.encoders.base import VideoAutoencoder  # noqa: E402
from dit_video.encoders.pretrained_vae import (  # noqa: E402
    FAMILIES,
    PretrainedVAEConfig,
    load_pretrained_vae,
    vae_problem,
)

ROOT = Path(__file__).resolve().parents[1]
C = 4  # latent channels of every tiny model
SIZE = 32


def _tiny_models() -> dict[str, torch.nn.Module]:
    """One tiny random model per kind, with the released models' compression factors and
    non-trivial normalisation constants (so a missing or inverted scale shows)."""
    torch.manual_seed(0)
    ltx = diffusers.AutoencoderKLLTXVideo(
        block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1,) * 5,
        decoder_layers_per_block=(1,) * 5, latent_channels=C, patch_size=4, scaling_factor=0.9)
    ltx.latents_mean.copy_(torch.randn(C))  # LTX keeps its statistics as weight buffers
    ltx.latents_std.copy_(torch.rand(C) + 0.5)
    return {
        "diffusers_image": diffusers.AutoencoderKL(
            block_out_channels=(8,) * 4, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=C, norm_num_groups=4,
            sample_size=SIZE, scaling_factor=0.5, shift_factor=0.1),
        "cogvideox": diffusers.AutoencoderKLCogVideoX(
            block_out_channels=(8,) * 4, down_block_types=("CogVideoXDownBlock3D",) * 4,
            up_block_types=("CogVideoXUpBlock3D",) * 4, layers_per_block=1, latent_channels=C, norm_num_groups=4,
            scaling_factor=0.7),
        "wan": diffusers.AutoencoderKLWan(
            base_dim=8, z_dim=C, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
            latents_mean=torch.randn(C).tolist(), latents_std=(torch.rand(C) + 0.5).tolist()),
        "hunyuan_video": diffusers.AutoencoderKLHunyuanVideo(
            block_out_channels=(8,) * 4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
            up_block_types=("HunyuanVideoUpBlock3D",) * 4, layers_per_block=1, latent_channels=C, norm_num_groups=4,
            mid_block_add_attention=False, scaling_factor=0.4),
        "ltx_video": ltx,
    }


# (temporal_factor, spatial_factor) of the released models, which the tiny ones keep.
FACTORS = {"diffusers_image": (1, 8), "cogvideox": (4, 8), "wan": (4, 8), "hunyuan_video": (4, 8),
           "ltx_video": (8, 32)}
GOOD_FRAMES = {"diffusers_image": 6, "cogvideox": 9, "wan": 9, "hunyuan_video": 5, "ltx_video": 9}
BAD_FRAMES = {"cogvideox": 5, "wan": 6, "hunyuan_video": 8, "ltx_video": 5}  # cogvideox 5 = 1 + 4k, k odd


def _pipeline_normalise(kind: str, model, z: torch.Tensor) -> torch.Tensor:
    """The diffusers pipelines' own latent normalisation, written out per model."""
    c = model.config
    per_channel = lambda v: torch.as_tensor(v, dtype=torch.float32).view(1, -1, 1, 1, 1)  # noqa: E731
    if kind == "diffusers_image":  # SD3 / FLUX pipelines
        return (z - c.shift_factor) * c.scaling_factor
    if kind in ("cogvideox", "hunyuan_video"):
        return z * c.scaling_factor
    if kind == "wan":  # WanPipeline: latents = (z - mean) * (1 / std)
        return (z - per_channel(c.latents_mean)) / per_channel(c.latents_std)
    # LTXPipeline._normalize_latents
    return (z - per_channel(model.latents_mean)) * c.scaling_factor / per_channel(model.latents_std)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    root = tmp_path_factory.mktemp("pretrained_vaes")
    out = {}
    for kind, model in _tiny_models().items():
        model.save_pretrained(root / kind)
        out[kind] = (root / kind, model.eval())
    return out


def _load(saved, kind: str, **fields):
    return load_pretrained_vae(PretrainedVAEConfig(kind=kind, path=str(saved[kind][0]), **fields))


def _video(num_frames: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, num_frames, SIZE, SIZE, generator=g) * 2 - 1  # [B, 3, T, H, W] in [-1, 1]


def _raw_mode(kind: str, model, video: torch.Tensor) -> torch.Tensor:
    """The reference raw latents straight from diffusers, with time folded by hand for image VAEs."""
    with torch.no_grad():
        if kind == "diffusers_image":
            b, _, t = video.shape[:3]
            z = model.encode(video.transpose(1, 2).flatten(0, 1)).latent_dist.mode()  # [B*T, C, H', W']
            return z.unflatten(0, (b, t)).transpose(1, 2)  # [B, C, T, H', W']
        return model.encode(video).latent_dist.mode()


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_adapter_loads_offline_and_matches_the_model(saved, kind):
    folder, model = saved[kind]
    vae = _load(saved, kind)
    assert isinstance(vae, VideoAutoencoder)
    assert (vae.temporal_factor, vae.spatial_factor) == FACTORS[kind] and vae.latent_channels == C
    video = _video(GOOD_FRAMES[kind])
    latents = vae.encode(video)
    # latent_shape (what the DiT is built for) is what encode really returns
    assert latents.shape == (2, C, *vae.latent_shape(GOOD_FRAMES[kind], SIZE, SIZE))
    # scaling applied going in: the pipeline's normalisation of the model's posterior mode
    expected = _pipeline_normalise(kind, model, _raw_mode(kind, model, video))
    torch.testing.assert_close(latents, expected, rtol=1e-5, atol=1e-5)
    # ... and undone going out: decode(latents) is the model's decode of the raw latents
    decoded = vae.decode(latents)
    assert decoded.shape == video.shape  # every frame comes back
    with torch.no_grad():
        raw = _raw_mode(kind, model, video)
        if kind == "diffusers_image":
            ref = model.decode(raw.transpose(1, 2).flatten(0, 1)).sample.unflatten(0, (2, -1)).transpose(1, 2)
        else:
            ref = model.decode(raw).sample
    torch.testing.assert_close(decoded, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", sorted(BAD_FRAMES))
def test_frame_count_rules_are_clear_errors(saved, kind):
    vae = _load(saved, kind)
    tf, sf = FACTORS[kind]
    with pytest.raises(ValueError, match=f"num_frames={BAD_FRAMES[kind]}") as err:
        vae.encode(_video(BAD_FRAMES[kind], batch=1))
    assert f"{tf}" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match=f"height={sf + sf // 2}.*spatial_factor={sf}"):
        vae.latent_shape(GOOD_FRAMES[kind], sf + sf // 2, SIZE)


def test_cogvideox_rule_matches_what_its_decoder_does(saved):
    """Why CogVideoX needs k even: 5 frames encode to 2 latent frames, which decode to 8 frames."""
    _, model = saved["cogvideox"]
    with torch.no_grad():
        z = model.encode(_video(5, batch=1)).latent_dist.mode()  # [1, C, 2, H', W']
        assert z.shape[2] == 2 and model.decode(z).sample.shape[2] == 8


def test_image_vae_takes_any_frame_count_and_chunks_exactly(saved):
    whole, chunked = _load(saved, "diffusers_image"), _load(saved, "diffusers_image", chunk_frames=2)
    video = _video(5)
    assert whole.latent_shape(5, SIZE, SIZE) == (5, SIZE // 8, SIZE // 8)
    latents = whole.encode(video)
    torch.testing.assert_close(chunked.encode(video), latents, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked.decode(latents), whole.decode(latents), rtol=1e-5, atol=1e-6)


def test_ltx_timestep_conditioned_decoder_is_told_decode_timestep(tmp_path):
    torch.manual_seed(0)
    model = diffusers.AutoencoderKLLTXVideo(
        block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4, layers_per_block=(1,) * 5,
        decoder_layers_per_block=(1,) * 5, latent_channels=C, patch_size=4, timestep_conditioning=True).eval()
    model.save_pretrained(tmp_path / "ltx")
    vae = load_pretrained_vae(PretrainedVAEConfig(kind="ltx_video", path=str(tmp_path / "ltx"), decode_timestep=0.05))
    latents = vae.encode(_video(9, batch=1))  # [1, C, 2, 1, 1]; default stats: raw latents
    with torch.no_grad():
        ref = model.decode(latents, torch.tensor([0.05])).sample
        other = model.decode(latents, torch.tensor([0.5])).sample
    torch.testing.assert_close(vae.decode(latents), ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ref, other)  # the timestep matters, so the check above can fail


def test_own_latent_stats_replace_the_models_normalisation(saved):
    folder, model = saved["wan"]
    mean, std = [0.5, -0.25, 1.0, 0.0], [2.0, 0.5, 1.0, 4.0]
    vae = _load(saved, "wan", latents_mean=mean, latents_std=std)
    video = _video(5)
    raw = _raw_mode("wan", model, video)
    m, s = torch.tensor(mean).view(1, -1, 1, 1, 1), torch.tensor(std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(vae.encode(video), (raw - m) / s, rtol=1e-5, atol=1e-5)
    assert vae.identity() != _load(saved, "wan").identity()  # a latent cache must tell them apart


def test_sampling_is_an_option_and_seeded(saved):
    vae = _load(saved, "hunyuan_video", sample=True)
    video = _video(5)
    a = vae.encode(video, torch.Generator().manual_seed(1))
    b = vae.encode(video, torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, _load(saved, "hunyuan_video").encode(video))  # mode is the default


def test_bfloat16_weights_return_float32_latents_close_to_float32(saved):
    video = _video(5)
    full = _load(saved, "hunyuan_video").encode(video)
    half = _load(saved, "hunyuan_video", dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    latents = half.encode(video)
    assert latents.dtype == torch.float32
    assert (latents - full).abs().max() < 0.05 * full.abs().max()  # bf16 keeps ~3 significant digits
    assert half.decode(latents).dtype == torch.float32


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_identity_is_stable_json_and_names_the_weights(saved, kind):
    a, b = _load(saved, kind), _load(saved, kind)
    ida = a.identity()
    assert json.loads(json.dumps(ida)) == ida == b.identity()
    assert ida["name"] == f"diffusers.{FAMILIES[kind].class_name}" and ida["weights"] == str(saved[kind][0])
    assert len(ida["sha256"]) == 64 and ida["config"]["kind"] == kind
    assert "_name_or_path" not in ida["config"]["model"]  # where the folder lives does not change latents
    tiled = _load(saved, kind, model_tiling=True)
    assert tiled.model.use_tiling and tiled.identity()["config"] != ida["config"]


def test_missing_or_wrong_folders_name_vae_path_and_the_fix(saved, tmp_path):
    node = {"kind": "wan", "path": str(tmp_path / "nowhere")}
    msg = vae_problem(node)
    assert msg.startswith("vae.path") and "config.json" in msg and "save_pretrained" in msg
    assert vae_problem({"kind": "wan", "path": None}).startswith("vae.path is not set")
    # a folder with another class: names vae.kind
    msg = vae_problem({"kind": "cogvideox", "path": str(saved["wan"][0])})
    assert "AutoencoderKLWan" in msg and "vae.kind" in msg
    # config.json but no safetensors weights (incomplete copy)
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "config.json").write_text((saved["wan"][0] / "config.json").read_text())
    msg = vae_problem({"kind": "wan", "path": str(tmp_path / "partial")})
    assert "no .safetensors" in msg and "vae.path" in msg
    assert vae_problem({"kind": "wan", "path": str(saved["wan"][0])}) is None
    # a whole pipeline folder: the fix is vae.subfolder, and it then loads
    pipe = tmp_path / "pipeline"
    (pipe / "vae").mkdir(parents=True)
    (pipe / "model_index.json").write_text("{}")
    for f in saved["wan"][0].iterdir():
        (pipe / "vae" / f.name).write_bytes(f.read_bytes())
    assert "add vae.subfolder=vae" in vae_problem({"kind": "wan", "path": str(pipe)})
    assert vae_problem({"kind": "wan", "path": str(pipe), "subfolder": "vae"}) is None
    with pytest.raises(ValueError, match="vae.chunk_frames=4 applies to image VAEs only"):
        PretrainedVAEConfig(kind="wan", chunk_frames=4).validate()
    with pytest.raises(ValueError, match=r"vae.latent_channels=16 but .* has 4; set vae.latent_channels=4"):
        _load(saved, "wan", latent_channels=16)
    with pytest.raises(ValueError, match="vae.kind='wan2'"):
        PretrainedVAEConfig(kind="wan2").validate()
    with pytest.raises(ValueError, match="latents_mean and vae.latents_std"):
        PretrainedVAEConfig(kind="wan", latents_mean=[0.0] * 4).validate()
    with pytest.raises(ValueError, match=r"vae.latents_mean has 2 entries .* latent_channels=4"):
        _load(saved, "wan", latents_mean=[0.0, 0.0], latents_std=[1.0, 1.0])


@pytest.mark.parametrize("name", ["sd_image", "cogvideox", "wan", "hunyuan_video", "ltx_video"])
def test_vae_yaml_files_parse_and_fail_clearly_until_given_a_path(name, saved):
    from dit_video.build import build_vae
    from dit_video.errors import ConfigError

    node = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "vae" / f"{name}.yaml"))
    cfg = PretrainedVAEConfig.from_node(node)
    assert cfg.path is None and not cfg.sample
    assert vae_problem(node).startswith("vae.path is not set")
    with pytest.raises(ConfigError, match="vae.path is not set"):
        build_vae(OmegaConf.create({"vae": node}))
    # pointed at a tiny model of the same class (factors overridden), the same group loads
    node |= {"path": str(saved[cfg.kind][0]), "latent_channels": C}
    assert build_vae(OmegaConf.create({"vae": node})).temporal_factor == cfg.temporal_factor


def test_preflight_and_train_name_the_vae_problem(tmp_path):
    from tiny_run import compose_train

    from dit_video.errors import ConfigError
    from dit_video.run import preflight

    cfg = compose_train("+experiment=demo", "vae=wan", f"data.shards={tmp_path}/none-*.tar", f"vae.path={tmp_path}")
    with pytest.raises(ConfigError, match=r"vae.path: no config.json in .*AutoencoderKLWan") as err:
        preflight(cfg)
    assert "\n" not in str(err.value)
    cfg = compose_train("+experiment=vae_demo", "vae=wan")
    with pytest.raises(ConfigError, match="task=vae trains our causal VAE; vae.kind=wan"):
        preflight(cfg)


def test_an_adapter_vae_drives_dit_training_and_sampling(tmp_path):
    """Two DiT steps through the real trainer on a tiny Wan adapter, then a sample decoded by it."""
    from tiny_run import TINY_DATA, TINY_DIT, compose_train

    from data_prep.make_demo import make_demo
    from dit_video.checkpoint.load import load_checkpoint
    from dit_video.pipeline import Pipeline
    from dit_video.run import train

    make_demo(tmp_path / "clips", num_clips=8, val_clips=0, shard_size=8, seed=0)  # 32x32, 17 frames
    torch.manual_seed(0)
    diffusers.AutoencoderKLWan(base_dim=8, z_dim=C, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True], latents_mean=[0.1] * C,
                               latents_std=[0.5] * C).save_pretrained(tmp_path / "wan")
    run = tmp_path / "run"
    train(compose_train("+experiment=demo", "vae=wan", f"vae.path={tmp_path / 'wan'}", f"vae.latent_channels={C}",
                        f"data.shards={tmp_path}/clips/train-*.tar", "data.val_shards=null", *TINY_DATA, *TINY_DIT,
                        "data.batch_size=4", "eval=off", "trainer.max_steps=2", "trainer.log_every_n_steps=1",
                        f"run_dir={run}", "trainer.enable_model_summary=false"))
    meta = load_checkpoint(run / "checkpoints" / "last.ckpt")["dit_video"]
    assert meta["vae"]["name"] == "wan_vae" and meta["latent_shape"] == [5, 4, 4]
    assert meta["dit_config"]["in_channels"] == C
    clips = Pipeline.from_checkpoint(run / "checkpoints" / "last.ckpt").generate(["a red square"], steps=1)
    assert clips.shape == (1, 17, 32, 32, 3) and clips.dtype == np.uint8
