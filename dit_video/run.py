"""Train what a composed Hydra config names: check it, build the parts, run Lightning.

`train.py` is a thin Hydra entry point over `train(cfg)`. The parts (VAE, text encoder, DiT,
objective, data) come from `dit_video.build`; this module adds what only training needs: the
machine check before anything heavy is built, the Trainer (strategy, callbacks, logger) and the
run folder (config.yaml, environment.json, metrics, loss curve, summary).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.fabric.plugins.environments import (
    LightningEnvironment,
    SLURMEnvironment,
    TorchElasticEnvironment,
)
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.syntax import Syntax

from dit_video.build import (
    build_data,
    build_dit_config,
    build_lora,
    build_objective_from,
    build_parallel,
    build_text_encoder,
    build_vae,
    check_training_shapes,
    data_config_class,
    dataclass_from,
    encoder_identities,
    init_dit_from,
    vae_training_configs,
)
from dit_video.callbacks import NonFiniteGuard, Preemption, RNGState
from dit_video.checkpoint.paths import resolve_ckpt_path
from dit_video.checkpoint.resume import with_loader_state
from dit_video.checkpoint.save import SafeCheckpointIO, StepCheckpoint
from dit_video.checkpoint.strategy import SafeModelParallelStrategy
from dit_video.data.balance import CostModel
from dit_video.encoders.causal_vae import (
    CausalVAE,
    VAELoss,
    compute_latent_stats,
    save_vae,
)
from dit_video.encoders.pretrained_vae import vae_problem
from dit_video.encoders.text_concat import text_encoder_paths
from dit_video.errors import ConfigError
from dit_video.eval.in_training import build_eval_callbacks
from dit_video.identity import run_metadata, write_environment
from dit_video.lit_module import DiTModule, OptimConfig, VAEModule
from dit_video.loggers import build_logger
from dit_video.model import DiT
from dit_video.plots import plot_loss_curve
from dit_video.strategies import StrategyConfig, lightning_strategy

log = logging.getLogger("dit_video")


# ----------------------------------------------------------------------------- preflight checks


def _cuda_problem(trainer_cfg) -> str | None:
    if trainer_cfg.get("accelerator") not in ("gpu", "cuda"):
        return None
    want = trainer_cfg.get("devices", 1)
    want_n = want if isinstance(want, int) else 1
    have = torch.cuda.device_count()
    if have < want_n:
        return (
            f"trainer.devices={want} needs {want_n} CUDA GPU(s) but this machine has {have} "
            "(run on a GPU node, or set trainer=cpu for a CPU run)"
        )
    return None


def preflight(cfg: DictConfig) -> None:
    """Check the things a run needs before building anything heavy; raise one ConfigError listing
    everything that is missing, so a job on the wrong machine fails in seconds, not hours."""
    problems: list[str] = []
    try:
        dataclass_from(data_config_class(cfg), cfg.data, "data").validate()
    except (ValueError, FileNotFoundError) as err:
        problems.append(str(err))
    if cfg.task == "dit":
        vae_path = Path(str(cfg.vae.path))
        if cfg.vae.get("kind", "causal") != "causal":  # a pretrained diffusers VAE (causal configs predate kind)

            vae_issue = vae_problem(OmegaConf.to_container(cfg.vae, resolve=True))
            if vae_issue:
                problems.append(vae_issue)
        elif not (vae_path / "vae.safetensors").is_file():
            problems.append(
                f"vae.path: no trained VAE at '{vae_path}' (expected vae.safetensors + vae.json; "
                f"train one with `python train.py +experiment=vae_demo` or point vae.path at one)"
            )
        try:
            text_paths = text_encoder_paths(cfg.text_encoder)  # one per encoder (several when concatenated)
        except Exception as err:  # the resolver raises with install advice if the package is missing
            problems.append(f"text_encoder.path: {err}")
        else:
            for field, text_path in text_paths:
                if not (text_path / "config.json").is_file():
                    problems.append(
                        f"{field}: no Hugging Face model at '{text_path}' (needs config.json and "
                        f"weights; see conf/text_encoder/ for how to get it)"
                    )
    elif cfg.task == "vae" and cfg.vae.get("kind", "causal") != "causal":
        problems.append(f"task=vae trains our causal VAE; vae.kind={cfg.vae.kind} is pretrained and frozen "
                        "(use vae=causal_demo)")
    elif cfg.task != "vae":
        problems.append(f"task={cfg.task!r}: use 'dit' or 'vae'")
    if cfg.task == "dit" and cfg.init_from and not Path(str(cfg.init_from)).exists():
        problems.append(f"init_from: '{cfg.init_from}' does not exist (convert released weights with "
                        "`python -m dit_video.convert SRC OUT.safetensors`)")
    cuda = _cuda_problem(cfg.trainer)
    if cuda:
        problems.append(cuda)
    if problems:
        raise ConfigError(f"run '{cfg.name}' cannot start: " + "; ".join(problems))


# ----------------------------------------------------------------------------- the trainer


def build_strategy(cfg: DictConfig, trainer_kwargs: dict):
    """(Trainer `strategy`, `plugins`) from conf/strategy/*.yaml; pops trainer_kwargs["strategy"]."""

    strategy_cfg = dataclass_from(StrategyConfig, cfg.strategy, "strategy")
    legacy = trainer_kwargs.pop("strategy", None)
    try:
        strategy = lightning_strategy(strategy_cfg, int(cfg.data.batch_size), trainer_kwargs.get("gradient_clip_val"),
                                      trainer_kwargs.get("precision"), _world_size(trainer_kwargs),
                                      fsdp_strategy=SafeModelParallelStrategy)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if legacy is not None and strategy_cfg.kind == "single":
        strategy = legacy  # a trainer preset that names a Lightning strategy (trainer=gpu: ddp)
    elif legacy is not None:
        log.warning("strategy=%s overrides trainer.strategy=%r", strategy_cfg.kind, legacy)
    plugins = []
    if strategy_cfg.kind in ("single", "ddp"):
        plugins.append(SafeCheckpointIO())  # atomic writes, weights_only loads
    environment = cluster_environment(_devices_per_node(trainer_kwargs), int(trainer_kwargs.get("num_nodes", 1)))
    if environment is not None:
        plugins.append(environment)
    return strategy, plugins


def cluster_environment(devices: int, num_nodes: int):
    """Who starts the processes and numbers the ranks: None (Lightning's own choice), SLURM or Lightning.

    Lightning's rule: SLURM manages the processes only if srun started one task per device
    (SLURM_NTASKS = devices x nodes). torchrun inside an sbatch allocation keeps its own ranks
    (TorchElastic first, as Lightning orders them), and one SLURM task with several devices lets
    Lightning start the device processes itself. Any other task count cannot work: ConfigError.
    """
    if TorchElasticEnvironment.detect() or not SLURMEnvironment.detect():  # torchrun; no srun (or an interactive job)
        return None
    tasks, world = int(os.environ["SLURM_NTASKS"]), devices * num_nodes
    if tasks == world:
        try:
            # dit_video.callbacks.Preemption saves and requeues; Lightning's own handler would write a
            # second, differently named checkpoint that ckpt_path=auto does not know.
            environment = SLURMEnvironment(auto_requeue=False)
            environment.validate_settings(num_devices=devices, num_nodes=num_nodes)  # tasks per node, nodes
        except (ValueError, RuntimeError) as err:
            raise ConfigError(f"SLURM allocation vs trainer.devices/trainer.num_nodes: {err}") from None
        return environment
    if tasks == 1 and num_nodes == 1:
        return LightningEnvironment()  # one task: Lightning launches the device processes (SLURM's ranks are all 0)
    raise ConfigError(
        f"SLURM started {tasks} task(s) but trainer.devices x trainer.num_nodes = {devices} x "
        f"{num_nodes} = {world}: run one task per device (sbatch --ntasks-per-node={devices} --nodes={num_nodes}) "
        f"or set trainer.devices/trainer.num_nodes to the allocation"
    )


def _devices_per_node(trainer_kwargs: dict) -> int:
    devices = trainer_kwargs.get("devices", 1)
    per_node = len(devices) if isinstance(devices, list) else devices
    if not isinstance(per_node, int) or per_node < 1:
        raise ConfigError(f"trainer.devices={devices!r}: give the number of devices per node (an integer)")
    return per_node


def _world_size(trainer_kwargs: dict) -> int:
    return _devices_per_node(trainer_kwargs) * int(trainer_kwargs.get("num_nodes", 1))


def build_trainer(cfg: DictConfig, run_dir: Path, extra_callbacks=()):

    checkpoint = StepCheckpoint(run_dir / "checkpoints", int(cfg.checkpoint_every), int(cfg.checkpoint_keep),
                                float(cfg.checkpoint_reserve_gb))
    guard = cfg.guard
    callbacks = [
        # Before the checkpoint callbacks: a checkpoint saved at a step then holds the guard's verdict on
        # it (under DeepSpeed that verdict comes after the step, in on_train_batch_end).
        NonFiniteGuard(int(guard.max_bad_steps), int(guard.window), float(guard.spike_zscore), int(guard.spike_warmup),
                       checkpoint=checkpoint),
        checkpoint,
        Preemption(checkpoint, signals=list(cfg.preemption.signals), requeue_signals=list(cfg.preemption.requeue_signals)),
        RNGState(),
        *build_eval_callbacks(cfg, run_dir),  # conf/eval/: samples, held-out loss, throughput/MFU
        *extra_callbacks,
    ]
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    if trainer_kwargs.get("enable_progress_bar", True):  # off in batch jobs: bars garble SLURM logs
        # rich draws nothing when stdout is not a terminal (make | tee, CI): fall back to tqdm lines.
        callbacks.append(RichProgressBar(leave=True) if sys.stdout.isatty() else TQDMProgressBar(refresh_rate=50))
    strategy, plugins = build_strategy(cfg, trainer_kwargs)
    trainer_kwargs["enable_checkpointing"] = False  # StepCheckpoint replaces Lightning's ModelCheckpoint
    return L.Trainer(
        **trainer_kwargs,
        strategy=strategy,
        plugins=plugins,
        callbacks=callbacks,
        logger=build_logger(cfg, run_dir),
        default_root_dir=str(run_dir),
    )


# Lightning warnings that do not apply to our runs, each with the reason.
EXPECTED_WARNINGS = {
    # the DiT's held-out shards are read by eval/val_loss.py at its own steps, not by Lightning's val loop
    "You passed in a `val_dataloader` but have no `validation_step`": "DiT validation is a callback",
    # our datamodules restore their exact position themselves (VideoDataModule.state_dict, or ResumableData's replay)
    "You're resuming from a checkpoint that ended before the epoch ended": "the loader position is restored",
    # LPIPS in the VAE loss is frozen and in eval mode by design (the DiT's EMA left the module tree:
    # DiT runs no longer raise it)
    "module(s) in eval mode at the start of training": "LPIPS is frozen, in eval mode",
    # Lightning 2.6's pytree helper calls an API torch 2.13 deprecated; nothing of ours to change
    "`isinstance(treespec, LeafSpec)` is deprecated": "Lightning internals",
}


def fit(trainer, module, datamodule, cfg: DictConfig, run_dir: Path) -> None:
    """trainer.fit with the loader position in every checkpoint and `ckpt_path` resolved (`auto`)."""
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, run_dir / "checkpoints")
    with warnings.catch_warnings():
        for message in EXPECTED_WARNINGS:
            warnings.filterwarnings("ignore", message=f".*{re.escape(message)}")
        trainer.fit(module, datamodule=with_loader_state(datamodule), ckpt_path=ckpt_path, weights_only=True)


# ----------------------------------------------------------------------------- the two stages


def train(cfg: DictConfig) -> Path:
    """Train what `cfg.task` names; returns the run directory."""
    resume = cfg.get("resume")  # `+resume=RUN_DIR`: continue that run in its own folder
    if resume:
        if not (Path(str(resume)) / "checkpoints").is_dir():
            raise ConfigError(f"resume={resume}: no checkpoints/ folder there; pass the run directory "
                              "that holds checkpoints/ (outputs/<name>/<time>)")
        cfg.run_dir, cfg.ckpt_path = str(resume), "auto"
    preflight(cfg)
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    L.seed_everything(int(cfg.seed), workers=True)
    run_dir = Path(cfg.get("run_dir") or _hydra_run_dir())
    run_dir.mkdir(parents=True, exist_ok=True)
    if rank_zero_only.rank == 0:  # one writer: N ranks rewriting the same files on a shared disk race
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        write_environment(run_dir)  # git commit + dirty flag, command line, package versions
    print_config(cfg, run_dir)
    if cfg.task == "vae":
        train_vae(cfg, run_dir)
    else:
        train_dit(cfg, run_dir)
    return run_dir


def print_config(cfg: DictConfig, run_dir: Path) -> None:
    """The resolved config, once per run (rank 0 only), so a log shows exactly what ran."""
    if rank_zero_only.rank != 0 or os.environ.get("DIT_VIDEO_QUIET"):
        return
    console = Console()
    console.rule(f"[bold]{cfg.name}[/bold] ({cfg.task}) -> {run_dir}")
    console.print(Syntax(OmegaConf.to_yaml(cfg, resolve=True), "yaml", theme="ansi_dark"))
    console.rule()


def _hydra_run_dir() -> str:
    return HydraConfig.get().runtime.output_dir


def train_dit(cfg: DictConfig, run_dir: Path) -> None:
    data_cfg, datamodule = build_data(cfg)
    vae = build_vae(cfg)
    objective = build_objective_from(cfg)
    # Every bucket against the patch size and the sequence-parallel split, before the text encoder
    # (T5-XXL: minutes to load) is built: its widths change no token count, so placeholders do here.
    check_training_shapes(cfg, data_cfg, vae, build_dit_config(cfg.model, vae.latent_channels, 1, 1), objective)
    text_encoder = build_text_encoder(cfg)
    identities = encoder_identities(cfg, vae, text_encoder)  # {"vae": ..., "text_encoder": ...}, hashed once per node
    if data_cfg.kind == "latents":  # a cache made by other encoders would train on the wrong latents
        try:
            datamodule.check_encoders(identities["vae"], identities["text_encoder"])
        except ValueError as err:
            raise ConfigError(str(err)) from None
    try:
        latent_shape = vae.latent_shape(data_cfg.num_frames, *data_cfg.size)
    except ValueError as err:
        raise ConfigError(f"data.num_frames/data.size do not fit the VAE: {err}") from None
    dit_cfg = build_dit_config(cfg.model, vae.latent_channels, text_encoder.dim, text_encoder.pooled_dim)
    try:
        dit_cfg.validate(latent_shape)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if data_cfg.kind == "clips" and data_cfg.packing.enabled:  # token-budget packs count each bucket's DiT tokens
        datamodule.tokens_per_clip = lambda t, h, w: math.prod(dit_cfg.grid(vae.latent_shape(t, h, w)))
    if data_cfg.kind == "clips":  # each clip's DiT FLOPs: data.balance and the per-step rank_imbalance log
        datamodule.clip_cost = CostModel(dit_cfg, vae.latent_shape, int(getattr(text_encoder, "max_length", 0) or 0))
    optim = dataclass_from(OptimConfig, cfg.optim, "optim")
    optim.validate()
    meta = run_metadata(cfg) | {
        "dit_config": dataclasses.asdict(dit_cfg),
        "latent_shape": list(latent_shape),
        **identities,
    }
    dit = DiT(dit_cfg)
    if cfg.init_from:  # start from converted weights (a released Wan); the EMA below starts from them too
        init_dit_from(dit, str(cfg.init_from))
    lora = build_lora(cfg, dit, meta)  # lora=...: peft adapters on the frozen init_from weights (dit_video/lora.py)
    trainer = build_trainer(cfg, run_dir)
    module = DiTModule(dit, objective, vae, text_encoder, optim, float(cfg.ema_decay), meta,
                       build_parallel(cfg), text_encoder_cache=int(cfg.text_encoder_cache), lora=lora)
    fit(trainer, module, datamodule, cfg, run_dir)
    _finish(trainer, run_dir)


def train_vae(cfg: DictConfig, run_dir: Path) -> None:
    data_cfg, datamodule = build_data(cfg)
    vae_cfg, loss_cfg = vae_training_configs(cfg, data_cfg)
    try:
        objective = VAELoss(loss_cfg)  # loads LPIPS from vae.loss.lpips_path if asked
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from None
    vae = CausalVAE(vae_cfg)
    optim = dataclass_from(OptimConfig, cfg.optim, "optim")
    optim.validate()
    meta = run_metadata(cfg) | {"vae_config": dataclasses.asdict(vae_cfg)}
    clip = cfg.trainer.get("gradient_clip_val")
    if loss_cfg.adversarial:  # two optimizers, manual optimisation: VAEModule clips, Lightning must not
        cfg = OmegaConf.merge(cfg, {"trainer": {"gradient_clip_val": None}})
    module = VAEModule(vae, objective, optim, meta, gradient_clip_val=clip if loss_cfg.adversarial else None)
    trainer = build_trainer(cfg, run_dir)
    fit(trainer, module, datamodule, cfg, run_dir)
    if trainer.global_rank == 0:
        # Latent statistics make the DiT's inputs ~N(0, 1) per channel whatever the VAE learned.
        batches = _take(datamodule.train_dataloader(), int(cfg.vae_stats_batches))
        shift, scale = compute_latent_stats(module.vae.eval(), (b["clip"] for b in batches))
        save_vae(run_dir, module.vae, vae_cfg, shift, scale)
        log.info("VAE exported to %s (shift=%s, scale=%s)", run_dir, shift.tolist(), scale.tolist())
    _finish(trainer, run_dir)


def _take(loader, n: int) -> list:
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) >= n:
            break
    return out


def _finish(trainer, run_dir: Path) -> None:
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            # Lightning leaves the wandb run open; a second train() in the same process (a
            # notebook, a sweep) would otherwise log into this run.
            logger.experiment.finish()
    if trainer.global_rank != 0:
        return
    metrics = run_dir / "metrics.csv"
    if metrics.is_file():
        plot_loss_curve(metrics, run_dir / "loss_curve.png")
    summary = {"run_dir": str(run_dir), "global_step": int(trainer.global_step)}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("run finished: %s", run_dir)
    if os.environ.get("DIT_VIDEO_QUIET") is None:
        print(f"run directory: {run_dir}")
