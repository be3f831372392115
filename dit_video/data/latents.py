"""Latent shards: VAE latents + text embeddings computed once (data_prep/encode_latents.py) and
read directly by training with `data=latents`.

Cache layout (one folder per encoder pair and bucket, so caches for different encoders or clip
shapes never mix and a cache is reused by every run that matches):

    OUT/{vae name}-{hash}__{text encoder name}-{hash}/{T}x{H}x{W}/
        cache.json            format, both encoder identities, bucket, latent shape, counts
        null_text.safetensors text_emb [L0, D] and text_mask [L0] of the empty caption ""
        latents-000000.tar    {key}.safetensors: latents [C, T', H', W'], text_emb [L, D] (L = the
                              caption's own token count: no padding stored); {key}.txt caption;
                              {key}.json source metadata

Identity = name + weights sha256 + config (VAE config; text encoder max_length, dim, dtype, and
its kind / hidden_state_layer / prompt_template / crop_start / clip_pooled where not the default).
Paths are not part of it: the same weights copied elsewhere match. A training run whose VAE or
text encoder has another identity is refused (`check_identity`), naming both.

Caption dropout with cached text: the cache stores the embedding of "" (encoded by the same
text encoder), every latent batch carries it as `null_text_emb` / `null_text_mask`, and
DiTModule swaps it in for the dropped rows, drawing the same torch.rand(B) as on-the-fly
training does, so both paths drop the same rows for the same seed.

Members are safetensors (never pickle); reading goes through the same exact, resumable order
as clips (order.py) and the same state_dict as VideoDataModule.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dit_video.data.buckets import Bucket
from dit_video.data.config import resolve_shards
from dit_video.data.datamodule import ResumableDataModule
from dit_video.data.dataset import PlannedShardDataset, dist_info
from dit_video.data.index_cache import load_index
from dit_video.data.samples import read_caption
from dit_video.encoders.text import HFTextEncoder, detect_kind
from dit_video.errors import SampleError

CACHE_FORMAT = "dit-video-latents/1"
CACHE_FILE = "cache.json"
NULL_TEXT_FILE = "null_text.safetensors"


def _plain(obj):
    # As stored in cache.json: tuples become lists, so a loaded identity compares equal.
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def vae_key(identity: Mapping) -> dict:
    """The parts of a VAE identity a cache depends on (not where the weights happen to live)."""
    return _plain({"name": identity.get("name"), "sha256": identity.get("sha256"), "config": identity.get("config")})


# Text-encoder settings that change the embeddings; in the key only when not at their defaults,
# so caches built before they existed (all at the defaults) keep their folder and still load.
TEXT_SETTINGS = ("kind", "hidden_state_layer", "prompt_template", "crop_start", "clip_pooled")


def _text_defaults() -> dict:
    """HFTextEncoder's defaults for the settings that change embeddings, read from its signature
    so they cannot drift; `kind`'s default (auto) is the kind its config.json gives (detect_kind)."""
    params = inspect.signature(HFTextEncoder.__init__).parameters
    return {name: params[name].default for name in TEXT_SETTINGS if name != "kind"}


def text_key(identity: Mapping) -> dict:
    """The parts of a text-encoder identity a cache depends on: name, weights sha256, max_length,
    dim, dtype, and any TEXT_SETTINGS that differ from their defaults."""
    keep = ("name", "sha256", "max_length", "dim", "dtype")
    key = {k: identity.get(k) for k in keep}
    defaults = _text_defaults()
    for name in TEXT_SETTINGS:
        value = identity.get(name)
        if value is None:  # not an HFTextEncoder setting here (a concatenation hashes its parts' settings)
            continue
        if name == "kind":
            path = identity.get("path")
            # An explicit kind equal to what `auto` detects loads the same model: not a difference.
            if path is None or not (Path(path) / "config.json").is_file() or value == detect_kind(Path(path)):
                continue
        elif value == defaults[name]:
            continue
        key[name] = value
    return _plain(key)


def _short_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _slug(name) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in str(name))[:40] or "encoder"


def cache_dir(root: str | os.PathLike, vae_identity: Mapping, text_identity: Mapping, bucket: Bucket) -> Path:
    """Where the cache for this encoder pair and bucket lives under `root`."""
    v, t = vae_key(vae_identity), text_key(text_identity)
    pair = f"{_slug(v['name'])}-{_short_hash(v)}__{_slug(t['name'])}-{_short_hash(t)}"
    return Path(root) / pair / f"{bucket.num_frames}x{bucket.height}x{bucket.width}"


def read_cache_meta(path: str | os.PathLike) -> dict:
    """cache.json of a latent cache folder; ValueError naming the fix if it is not one."""
    meta_path = Path(path) / CACHE_FILE
    if not meta_path.is_file():
        raise ValueError(
            f"data.cache: no {CACHE_FILE} in '{path}'; build a cache with "
            "`python -m data_prep.encode_latents --shards ... --out ...` and point data.cache at the folder it prints"
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != CACHE_FORMAT:
        raise ValueError(f"data.cache: {meta_path} has format {meta.get('format')!r}, expected {CACHE_FORMAT!r}")
    return meta


def check_identity(meta: Mapping, vae_identity: Mapping, text_identity: Mapping, where: str = "data.cache") -> None:
    """Refuse a cache built by other encoders than the run's, naming both identities."""
    problems = []
    run = {"vae": vae_key(vae_identity), "text_encoder": text_key(text_identity)}
    for what, key in (("VAE", "vae"), ("text encoder", "text_encoder")):
        have, want = meta[key], run[key]
        if have != want:
            fields = sorted(f for f in set(have) | set(want) if have.get(f) != want.get(f))
            problems.append(f"{what} differs in {', '.join(fields)}: cache has {json.dumps(have, sort_keys=True)}, "
                            f"run uses {json.dumps(want, sort_keys=True)}")
    if problems:
        raise ValueError(
            f"{where}: latent cache was built with other encoders than this run ({'; '.join(problems)}); "
            "re-encode with data_prep.encode_latents using this run's vae.path / text_encoder, or point "
            "vae.path / text_encoder at the ones the cache was built with"
        )


@dataclass
class LatentDataConfig:
    """Training from a latent cache (`conf/data/latents.yaml`)."""

    kind: str = "latents"  # selects this config in run.build_data
    cache: str = "data/latents"  # folder holding cache.json (printed by data_prep.encode_latents)
    val_cache: str | None = None  # a validation cache folder, or None
    batch_size: int = 32  # samples per batch, per process
    num_workers: int = 1  # DataLoader workers (reading latents is cheap: 0-2 is plenty)
    shuffle_buffer: int = 1  # 0 = index order; > 0 = a full permutation per epoch
    seed: int = 0  # seeds the epoch order

    def meta(self) -> dict:
        return read_cache_meta(self.cache)

    @property
    def num_frames(self) -> int:
        """Clip frames the cache was encoded from (so run.py can check the VAE/DiT shapes)."""
        return int(self.meta()["bucket"]["num_frames"])

    @property
    def size(self) -> tuple[int, int]:
        return tuple(int(s) for s in self.meta()["bucket"]["size"])

    def validate(self) -> None:
        if self.kind != "latents":
            raise ValueError(f"data.kind: LatentDataConfig is kind 'latents', got {self.kind!r}")
        for field in ("cache", "val_cache"):
            path = getattr(self, field)
            if path is None:
                continue
            meta = read_cache_meta(path)
            if not resolve_shards(str(Path(path) / "latents-*.tar")):
                raise ValueError(f"data.{field}: '{path}' has {CACHE_FILE} but no latents-*.tar shards")
            if field == "val_cache" and (meta["vae"], meta["text_encoder"]) != (self.meta()["vae"], self.meta()["text_encoder"]):
                raise ValueError("data.val_cache: built with other encoders than data.cache")
        for field in ("batch_size", "num_workers", "shuffle_buffer"):
            value = getattr(self, field)
            if not (isinstance(value, int) and value >= (1 if field == "batch_size" else 0)):
                raise ValueError(f"data.{field}: must be an integer >= {1 if field == 'batch_size' else 0}, got {value!r}")


def load_null_text(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = load_file(str(Path(path) / NULL_TEXT_FILE))
    return tensors["text_emb"].float(), tensors["text_mask"].bool()  # [L0, D], [L0]


class LatentShardDataset(PlannedShardDataset):
    """Yields collated latent batches {"latents" [B, C, T', H', W'], "text_emb" [B, L, D],
    "text_mask" [B, L] bool, "null_text_emb" [L0, D], "null_text_mask" [L0], "caption", "key",
    "skipped", "skipped_by_reason", "position"} from a cache folder."""

    member_exts = ("safetensors", "txt")

    def __init__(self, cache: str | os.PathLike, batch_size: int, *, seed: int = 0, infinite: bool = True,
                 shuffle: bool = True, rank: int | None = None, world_size: int | None = None,
                 start: tuple[int, int] = (0, 0), index=None):
        meta = read_cache_meta(cache)
        urls = resolve_shards(str(Path(cache) / "latents-*.tar"))
        index = index if index is not None else load_index(urls, required=("safetensors",), sizes=False)
        t, (h, w) = meta["bucket"]["num_frames"], meta["bucket"]["size"]
        super().__init__(index, np.zeros(len(index), np.int64), [Bucket(t, h, w, batch_size)], seed=seed,
                         infinite=infinite, shuffle=shuffle, batched=True, rank=rank, world_size=world_size,
                         start=start)
        self.null_text_emb, self.null_text_mask = load_null_text(cache)

    def load(self, raw: dict[str, bytes], key: str, bucket: Bucket, rng: np.random.Generator) -> dict:
        from safetensors.torch import load as load_safetensors

        try:
            tensors = load_safetensors(raw["safetensors"])
            latents, text_emb = tensors["latents"], tensors["text_emb"]
        except Exception as exn:  # a corrupt member: safetensors raises its own error types
            raise SampleError("bad_latents", f"{type(exn).__name__}: {str(exn)[:200]}") from None
        return {"latents": latents, "text_emb": text_emb, "caption": read_caption(raw), "key": key}

    def collate(self, items: list[dict]) -> dict:
        return collate_latents(items, self.null_text_emb, self.null_text_mask)


def collate_latents(items: list[dict], null_text_emb: torch.Tensor, null_text_mask: torch.Tensor) -> dict:
    """Stack latents, pad text to the longest caption of the batch (mask False on padding)."""
    by_reason: Counter[str] = Counter()
    for s in items:
        by_reason.update(s.get("skipped_by_reason", {}))
    length = max(s["text_emb"].shape[0] for s in items)
    dim = items[0]["text_emb"].shape[1]
    text_emb = torch.zeros(len(items), length, dim)  # [B, L, D]
    text_mask = torch.zeros(len(items), length, dtype=torch.bool)  # [B, L]
    for i, s in enumerate(items):
        n = s["text_emb"].shape[0]
        text_emb[i, :n] = s["text_emb"].float()
        text_mask[i, :n] = True
    return {
        "latents": torch.stack([s["latents"].float() for s in items]),  # [B, C, T', H', W']
        "text_emb": text_emb,
        "text_mask": text_mask,
        "null_text_emb": null_text_emb,  # [L0, D]
        "null_text_mask": null_text_mask,  # [L0]
        "caption": [s["caption"] for s in items],
        "key": [s["key"] for s in items],
        "skipped": torch.tensor(sum(by_reason.values()), dtype=torch.int64),
        "skipped_by_reason": dict(by_reason),
    }


class LatentDataModule(ResumableDataModule):
    """Training (infinite, exact order) and validation loaders over a latent cache; the same
    state_dict as VideoDataModule (see dit_video/data/dataset.py)."""

    def __init__(self, cfg: LatentDataConfig | Mapping):
        super().__init__()
        self.cfg = cfg if isinstance(cfg, LatentDataConfig) else LatentDataConfig(**cfg)

    def setup(self, stage: str | None = None) -> None:
        self.cfg.validate()

    def check_encoders(self, vae_identity: Mapping, text_identity: Mapping) -> None:
        """ValueError naming both identities if the cache was built by other encoders."""
        check_identity(self.cfg.meta(), vae_identity, text_identity)

    def train_dataset(self) -> LatentShardDataset:
        cfg = self.cfg
        cfg.validate()
        rank, world = self._rank_world()
        self.train_world_size = world
        index = load_index(resolve_shards(str(Path(cfg.cache) / "latents-*.tar")), required=("safetensors",),
                           sizes=False)
        start = self._start(index.fingerprint(), cfg.seed)
        return LatentShardDataset(cfg.cache, cfg.batch_size, seed=cfg.seed, infinite=True,
                                  shuffle=cfg.shuffle_buffer > 0, rank=rank, world_size=world, start=start, index=index)

    def train_dataloader(self):
        return self._loader(self.train_dataset(), self.cfg.num_workers)

    def val_dataloader(self):
        if self.cfg.val_cache is None:
            return []
        rank, world = self._rank_world() if getattr(self, "trainer", None) is not None else dist_info()
        dataset = LatentShardDataset(self.cfg.val_cache, self.cfg.batch_size, seed=self.cfg.seed, infinite=False,
                                     shuffle=False, rank=rank, world_size=world)
        return self._loader(dataset, self.cfg.num_workers)
