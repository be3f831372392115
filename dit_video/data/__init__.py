"""Shards -> clips (or cached latents): writing, indexing, ordering, decoding and loading.

  synthetic.py  demo vocabulary (COLOURS, SHAPES, DIRECTIONS) and render_clip
  shards.py     encode_mp4, ShardWriter: the one way clips are written to disk
  index.py      tar headers -> random-access sample index; structural damage counted by reason
  order.py      the exact, resumable sample order: f(seed, epoch, world size, rank, worker)
  buckets.py    (num_frames, H, W) buckets with batch sizes from a voxel budget
  packing.py    token-budget packed batches of clips of any bucket (data.packing; DiT.forward_packed)
  balance.py    clip costs (DiT FLOPs) and steps of like-cost batches across ranks (data.balance)
  decode.py     decode_clip (decord / PyAV), decode_image, decode_frames, resize_crop, TimedCall
  config.py     VideoDataConfig, resolve_shards (shard specs -> local files; URLs refused)
  samples.py    one sample's members -> caption, metadata, per-key seed; collate_clips
  dataset.py    PlannedShardDataset: walks the plan over ranks and workers, replaces bad samples
                (its docstring states the exact-resume guarantee)
  clips.py      VideoShardDataset, PackedVideoShardDataset: the plan read as clips
  datamodule.py ResumableDataModule, VideoDataModule (state_dict: the loader position for
                checkpoints)
  latents.py    LatentDataConfig, LatentShardDataset, LatentDataModule (data=latents)
  browse.py     browse_shards, shard_stats: look at shards in a notebook (no training machinery)

Import from the module that defines a name (e.g. `from dit_video.data.config import VideoDataConfig`).
"""
