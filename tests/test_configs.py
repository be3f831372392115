"""Every config composes; bad configs and missing inputs fail with one clear line."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

import dit_video.build  # noqa: F401  (registers the ${minilm_path:} resolver)
from dit_video.errors import ConfigError
from dit_video.run import preflight

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_resolves(experiment):
    cfg = compose_train(f"+experiment={experiment}")
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert cfg.name == experiment
    assert cfg.task in ("dit", "vae")


def test_expected_experiments_exist():
    assert {"demo", "vae_demo", "dit_256"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("model", sorted(p.stem for p in (CONF / "model").glob("*.yaml")))
def test_every_model_config_builds_a_valid_dit_config(model):
    from dit_video.build import build_dit_config

    cfg = compose_train(f"model={model}")
    dit_cfg = build_dit_config(cfg.model, in_channels=16, text_dim=4096)
    assert dit_cfg.in_channels == 16 and dit_cfg.text_dim == 4096  # filled from the encoders, not YAML
    assert dit_cfg.head_dim * dit_cfg.num_heads == dit_cfg.hidden_size
    grid = tuple(4 * p for p in dit_cfg.patch_size)
    dit_cfg.validate(grid)  # a latent grid the patch size divides passes; one it does not, fails
    with pytest.raises(ValueError, match="patch_size"):
        dit_cfg.validate((grid[0], grid[1] + 1, grid[2]) if dit_cfg.patch_size[1] > 1 else (grid[0], grid[1], grid[2] + 1))


def test_model_yaml_files_match_their_presets():
    from dit_video.build import build_dit_config
    from dit_video.model import DIT_PRESETS

    for path in (CONF / "model").glob("*.yaml"):
        node = OmegaConf.load(path)
        preset = node.preset
        built = build_dit_config(node, in_channels=4, text_dim=384)
        for key, value in DIT_PRESETS[preset].items():
            got = getattr(built, key)
            assert (tuple(got) if isinstance(got, (list, tuple)) else got) == (
                tuple(value) if isinstance(value, (list, tuple)) else value
            ), f"{path.name}: {key}"


def test_unknown_experiment_is_a_clear_error():
    with pytest.raises(MissingConfigException, match="experiment/no_such_experiment"):
        compose_train("+experiment=no_such_experiment")


def test_unknown_field_names_the_group_and_the_field():
    from dit_video.build import build_data

    cfg = compose_train("+data.batchsize=3")
    with pytest.raises(ConfigError, match=r"data: unknown field\(s\) \['batchsize'\]"):
        build_data(cfg)


def test_missing_shards_fail_fast_with_the_fix(tmp_path):
    cfg = compose_train("+experiment=demo", f"data.shards={tmp_path}/nothing-*.tar", f"vae.path={tmp_path}")
    with pytest.raises(ConfigError) as err:
        preflight(cfg)
    msg = str(err.value)
    assert "data.shards" in msg and "make_demo" in msg and "\n" not in msg
    assert "vae.path" in msg and "vae_demo" in msg


def test_dit_256_fails_fast_on_this_machine_naming_what_is_missing():
    proc = subprocess.run(
        [sys.executable, "train.py", "+experiment=dit_256", "hydra.run.dir=/tmp/dit_video_test_dit256"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr  # one line, no traceback
    msg = lines[0]
    assert msg.startswith("error: run 'dit_256' cannot start")
    for what in ("data.shards", "vae.path", "text_encoder.path", "CUDA GPU"):
        assert what in msg, what
    # 256p video has to come from the user's videos: the 32x32 synthetic set is not the fix
    assert "data_prep.ingest --folder" in msg and "--max-size 256" in msg and "make_demo" not in msg


def test_dit_256_is_about_one_billion_parameters_at_256px_33_frames_bf16():
    import torch

    from dit_video.build import build_dit_config
    from dit_video.model import DiT

    cfg = compose_train("+experiment=dit_256")
    assert list(cfg.data.size) == [256, 256] and cfg.data.num_frames == 33
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.devices == 8
    dit_cfg = build_dit_config(cfg.model, in_channels=cfg.vae.latent_channels, text_dim=4096)
    with torch.device("meta"):
        n = sum(p.numel() for p in DiT(dit_cfg).parameters())
    assert 0.9e9 < n < 1.4e9, n
    # 33 frames through a 4x causal VAE at 8x spatial: a 9 x 32 x 32 latent grid
    dit_cfg.validate((9, 32, 32))
