"""In-training evaluation: samples split across ranks and gathered, held-out loss by t bucket,
throughput/MFU/memory, all driven by conf/eval/."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import resource
import time

import numpy as np
import pytest
import torch
from spawn_ranks import assert_collective_parity, free_port
from test_flops import counted
from tiny_run import TINY_DATA, TINY_DIT, compose_train, distributed_sampling_worker, tiny_run

from dit_video.checkpoint.load import load_checkpoint
from dit_video.eval.samples import rank_share
from dit_video.eval.throughput import PEAK_TFLOPS_BF16, measure_cpu_matmul_tflops, peak_tflops
from dit_video.model import DiT, DiTConfig
from dit_video.plots import read_metric
from dit_video.provenance import detect


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory)


def test_rank_share_covers_each_prompt_once():
    for n in range(7):
        for world in (1, 2, 3, 4):
            shares = [rank_share(n, r, world) for r in range(world)]
            assert sorted(i for s in shares for i in s) == list(range(n))


def test_peak_table_and_measured_cpu_rate():
    assert PEAK_TFLOPS_BF16 == {"A100": 312.0, "H100": 989.0, "H200": 989.0}
    tflops, source = peak_tflops(torch.device("cpu"), torch.float32)
    assert 1e-4 < tflops < 100 and "measured CPU" in source
    print(f"\nCPU GEMM: fp32 {tflops * 1e3:.0f} GFLOP/s, bf16 {measure_cpu_matmul_tflops(torch.bfloat16) * 1e3:.0f} "
          f"GFLOP/s ({torch.get_num_threads()} threads)")


def test_training_run_logs_samples_val_loss_and_throughput(run, tmp_path, caplog):
    from dit_video.run import train

    data = [f"data.shards={run['shards']}/train-*.tar", f"data.val_shards={run['shards']}/val-*.tar"]
    cfg = compose_train("+experiment=demo", *data, *TINY_DATA, *TINY_DIT, f"vae.path={run['vae']}", "eval=demo",
                        "trainer.max_steps=4", "trainer.log_every_n_steps=1", "optim.warmup_steps=5",
                        "eval.samples.every_n_steps=2", "eval.samples.steps=2", "eval.val_loss.every_n_steps=2",
                        "eval.val_loss.max_batches=1", "eval.throughput.log_every_n_steps=2",
                        f"run_dir={tmp_path}", "trainer.enable_model_summary=false")
    threads = torch.get_num_threads()
    caplog.set_level(logging.INFO, logger="dit_video")
    rss_before, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, time.perf_counter()
    try:
        train(cfg)
    finally:
        torch.set_num_threads(threads)
    wall, rss_after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    for step in (2, 4):
        videos = sorted((tmp_path / "samples" / f"step-{step:07d}").glob("*.mp4"))
        assert len(videos) == 4 and detect(videos[0]).detected
    metrics = tmp_path / "metrics.csv"
    steps, val = read_metric(metrics, "val/loss")
    assert len(val) == 2 and all(np.isfinite(val))
    header = metrics.read_text().splitlines()[0]
    assert "val/loss_t" in header and "eval/probe_score" in header
    _, mfu = read_metric(metrics, "perf/mfu")
    _, tokens = read_metric(metrics, "perf/tokens_per_sec")
    _, samples = read_metric(metrics, "perf/samples_per_sec")
    _, tflops = read_metric(metrics, "perf/tflops_per_device")
    _, rss = read_metric(metrics, "mem/max_rss_gb")
    # Each logged number against an independent computation (a range would pass a wrong factor):
    meta = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["dit_video"]
    dit, latent_shape = DiT(DiTConfig.from_dict(meta["dit_config"])), tuple(meta["latent_shape"])
    text_len = int(meta["config"]["text_encoder"]["max_length"])
    # tokens per sample: the patch grid, by hand
    grid = [n // p for n, p in zip(latent_shape, dit.cfg.patch_size, strict=True)]
    assert tokens[-1] == pytest.approx(samples[-1] * grid[0] * grid[1] * grid[2], rel=1e-9)
    # FLOPs per sample: torch's FlopCounterMode on a forward + backward of the run's DiT, with the
    # "math" attention backend, whose explicit matmuls it counts (it cannot see CPU SDPA's)
    math_dit = DiT(dataclasses.replace(dit.cfg, attn_backend="math"))
    flops = counted(math_dit, latent_shape, text_len, 2, train=True) / 2
    assert tflops[-1] * 1e12 == pytest.approx(samples[-1] * flops, rel=0.02)
    # MFU: achieved over the peak the run measured and logged (printed to 3 digits)
    peak = float(re.search(r"peak ([0-9.e+-]+) TFLOP/s per device", caplog.text).group(1))
    assert mfu[-1] == pytest.approx(tflops[-1] / peak, rel=6e-3)
    # samples/s: the timed window (steps 3 and 4, 8 samples each) lies within the run's wall time
    assert samples[-1] >= 2 * 8 / wall
    # peak RSS: ru_maxrss only grows, so the logged value lies between this process's before and after
    assert rss_before <= rss[-1] <= rss_after
    environment = json.loads((tmp_path / "environment.json").read_text())
    assert environment["packages"]["torch"] and "git_commit" in environment and (tmp_path / "config.yaml").is_file()
    print(f"\ntiny demo run: MFU {mfu[-1]:.2%} of measured CPU GEMM, {tokens[-1]:.0f} tokens/s")


def test_distributed_sampling_two_gloo_ranks_each_prompt_once(run, tmp_path):
    prompts = ["a red square moving left", "a blue circle moving up", "a green triangle moving right",
               "a yellow square moving down", "a magenta circle moving left"]
    port = free_port()
    ckpt = str(run["run"] / "checkpoints" / "last.ckpt")
    torch.multiprocessing.spawn(distributed_sampling_worker, args=(2, port, ckpt, prompts, str(tmp_path)), nprocs=2)
    assert_collective_parity(tmp_path, 2)
    results = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]
    calls = [list(r["calls"]) for r in results]
    # Every rank generates ceil(5 / 2) = 3 clips (a sharded EMA's forward is a collective): rank 1
    # pads its 2 prompts with a repeat whose clip is dropped; each prompt is still sampled, once kept.
    assert len(calls[0]) == len(calls[1]) == 3 and calls[1][2] == calls[1][0]
    assert sorted(calls[0] + calls[1][:2]) == sorted(prompts)
    for r in results:
        assert r["clips"].shape == (5, 17, 32, 32, 3) and list(r["owner"]) == [0, 1, 0, 1, 0]
    np.testing.assert_array_equal(results[0]["clips"], results[1]["clips"])  # every rank holds the gathered set


def test_throughput_counts_each_batch_at_its_real_shapes():
    """Buckets, 1-frame image batches and packed batches: FLOPs/tokens follow the batch, not the
    run's nominal clip size (an image batch counted at video FLOPs would inflate MFU)."""
    import types

    from dit_video.eval.throughput import Throughput, ThroughputConfig
    from dit_video.model import DiTConfig
    from dit_video.model.flops import dit_flops

    cfg = DiTConfig(in_channels=4, text_dim=32, hidden_size=64, depth=2, num_heads=4)
    cb = Throughput(ThroughputConfig())
    cb.dit_cfg, cb.text_len = cfg, 16

    def latent_shape(t, h, w):  # a causal 4x temporal, 4x spatial VAE
        return (1 + (t - 1) // 4, h // 4, w // 4)

    module = types.SimpleNamespace(vae=types.SimpleNamespace(latent_shape=latent_shape))
    video = {"clip": torch.zeros(3, 17, 32, 32, 3, dtype=torch.uint8)}
    image = {"clip": torch.zeros(5, 1, 32, 32, 3, dtype=torch.uint8)}
    packed = {"clip": [torch.zeros(17, 32, 32, 3, dtype=torch.uint8), torch.zeros(9, 16, 32, 3, dtype=torch.uint8)]}
    latents = {"latents": torch.zeros(2, 4, 5, 8, 8)}

    def flops(shape):
        return dit_flops(cfg, shape, 16).training

    assert cb.batch_cost(video, module) == (3, 3 * 5 * 4 * 4, 3 * flops((5, 8, 8)))
    assert cb.batch_cost(image, module) == (5, 5 * 4 * 4, 5 * flops((1, 8, 8)))
    assert cb.batch_cost(packed, module) == (2, 5 * 4 * 4 + 3 * 2 * 4, flops((5, 8, 8)) + flops((3, 4, 8)))
    assert cb.batch_cost(latents, module) == (2, 2 * 5 * 4 * 4, 2 * flops((5, 8, 8)))
    assert flops((1, 8, 8)) < flops((5, 8, 8)) / 4
