"""DeepSpeed ZeRO-2/3 (and offload): the config `dit_video.parallel.deepspeed_config` generates
from conf/strategy/deepspeed_*.yaml initialises with plain `deepspeed.initialize` on 2 CPU
processes (torchrun, gloo) and trains the DiT with our AdamW and objective.

What cannot run here: Lightning's DeepSpeedStrategy refuses CPU accelerators, so the Lightning
wiring (`lightning_strategy(kind=deepspeed)`) is only checked to construct; and the CPU test runs
fp32 (`bf16.enabled=false`), since DeepSpeed's bf16 path on CPU is not what a GPU run exercises.
DeepSpeed JIT-compiles a CPU communication op on first use (~30 s); it is cached in
TORCH_EXTENSIONS_DIR (~/.cache/dit_video/torch_extensions) so later runs start in seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXT_DIR = Path.home() / ".cache" / "dit_video" / "torch_extensions"
pytest.importorskip("deepspeed")


def worker(out: str, stage: int, offload: bool) -> None:
    import deepspeed
    import torch
    from omegaconf import OmegaConf

    from dit_video.diffusion import build_objective
    from dit_video.lit_module import OptimConfig, build_optimizer
    from dit_video.model import DiT, DiTConfig
    from dit_video.parallel import StrategyConfig, deepspeed_config

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    names = {2: "deepspeed_zero2", 3: "deepspeed_zero3"}
    node = OmegaConf.load(ROOT / "conf" / "strategy" / f"{names[stage]}{'_offload' if offload else ''}.yaml")
    strategy = StrategyConfig(**OmegaConf.to_container(node))
    strategy.validate()
    ds_config = deepspeed_config(strategy, micro_batch_size=2, bf16=False)
    if stage == 3:  # partition even this tiny model's weights (the default keeps < 1e6-element ones whole)
        ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0

    torch.manual_seed(0)
    model = DiT(DiTConfig(in_channels=4, text_dim=16, hidden_size=32, depth=2, num_heads=2))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3, warmup_steps=1))["optimizer"]
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    objective = build_objective(OmegaConf.to_container(OmegaConf.load(ROOT / "conf/objective/rectified_flow.yaml")))

    losses = []
    for step in range(2):
        g = torch.Generator().manual_seed(100 * step + rank)
        latents = torch.randn(2, 4, 3, 4, 4, generator=g)  # [B, C, T', H', W'] per rank
        text_emb, text_mask = torch.randn(2, 5, 16, generator=g), torch.ones(2, 5, dtype=torch.bool)
        loss, _ = objective.loss(engine, latents, text_emb, text_mask, generator=g)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))

    partitioned = all(getattr(p, "ds_numel", 0) > 0 and p.numel() == 0 for p in engine.module.parameters())
    params = list(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params], enabled=stage == 3):
        moved = [n for n, p in params if not torch.equal(p.detach().cpu().float(), before[n])]
        finite = all(bool(torch.isfinite(p.detach()).all()) for _, p in params)
    if rank == 0:
        Path(out).write_text(json.dumps({"losses": losses, "partitioned": partitioned, "moved": moved,
                                         "finite": finite,
                                         "zero_stage": engine.zero_optimization_stage()}))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def run_deepspeed(tmp_path, stage: int, offload: bool) -> dict:
    from test_distributed import free_port

    EXT_DIR.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "result.json"
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}", OMP_NUM_THREADS="1", DS_BUILD_OPS="0",
               TORCH_EXTENSIONS_DIR=str(EXT_DIR), DS_ACCELERATOR="cpu")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", str(Path(__file__).resolve()), str(out), str(stage), str(int(offload))]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_config_initialises_and_trains_on_two_cpu_processes(tmp_path, stage):
    result = run_deepspeed(tmp_path, stage, offload=False)
    assert result["zero_stage"] == stage
    assert all(map(lambda x: x == x and x < 1e3, result["losses"])) and result["finite"]
    # An optimizer step happened: the zero-initialised output layer (the only one with a gradient
    # on the first adaLN-Zero step) moved away from zero.
    assert "final_layer.linear.weight" in result["moved"]
    assert result["partitioned"] == (stage == 3)  # ZeRO-3 keeps only a shard of each weight per rank


@pytest.mark.slow
def test_zero3_offload_config_trains_on_two_cpu_processes(tmp_path):
    result = run_deepspeed(tmp_path, 3, offload=True)
    assert result["zero_stage"] == 3 and result["partitioned"] and result["finite"]


def test_lightning_deepspeed_strategy_is_built_from_the_config():
    from dit_video.parallel import StrategyConfig, lightning_strategy

    strategy = lightning_strategy(StrategyConfig(kind="deepspeed", zero_stage=3, offload_optimizer=True,
                                                 offload_params=True), 4, 1.0, "bf16-mixed")
    zero = strategy.config["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"]["device"] == "cpu"
    assert strategy.config["bf16"]["enabled"] and strategy.config["train_micro_batch_size_per_gpu"] == 4


if __name__ == "__main__":
    worker(sys.argv[1], int(sys.argv[2]), bool(int(sys.argv[3])))
