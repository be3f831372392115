"""Write generated clips: one labelled mp4 per clip and a PNG grid of frames."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image


def slug(text: str, max_len: int = 48) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:max_len] or "empty"


def frame_grid(clips: np.ndarray, max_frames: int = 9, cell: int = 64) -> Image.Image:
    """uint8 [N, T, H, W, 3] -> one image, a row per clip and up to max_frames evenly spaced columns."""
    n, t = clips.shape[:2]
    cols = np.linspace(0, t - 1, min(max_frames, t)).round().astype(int)
    h, w = clips.shape[2:4]
    scale = max(1, cell // max(h, w))  # nearest-neighbour upscaling keeps tiny demo frames crisp
    rows = [np.concatenate([clips[i, j] for j in cols], axis=1) for i in range(n)]  # [H, W*cols, 3]
    grid = np.concatenate(rows, axis=0)  # [N*H, cols*W, 3]
    return Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)


def write_samples(clips: np.ndarray, prompts: list[str], seeds: list[int], out_dir: Path, fps: float,
                  settings: dict) -> dict:
    """Write `NNN_<prompt>.mp4` + `.json` sidecars and `grid.png`; returns the paths written."""
    from dit_video.data.shards import encode_mp4

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    videos = []
    for i, (clip, prompt, seed) in enumerate(zip(clips, prompts, seeds)):
        path = out_dir / f"{i:03d}_{slug(prompt)}.mp4"
        path.write_bytes(encode_mp4(clip, fps))
        sidecar = {"prompt": prompt, "seed": seed, "ai_generated": True, "generator": "dit-video", **settings}
        path.with_suffix(".json").write_text(json.dumps(sidecar, indent=2))
        videos.append(str(path))
    grid = out_dir / "grid.png"
    frame_grid(clips).save(grid)
    (out_dir / "prompts.txt").write_text("\n".join(prompts) + "\n")
    return {"videos": videos, "grid": str(grid)}
