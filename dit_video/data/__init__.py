"""Shards -> clips: the synthetic demo world, the shard writer, decoding and the loader.

  synthetic.py  demo vocabulary (COLOURS, SHAPES, DIRECTIONS) and render_clip
  shards.py     encode_mp4, ShardWriter: the one way clips are written to disk
  decode.py     decode_clip (decord / PyAV), resize_crop, SampleError
  loader.py     VideoDataConfig, VideoShardDataset, collate_clips, VideoDataModule
"""

import importlib

_EXPORTS = {
    "SampleError": "decode", "decode_clip": "decode", "resize_crop": "decode",
    "ShardWriter": "shards", "encode_mp4": "shards",
    "VideoDataConfig": "loader", "VideoDataModule": "loader", "VideoShardDataset": "loader",
    "collate_clips": "loader",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    # Imported on first use: the probe and make_demo need only numpy-level modules, and
    # importing lightning for them would cost seconds.
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"dit_video.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'dit_video.data' has no attribute {name!r}")
