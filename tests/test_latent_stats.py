"""data_prep.latent_stats: per-channel stats over a tiny shard set equal a direct computation over
all latents; written into our CausalVAE (or pasted into an adapter's config) they make encode()
give zero-mean, unit-std latents."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from data_prep.latent_stats import ChannelStats, main  # noqa: E402
from data_prep.make_demo import make_demo  # noqa: E402
from dit_video.data.clips import VideoShardDataset  # noqa: E402
from dit_video.encoders.base import clip_to_video  # noqa: E402
from dit_video.encoders.causal_vae import CausalVAE, CausalVAEConfig, load_vae, save_vae  # noqa: E402
from dit_video.files import sha256_file  # noqa: E402

T, SIZE, FPS = 9, 16, 8.0
N_CLIPS = 10
VAE_FIELDS = dict(base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, temporal_factor=4, spatial_factor=4)
CLIP_ARGS = ["--num-frames", str(T), "--size", str(SIZE), str(SIZE), "--fps", str(FPS), "--batch-size", "4"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("stats_clips")
    make_demo(root, num_clips=N_CLIPS, val_clips=0, size=SIZE, frames=T, shard_size=4, seed=0)
    return sorted(str(p) for p in root.glob("train-*.tar"))


def _all_clips(shards) -> torch.Tensor:
    """Every clip as the tool reads it (centre crop, seed 0): uint8 [N, T, H, W, 3]."""
    data = VideoShardDataset(shards, T, FPS, (SIZE, SIZE), crop="center", seed=0, infinite=False, batch_size=64,
                             batched=True, rank=0, world_size=1)
    return torch.cat([b["clip"] for b in data])


def _causal_vae(folder: Path) -> Path:
    torch.manual_seed(0)
    cfg = CausalVAEConfig(**VAE_FIELDS)
    # a deliberately wrong normalisation, so the test sees the tool replace it
    save_vae(folder, CausalVAE(cfg), cfg, torch.full((cfg.latent_channels,), 3.0), torch.full((cfg.latent_channels,), 7.0))
    return folder


def _per_channel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    v = x.double().transpose(0, 1).flatten(1)  # [C, N]
    return v.mean(dim=1), v.std(dim=1, unbiased=False)


def test_channel_stats_merge_equals_one_pass_even_with_a_large_offset():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, 5, 4, generator=g, dtype=torch.float64) * torch.tensor([1e-3, 1.0, 10.0]).view(1, 3, 1, 1)
    x = x + torch.tensor([1e4, -2.0, 0.0], dtype=torch.float64).view(1, 3, 1, 1)  # mean >> std in channel 0
    acc = ChannelStats(3)
    for part in x.split([1, 4, 2]):  # uneven batches
        acc.update(part)
    mean, std = _per_channel(x)
    torch.testing.assert_close(acc.mean, mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(acc.std, std, rtol=1e-9, atol=0)
    assert acc.count == 7 * 5 * 4


def test_causal_vae_stats_match_direct_computation_and_normalise_it(shards, tmp_path):
    folder = _causal_vae(tmp_path / "vae")
    before = sha256_file(folder / "vae.safetensors")
    out = tmp_path / "stats.json"
    result = main(["--vae-config", "causal_demo", f"vae.path={folder}", "--shards", *shards, "--out", str(out),
                   *CLIP_ARGS])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["samples"] == N_CLIPS and result["written_to"] == str(folder)
    # direct: every clip through the VAE's encoder, all latents at once
    clips = _all_clips(shards)
    assert clips.shape[0] == N_CLIPS
    vae = CausalVAE(CausalVAEConfig(**VAE_FIELDS))
    vae.load_state_dict(load_vae(folder).vae.state_dict())
    with torch.no_grad():
        raw = vae.eval().encode(clip_to_video(clips)).mean  # [N, C, T', H', W']
    mean, std = _per_channel(raw)
    assert result["values_per_channel"] == raw[:, 0].numel()
    torch.testing.assert_close(torch.tensor(result["latents_mean"], dtype=torch.float64), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(result["latents_std"], dtype=torch.float64), std, rtol=1e-5, atol=1e-6)
    # written into the VAE: a fresh load now encodes to ~N(0, 1) per channel
    assert sha256_file(folder / "vae.safetensors") == result["written_sha256"] != before == result["vae"]["sha256"]
    latents = load_vae(folder).encode(clip_to_video(clips))
    m, s = _per_channel(latents)
    torch.testing.assert_close(m, torch.zeros_like(m), rtol=0, atol=1e-4)
    torch.testing.assert_close(s, torch.ones_like(s), rtol=1e-4, atol=0)


def test_max_samples_and_no_write(shards, tmp_path):
    folder = _causal_vae(tmp_path / "vae")
    before = sha256_file(folder / "vae.safetensors")
    result = main(["--vae-config", "conf/vae/causal_demo.yaml", f"vae.path={folder}", "--shards", *shards,
                   "--out", str(tmp_path / "s.json"), "--max-samples", "5", "--no-write", *CLIP_ARGS])
    assert result["samples"] == 5 and result["written_to"] is None
    assert sha256_file(folder / "vae.safetensors") == before
    raw = (load_vae(folder).encode(clip_to_video(_all_clips(shards)[:5])) / 7.0 + 3.0)  # undo shift 3, scale 7
    mean, _ = _per_channel(raw)
    torch.testing.assert_close(torch.tensor(result["latents_mean"], dtype=torch.float64), mean, rtol=1e-4, atol=1e-5)


def test_adapter_gets_a_yaml_snippet_that_normalises_it(shards, tmp_path, capsys):
    diffusers = pytest.importorskip("diffusers")
    from omegaconf import OmegaConf

    from dit_video.build import build_vae

    torch.manual_seed(0)
    model = diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1], num_res_blocks=1,
                                       temperal_downsample=[True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    model.save_pretrained(tmp_path / "wan")
    before = sorted((p.name, sha256_file(p)) for p in (tmp_path / "wan").iterdir())
    overrides = [f"vae.path={tmp_path / 'wan'}", "vae.latent_channels=4", "vae.spatial_factor=4"]
    main(["--vae-config", "wan", *overrides, "--shards", *shards, "--out", str(tmp_path / "s.json"), *CLIP_ARGS])
    assert sorted((p.name, sha256_file(p)) for p in (tmp_path / "wan").iterdir()) == before  # nothing written
    printed = capsys.readouterr().out
    snippet = yaml.safe_load(printed[printed.index("latents_mean:"):])
    assert set(snippet) == {"latents_mean", "latents_std"} and len(snippet["latents_mean"]) == 4
    node = OmegaConf.to_container(OmegaConf.load(Path(__file__).resolve().parents[1] / "conf/vae/wan.yaml"))
    node |= {"path": str(tmp_path / "wan"), "latent_channels": 4, "spatial_factor": 4, **snippet}
    latents = build_vae(OmegaConf.create({"vae": node})).encode(clip_to_video(_all_clips(shards)))
    m, s = _per_channel(latents)
    # 6 printed digits: ~1e-5 of the raw scale
    torch.testing.assert_close(m, torch.zeros_like(m), rtol=0, atol=1e-3)
    torch.testing.assert_close(s, torch.ones_like(s), rtol=1e-3, atol=0)


def test_bad_arguments_fail_with_the_field_named(shards, tmp_path, capsys):
    folder = _causal_vae(tmp_path / "vae")
    common = ["--shards", *shards, "--out", str(tmp_path / "s.json")]
    for argv, expected in [
        (["--vae-config", "causal_demo", f"path={folder}", *common], "vae.FIELD=VALUE"),
        (["--vae-config", "causal_demo", f"vae.pth={folder}", *common], "no field 'pth'"),
        (["--vae-config", "no_such_vae", *common], "conf/vae/no_such_vae.yaml"),
        (["--vae-config", "causal_demo", f"vae.path={tmp_path / 'none'}", *common], "vae.safetensors"),
        (["--vae-config", "causal_demo", f"vae.path={folder}", *common, "--num-frames", "8", "--size", "16", "16"],
         "--num-frames/--size do not fit the VAE: num_frames=8"),
    ]:
        with pytest.raises(SystemExit):
            main(argv)
        assert expected in capsys.readouterr().err, argv
