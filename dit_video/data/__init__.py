"""Shards -> clips (or cached latents): writing, indexing, ordering, decoding and loading.

  synthetic.py  demo vocabulary (COLOURS, SHAPES, DIRECTIONS) and render_clip
  shards.py     encode_mp4, ShardWriter: the one way clips are written to disk
  index.py      tar headers -> random-access sample index; structural damage counted by reason
  order.py      the exact, resumable sample order: f(seed, epoch, world size, rank, worker)
  buckets.py    (num_frames, H, W) buckets with batch sizes from a voxel budget
  packing.py    token-budget packed batches of clips of any bucket (data.packing; DiT.forward_packed)
  decode.py     decode_clip (decord / PyAV), decode_image, resize_crop, TimedCall, SampleError
  config.py     VideoDataConfig, resolve_shards (shard specs -> local files; URLs refused)
  samples.py    one sample's members -> caption, metadata, per-key seed; collate_clips
  dataset.py    PlannedShardDataset: walks the plan over ranks and workers, replaces bad samples
                (its docstring states the exact-resume guarantee)
  clips.py      VideoShardDataset, PackedVideoShardDataset: the plan read as clips
  datamodule.py ResumableDataModule, VideoDataModule (state_dict: the loader position for
                checkpoints)
  latents.py    LatentDataConfig, LatentShardDataset, LatentDataModule (data=latents)
"""

import importlib

_EXPORTS = {
    "SampleError": "decode", "decode_clip": "decode", "resize_crop": "decode",
    "ShardWriter": "shards", "encode_mp4": "shards",
    "VideoDataConfig": "config", "VideoDataModule": "datamodule", "VideoShardDataset": "clips",
    "collate_clips": "samples",
    "Bucket": "buckets", "make_buckets": "buckets",
    "LatentDataConfig": "latents", "LatentDataModule": "latents", "LatentShardDataset": "latents",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    # Imported on first use: the probe and make_demo need only numpy-level modules, and
    # importing lightning for them would cost seconds.
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"dit_video.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'dit_video.data' has no attribute {name!r}")
