"""preflight's new memory terms, each against a computation that does not share its code:
closed-form parameter counts of the text encoders, the frozen VAE's feature maps from the real
module run on the meta device, DDP's bucket bytes from torch's own reducer, and the weights
autocast really casts in a CPU step. Plus the run folder written by rank 0 only, dit_256's `vae:`
block as a VAE `task=vae` can train, and launch/README.md's per-GPU batch for dit_256.

Not reachable here: real GPU memory (allocator slack, cuDNN/NCCL workspaces): the estimate's
documented ~20% headroom covers those.
"""

from __future__ import annotations

import gc
import re
import weakref

import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from test_model import tiny_config
from test_model_variants import inputs
from tiny_run import ROOT, compose_train
from torch.utils._python_dispatch import TorchDispatchMode

from dit_video import preflight, run
from dit_video.build import dataclass_from, vae_training_configs
from dit_video.data.config import VideoDataConfig
from dit_video.encoders.causal_vae import CausalVAE
from dit_video.encoders.text import minilm_path
from dit_video.model import DiT


def t5_encoder_params(vocab, d, d_kv, heads, d_ff, layers, buckets=32) -> int:
    """T5 v1.1 encoder (gated-GELU FF, RMS norms without bias, relative position bias in layer 0)."""
    attention = 4 * d * heads * d_kv  # q, k, v, o
    ff = 2 * d * d_ff + d_ff * d  # wi_0, wi_1, wo
    return vocab * d + layers * (attention + ff + 2 * d) + d + buckets * heads


def bert_params(vocab, h, layers, ff, positions, types) -> int:
    embeddings = (vocab + positions + types) * h + 2 * h
    layer = 4 * (h * h + h) + 2 * h + (h * ff + ff) + (ff * h + h) + 2 * h
    return embeddings + layers * layer + h * h + h  # + pooler


def test_t5_xxl_frozen_on_every_gpu_is_about_9_gib_in_bf16():
    node = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/text_encoder/t5_xxl.yaml"))
    expected = t5_encoder_params(32128, 4096, 64, 64, 10240, 24)
    assert preflight.text_encoder_params(node) == expected  # 4.76e9 from its published architecture
    assert preflight.text_encoder_bytes(node) == 2 * expected
    assert 8.5 < 2 * expected / 2**30 < 9.5


def test_a_local_encoder_is_counted_from_its_config_json():
    node = {"name": "all-minilm-l6-v2", "path": str(minilm_path()), "dtype": "float32"}
    assert preflight.text_encoder_params(node) == bert_params(30522, 384, 6, 1536, 512, 2)  # 22.7M


def test_vae_encode_peak_is_three_copies_of_the_largest_feature_map():
    """dit_256's VAE at its 33x256x256 bucket, batch 4: the largest module output of the real encoder
    (run on the meta device) is level 0, 128 channels at full resolution."""
    cfg = compose_train("+experiment=dit_256")
    vae_cfg = preflight.causal_vae_config(OmegaConf.to_container(cfg.vae, resolve=True))
    with torch.device("meta"):
        vae = CausalVAE(vae_cfg)
        sizes = []
        hooks = [m.register_forward_hook(lambda m, i, o: sizes.append(o.numel())) for m in vae.modules()
                 if m is not vae]
        vae._moments(torch.empty(4, 3, 33, 256, 256))
    for h in hooks:
        h.remove()
    assert max(sizes) == 4 * 128 * 33 * 256 * 256
    assert preflight.vae_encode_bytes(vae_cfg, 33, 256, 256, batch=4) == 3 * 4 * max(sizes)


def test_ddp_gradient_buckets_are_what_torch_ddp_allocates(tmp_path):
    model = DiT(tiny_config())
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        allocated = sum(int(b) for b in ddp._get_ddp_logging_data()["bucket_sizes"].split(", "))
    finally:
        dist.destroy_process_group()
    n = sum(p.numel() for p in model.parameters())
    estimate = preflight.memory_per_gpu(model.cfg, n, 0, world=2, strategy="DDP", act=0.0)
    assert estimate.buckets == allocated


class CastRecorder(TorchDispatchMode):
    """The bf16 copies of parameters made during a step, kept by weak reference: those still alive
    after backward (inside autocast) are what autocast's weight cache holds (a module's own
    `.to(dtype)` of a weight is freed with the graph)."""

    def __init__(self, params):
        super().__init__()
        self.params, self.copies = {p.untyped_storage().data_ptr() for p in params}, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.bfloat16:
            src = args[0]
            if src.dtype == torch.float32 and src.untyped_storage().data_ptr() in self.params:
                self.copies.append((src.untyped_storage().data_ptr(), src.numel(), weakref.ref(out)))
        return out

    def held(self) -> int:
        """Elements of the distinct parameters whose bf16 copy is still alive."""
        return sum(dict((ptr, n) for ptr, n, ref in self.copies if ref() is not None).values())


@pytest.mark.parametrize("variant", [{}, {"conditioning": "mmdit", "num_dual_blocks": 1, "modulation": "adaln_zero"}],
                         ids=["cross_attn", "mmdit"])
def test_autocast_weight_cache_counts_the_weights_autocast_casts(variant):
    model = DiT(tiny_config(**variant))
    with CastRecorder(model.parameters()) as casts, torch.autocast("cpu", dtype=torch.bfloat16):
        model(**inputs(model.cfg)).float().mean().backward()
        gc.collect()
        held = casts.held()  # before autocast exits and clears its cache
    n = sum(p.numel() for p in model.parameters())
    estimate = preflight.memory_per_gpu(model.cfg, n, 0, 2, "DDP", 0.0, preflight.matmul_parameters(model), "bf16")
    assert held > 0 and estimate.autocast_cache == 2 * held
    assert preflight.memory_per_gpu(model.cfg, n, 0, 2, "FSDP", 0.0, n, "bf16").autocast_cache == 0


def test_preflight_adds_the_new_terms_to_the_total(capsys):
    preflight.main(["+experiment=dit_256", "--bucket", "33x256x256"])
    out = capsys.readouterr().out
    t5_gib = 2 * t5_encoder_params(32128, 4096, 64, 64, 10240, 24) / 2**30
    assert f"text encoder t5-v1_1-xxl {t5_gib:.2f} GiB" in out
    header = next(line for line in out.splitlines() if line.strip().startswith("memory per GPU"))
    columns = header.split()[4:]
    ddp = dict(zip(columns, map(float, next(line for line in out.splitlines()
                                             if line.split()[:1] == ["DDP"]).split()[1:]), strict=True))
    state = sum(ddp[k] for k in ("params", "grads", "optim", "ema", "bucket", "frozen"))
    assert ddp["bucket"] == ddp["params"] and ddp["frozen"] > t5_gib  # DDP: a second fp32 copy of the grads
    assert ddp["total"] == pytest.approx(state + max(ddp["activ."] + ddp["cast"], ddp["vae-enc"]), abs=0.02)


def test_launch_readme_gives_dit_256s_real_per_gpu_batch():
    cfg = compose_train("+experiment=dit_256")
    readme = (ROOT / "launch/README.md").read_text()
    match = re.search(r"8 GPUs x (\d+) = a global batch of (\d+)", readme)
    assert match and int(match.group(1)) == cfg.data.batch_size and int(match.group(2)) == 8 * cfg.data.batch_size


def test_dit_256_vae_block_is_a_vae_task_vae_can_train():
    cfg = compose_train("+experiment=dit_256", "task=vae")
    vae_cfg, _ = vae_training_configs(cfg, dataclass_from(VideoDataConfig, cfg.data, "data"))
    assert (vae_cfg.temporal_factor, vae_cfg.spatial_factor, vae_cfg.latent_channels) == (4, 8, 16)


@pytest.mark.parametrize("rank", [0, 1])
def test_only_rank_0_writes_the_run_folder_files(monkeypatch, tmp_path, rank):
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", rank)
    monkeypatch.setenv("DIT_VIDEO_QUIET", "1")
    monkeypatch.setattr(run, "preflight", lambda cfg: None)
    monkeypatch.setattr(run, "train_dit", lambda cfg, run_dir: None)
    run.train(compose_train("+experiment=demo", f"run_dir={tmp_path}"))
    written = {p.name for p in tmp_path.iterdir()}
    assert written == ({"config.yaml", "environment.json"} if rank == 0 else set())
