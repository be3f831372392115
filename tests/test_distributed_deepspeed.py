"""DeepSpeed ZeRO-2/3: the config `dit_video.strategies.deepspeed_config` generates from
conf/strategy/deepspeed_*.yaml passes Lightning's own DeepSpeedStrategy checks; ZeRO-3 offload
initialises with plain `deepspeed.initialize` on 2 CPU processes (torchrun, gloo) and trains the
DiT with our AdamW and objective (slow). ZeRO-3 given the whole DiTModule partitions the DiT but
not the frozen VAE and text encoder, which live outside the module tree (lit_module.FrozenEncodersMixin).

Training through Lightning's DeepSpeedStrategy itself (ZeRO-2 bf16 and ZeRO-3 against the
single-process run, the fp32 EMA, exact resume, sampling and export from ZeRO checkpoints) is in
test_distributed.py. DeepSpeed JIT-compiles a CPU communication op on first use (~30 s); it is
cached in TORCH_EXTENSIONS_DIR (~/.cache/dit_video/torch_extensions) so later runs start in seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from spawn_ranks import assert_collective_parity, free_port

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
    from dit_video.strategies import StrategyConfig, deepspeed_config

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
    # Release the engine's hooks and ZeRO-3 (offload) state before the process group goes: left to
    # interpreter exit, a rank aborted now and then ("terminate called without an active exception").
    engine.destroy()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def run_deepspeed(tmp_path, *args: str) -> dict:
    """Runs this file's worker on 2 torchrun processes (gloo): args after the result path."""

    EXT_DIR.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "result.json"
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}", OMP_NUM_THREADS="1", DS_BUILD_OPS="0",
               TORCH_EXTENSIONS_DIR=str(EXT_DIR), DS_ACCELERATOR="cpu")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", str(Path(__file__).resolve()), str(out), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert_collective_parity(tmp_path, 2)
    return json.loads(out.read_text())


@pytest.mark.slow
def test_zero3_offload_config_trains_on_two_cpu_processes(tmp_path):
    result = run_deepspeed(tmp_path, "3", "1")
    assert result["zero_stage"] == 3 and result["partitioned"] and result["finite"]


def test_zero3_leaves_the_frozen_encoders_whole(tmp_path):
    """ZeRO-3 partitions every parameter of the module it is given (no per-module exclusion,
    deepspeedai/DeepSpeed#7271): the frozen VAE and text encoder stay out of DiTModule's module
    tree, so handing it the whole DiTModule (as Lightning's DeepSpeedStrategy does; here through
    plain `deepspeed.initialize`, since that strategy refuses CPU) shards the DiT only."""
    from test_encoder_loading import _saved_vae

    result = run_deepspeed(tmp_path, "frozen_encoders", str(_saved_vae(tmp_path)))
    assert result["zero_stage"] == 3 and result["dit_partitioned"]  # ZeRO-3 really ran on the module
    assert result["n_encoder_params"] > 100 and result["encoders_touched"] == 0 and result["numel_unchanged"]
    assert result["encoders_in_optimizer"] == 0
    assert all(x == x and x < 1e3 for x in result["losses"]) and result["final_moved"]  # trained two steps
    assert result["latents_same"] and result["text_same"]  # the encoders encode exactly as before
    assert result["direct_call_ok"]  # DiT and EMA called outside the engine (sampling callbacks) still work


@pytest.mark.parametrize("name", ["deepspeed_zero2", "deepspeed_zero2_offload", "deepspeed_zero3",
                                  "deepspeed_zero3_offload"])
def test_lightning_deepspeed_strategy_accepts_the_config_we_build(name):
    """The strategy exactly as `run.build_strategy` builds it, put through Lightning's own config
    formatting and checks (`DeepSpeedStrategy._init_config_if_needed`, the first thing its `setup`
    does on every rank): it refused a config holding `gradient_accumulation_steps`, which it sets
    itself from the Trainer, so every strategy=deepspeed_* run failed at startup. Lightning's
    CUDA-only check (setup_environment) is not reached: this needs no GPU."""
    import lightning as L
    from hydra import compose, initialize_config_dir

    from dit_video.run import build_strategy

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"strategy={name}", "trainer.devices=1", "data.batch_size=4"])
    strategy, _ = build_strategy(cfg, {"devices": 1, "precision": "bf16-mixed", "gradient_clip_val": 1.0})
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=strategy, precision="bf16-mixed", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, accumulate_grad_batches=2)
    module = L.LightningModule()
    strategy.connect(module)
    module.trainer = trainer
    strategy._init_config_if_needed()  # Lightning's validation and formatting of our config
    config = strategy.config
    assert config["gradient_accumulation_steps"] == 2  # Lightning's, from the Trainer
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["gradient_clipping"] == 1.0
    assert config["bf16"]["enabled"] and config["zero_optimization"]["stage"] == int(name[len("deepspeed_zero")])
    assert ("offload_param" in config["zero_optimization"]) == (name == "deepspeed_zero3_offload")


def frozen_encoders_worker(out: str, vae_dir: str) -> None:
    """The whole DiTModule (tiny DiT, the real tiny VAE and MiniLM) under ZeRO-3 with every
    parameter of its module tree partitioned: the frozen encoders must stay whole and untouched."""
    import deepspeed
    import torch
    from omegaconf import OmegaConf

    from dit_video.diffusion import build_objective
    from dit_video.encoders import HFTextEncoder, load_vae, minilm_path
    from dit_video.lit_module import DiTModule, OptimConfig, build_optimizer
    from dit_video.model import DiT, DiTConfig
    from dit_video.parallel import parallelize_dit_module
    from dit_video.strategies import StrategyConfig, deepspeed_config

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    strategy = StrategyConfig(**OmegaConf.to_container(OmegaConf.load(ROOT / "conf/strategy/deepspeed_zero3.yaml")))
    ds_config = deepspeed_config(strategy, micro_batch_size=1, bf16=False)
    # 0 (not 1e6): partition every parameter ZeRO-3 sees, so an encoder weight of any size would show up.
    ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0

    torch.manual_seed(0)
    vae, text_encoder = load_vae(vae_dir), HFTextEncoder(minilm_path(), max_length=16)
    objective = build_objective(OmegaConf.to_container(OmegaConf.load(ROOT / "conf/objective/rectified_flow.yaml")))
    dit = DiT(DiTConfig(in_channels=vae.latent_channels, text_dim=text_encoder.dim, hidden_size=32, depth=1,
                        num_heads=2))
    module = DiTModule(dit, objective, vae, text_encoder, OptimConfig(lr=1e-3, warmup_steps=1), 0.9, {})
    encoder_params = [p for enc in (vae, text_encoder) for p in enc.parameters()]
    numels = [p.numel() for p in encoder_params]
    clip = torch.randint(0, 256, (1, 5, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(rank))
    batch = {"clip": clip, "caption": [f"a red square {rank}"]}  # [B, T, H, W, 3] per rank
    latents_before, text_before = module.encode_clips(clip), module.encode_text(batch["caption"])[0]

    class TrainingStep(torch.nn.Module):
        """As Lightning's DeepSpeedStrategy hands the LightningModule to DeepSpeed: wrapped, with a
        forward that runs the training step through the engine (where ZeRO-3 gathers weights)."""

        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, batch):
            latents, text_emb, text_mask, pooled = self.module.model_inputs(batch)  # the frozen encoders run here
            return self.module.objective.loss(self.module.dit, latents, text_emb, text_mask, pooled=pooled)[0]

    parallelize_dit_module(module, strategy.parallel_config())  # what DiTModule.configure_model does
    optimizer = build_optimizer(module.dit, module.optim_cfg)["optimizer"]
    engine, _, _, _ = deepspeed.initialize(model=TrainingStep(module), optimizer=optimizer, config=ds_config)
    losses = []
    for _ in range(2):
        loss = engine(batch)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))

    dit_partitioned = all(getattr(p, "ds_numel", 0) > 0 and p.numel() == 0 for p in module.dit.parameters())
    # Outside the engine's forward, as the in-training sample/val-loss callbacks call the EMA and DiT:
    # ZeRO-3 gathers a module's weights when it is entered; fused kernels read the QK-norm weights
    # from the attention layer, which parallelize_dit_module makes a ZeRO-3 leaf for that reason.
    with torch.no_grad():
        t = torch.full((1,), 0.5)
        direct = [net(latents_before, t, *module.encode_text(batch["caption"])) for net in (module.dit, module.ema)]
    direct_ok = all(bool(torch.isfinite(out).all()) and out.shape == latents_before.shape for out in direct)
    touched = [hasattr(p, "ds_id") or hasattr(p, "ds_status") for p in encoder_params]
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    with deepspeed.zero.GatheredParameters(list(module.dit.final_layer.parameters())):
        final_moved = bool(module.dit.final_layer.linear.weight.abs().sum() > 0)  # zero-initialised (adaLN-Zero)
    # On every rank: were the encoders partitioned, encoding would be a collective.
    latents_same = torch.equal(module.encode_clips(clip), latents_before)
    text_same = torch.equal(module.encode_text(batch["caption"])[0], text_before)
    if rank == 0:
        Path(out).write_text(json.dumps({
            "losses": losses, "dit_partitioned": dit_partitioned, "final_moved": final_moved,
            "n_encoder_params": len(encoder_params), "encoders_touched": sum(touched),
            "numel_unchanged": numels == [p.numel() for p in encoder_params],
            "encoders_in_optimizer": sum(id(p) in in_optimizer for p in encoder_params),
            "latents_same": latents_same, "text_same": text_same, "direct_call_ok": direct_ok,
            "zero_stage": engine.zero_optimization_stage(),
        }))
    # Release the engine's hooks and ZeRO-3 (offload) state before the process group goes: left to
    # interpreter exit, a rank aborted now and then ("terminate called without an active exception").
    engine.destroy()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    from spawn_ranks import record_collectives

    log = record_collectives("cpu")
    try:
        if sys.argv[2] == "frozen_encoders":
            frozen_encoders_worker(sys.argv[1], sys.argv[3])
        else:
            worker(sys.argv[1], int(sys.argv[2]), bool(int(sys.argv[3])))
    finally:
        log.dump(Path(sys.argv[1]).parent / f"collectives-{os.environ['RANK']}.json")
