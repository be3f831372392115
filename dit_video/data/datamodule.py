"""Lightning data modules over the planned datasets: the loader position in checkpoints.

ResumableDataModule keeps the training position (epoch, global batches consumed) and is the
checkpoint interface (state_dict / load_state_dict; dataset.py's docstring states the exact-resume
guarantee); VideoDataModule builds the training and validation loaders over video shards.
LatentDataModule (latents.py) is the same for latent caches.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import lightning as L
import torch
from lightning.pytorch.strategies import ParallelStrategy
from torch.utils.data import DataLoader, IterableDataset

from dit_video.data.balance import ClipCosts, cost_table, loader_position
from dit_video.data.buckets import image_buckets
from dit_video.data.clips import PackedVideoShardDataset, VideoShardDataset
from dit_video.data.config import VideoDataConfig, resolve_shards
from dit_video.data.dataset import dist_info
from dit_video.data.index_cache import load_index
from dit_video.data.packing import TokensPerClip, bucket_tokens

logger = logging.getLogger(__name__)


def _as_is(batch):
    return batch  # the dataset collates: the DataLoader only moves batches across processes


class ResumableDataModule(L.LightningDataModule):
    """Holds the training loader position and implements the checkpoint interface described in
    dataset.py's docstring. Subclasses build `_train_dataset(start, rank, world_size)`."""

    STATE_VERSION = 1

    def __init__(self):
        super().__init__()
        self._position = (0, 0)  # (epoch, global batches consumed in it)
        self._restored: dict | None = None
        self._fingerprint: str | None = None
        self.train_world_size = 1

    def _seed(self) -> int:
        return int(self.cfg.seed)

    def state_dict(self) -> dict:
        state = {
            "version": self.STATE_VERSION,
            "epoch": int(self._position[0]),
            "batches_into_epoch": int(self._position[1]),
            "seed": self._seed(),
            "world_size": int(self.train_world_size),
            "fingerprint": self._fingerprint,
        }
        if len(self._position) > 2:  # balanced steps: the epoch's world-size history (balance.segment_order)
            state["segments"] = [list(segment) for segment in self._position[2]]
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != self.STATE_VERSION:
            raise ValueError(f"data loader state version {state.get('version')!r} is not {self.STATE_VERSION}")
        self._restored = dict(state)
        self._position = loader_position((state["epoch"], state["batches_into_epoch"], state.get("segments", ())))

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        if isinstance(batch, dict) and batch.get("position") is not None:
            self._position = loader_position(batch["position"])  # consumed, not just prefetched
        return batch

    def _rank_world(self) -> tuple[int, int]:
        """(rank, world size) to shard data by: the data-parallel ones. Under a Trainer they are
        the strategy's DistributedSampler arguments, which dit_video.parallel's sequence-parallel
        strategies set so all ranks of one group read the same batches (= trainer rank/world otherwise)."""
        trainer = getattr(self, "trainer", None)  # set by Lightning's Trainer; None when used alone
        if trainer is not None and isinstance(trainer.strategy, ParallelStrategy) and trainer.world_size > 1:
            kwargs = trainer.strategy.distributed_sampler_kwargs
            return int(kwargs["rank"]), int(kwargs["num_replicas"])
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        return dist_info()

    def _start(self, fingerprint: str, seed: int) -> tuple:
        """Where training enters the order, after checking a restored state fits this data."""
        self._fingerprint = fingerprint
        if self._restored is None:
            return self._position
        state, self._restored = self._restored, None
        if state.get("fingerprint") not in (None, fingerprint) or state.get("seed") != seed:
            logger.warning(
                "data loader state is for other data or another seed (fingerprint %s, seed %s; now %s, %s): "
                "starting epoch %d from its beginning", state.get("fingerprint"), state.get("seed"),
                fingerprint, seed, int(state["epoch"]) + 1)
            self._position = (int(state["epoch"]) + 1, 0)
        return self._position

    def _loader(self, dataset: IterableDataset, num_workers: int) -> DataLoader:
        return DataLoader(
            dataset, batch_size=None, num_workers=num_workers, collate_fn=_as_is,
            # Persistent workers keep their place in the infinite training stream across validation.
            persistent_workers=num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )


class VideoDataModule(ResumableDataModule):
    """Training (infinite, exact order, `cfg.crop`, buckets) and validation (one pass, centre
    crop, fixed seed) loaders over WebDataset video shards; resumable via state_dict()."""

    def __init__(self, cfg: VideoDataConfig | Mapping):
        super().__init__()
        # A mapping (e.g. Hydra's cfg.data) is checked field by field: unknown keys are a TypeError.
        self.cfg = cfg if isinstance(cfg, VideoDataConfig) else VideoDataConfig(**cfg)
        # (num_frames, height, width) -> DiT tokens of a clip; set by the run from its VAE and DiT
        # (run.py), read only by data.packing.
        self.tokens_per_clip: TokensPerClip | None = None
        # (num_frames, height, width) -> balance.ClipCost (the DiT's FLOPs); set by the run (run.py),
        # read by data.balance and for the planned per-step rank_imbalance / pad_fraction.
        self.clip_cost: ClipCosts | None = None

    def setup(self, stage: str | None = None) -> None:
        self.cfg.validate()  # here, not in __init__: composing a config must not need the data

    def train_dataset(self) -> VideoShardDataset:
        cfg = self.cfg
        cfg.validate()
        rank, world = self._rank_world()
        self.train_world_size = world
        urls = resolve_shards(cfg.shards)
        index = load_index(urls)
        start = self._start(index.fingerprint(), cfg.seed)
        if cfg.packing.enabled:
            return self._packed_train_dataset(urls, index, start, rank, world)
        return VideoShardDataset(
            urls, cfg.num_frames, cfg.fps, cfg.size, crop=cfg.crop, decoder=cfg.decoder,
            shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed, infinite=True, batch_size=cfg.batch_size,
            buckets=cfg.bucket_table(), decode_timeout=cfg.decode_timeout, batched=True, rank=rank,
            world_size=world, start=start, index=index, image_ratio=cfg.image_ratio,
            image_batch_size=cfg.image_batch_size, balance=cfg.balance, costs=self._costs(cfg),
        )

    def _packed_train_dataset(self, urls, index, start, rank, world) -> PackedVideoShardDataset:
        cfg = self.cfg
        if self.tokens_per_clip is None:
            raise ValueError(
                "data.packing.enabled: the loader needs the DiT's tokens per clip; train through dit_video.run "
                "(task=dit) or set VideoDataModule.tokens_per_clip = f(num_frames, height, width)"
            )
        buckets = cfg.bucket_table()
        return PackedVideoShardDataset(
            urls, cfg.num_frames, cfg.fps, cfg.size, crop=cfg.crop, decoder=cfg.decoder, seed=cfg.seed,
            infinite=True, buckets=buckets, decode_timeout=cfg.decode_timeout, batched=True, rank=rank,
            world_size=world, start=start, index=index,
            tokens=bucket_tokens(buckets, self.tokens_per_clip, cfg.packing.max_tokens),
            max_tokens=cfg.packing.max_tokens, open_packs=cfg.packing.open_packs, fit=cfg.packing.fit,
            balance=cfg.balance, costs=self._costs(cfg),
        )

    def _costs(self, cfg: VideoDataConfig) -> dict | None:
        """ClipCost of every shape a training batch can have (buckets and image buckets), or None."""
        if self.clip_cost is None:
            return None
        buckets = cfg.bucket_table()
        return cost_table(self.clip_cost, buckets + image_buckets(buckets, cfg.image_batch_size))

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset(), self.cfg.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        cfg = self.cfg
        if cfg.val_shards is None:
            return []  # Lightning skips validation for an empty list
        cfg.validate()
        rank, world = self._rank_world()
        dataset = VideoShardDataset(
            cfg.val_shards, cfg.num_frames, cfg.fps, cfg.size, crop="center", decoder=cfg.decoder,
            shuffle_buffer=0, seed=cfg.seed, infinite=False, batch_size=cfg.batch_size,
            buckets=cfg.bucket_table(), decode_timeout=cfg.decode_timeout, batched=True, rank=rank,
            world_size=world,
        )
        return self._loader(dataset, cfg.num_workers)
