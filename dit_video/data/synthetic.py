"""The synthetic demo world: coloured shapes moving in straight lines on a dark background.

The vocabulary below is shared by the generator (`data_prep/make_demo.py`) and the
caption-faithfulness probe (`dit_video/metrics/probe.py`), so a caption the generator writes is
always one the probe can parse. Every attribute is recoverable from pixels alone: colour from
the hue of the foreground, direction from its centroid track, shape from how it fills its
bounding box.
"""

from __future__ import annotations

import numpy as np

# Five hues at least ~55 degrees apart (red 0, yellow 55, green 130, blue 230, magenta 300), so a
# blurry generated clip still lands nearest to the right one. Values stay below 255 so H.264's
# limited-range YUV round trip does not clip them.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 40, 40),
    "yellow": (225, 205, 40),
    "green": (40, 205, 75),
    "blue": (45, 85, 235),
    "magenta": (220, 45, 220),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
# Unit steps in image coordinates: x grows to the right, y grows downwards, so "down" is +y.
DIRECTIONS: dict[str, tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}
# The demo set's clip shape (`make_demo` defaults, conf/data/demo.yaml): 17 frames of 32 x 32.
DEMO_SIZE = 32
DEMO_FRAMES = 17
# Dark and nearly neutral: every palette colour is far from it in brightness and saturation.
BACKGROUND: tuple[int, int, int] = (20, 20, 28)

# Over a whole clip the shape travels this fraction of the frame: large enough that the
# direction is unmistakable, small enough that a shape of the largest size stays in frame.
TRAVEL_FRACTION = 0.5
# Shape side as a fraction of the frame's short side: 8-12 px at 32x32.
MIN_SIZE_FRACTION = 0.25
MAX_SIZE_FRACTION = 0.375


def caption_for(colour: str, shape: str, direction: str) -> str:
    """The one caption template of the demo set, e.g. "a red square moving left"."""
    return f"a {colour} {shape} moving {direction}"


def all_combinations() -> list[tuple[str, str, str]]:
    """Every (colour, shape, direction) triple, in a fixed order."""
    return [(c, s, d) for c in COLOURS for s in SHAPES for d in DIRECTIONS]


def _shape_mask(shape: str, cx: float, cy: float, side: float, height: int, width: int) -> np.ndarray:
    """bool [H, W]: pixel centres inside a shape of bounding box `side` centred at (cx, cy)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5  # pixel centres  # [H, W] each
    dx, dy = xs - cx, ys - cy
    half = side / 2
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "circle":
        return dx * dx + dy * dy <= half * half
    if shape == "triangle":
        # Apex up, base down, filling half its bounding box: at height v in [0, 1] from the apex
        # the half-width is v * half.
        v = (dy + half) / side
        return (v >= 0) & (v <= 1) & (np.abs(dx) <= v * half)
    raise ValueError(f"shape {shape!r} is not one of {SHAPES}")


def render_clip(
    colour: str,
    shape: str,
    direction: str,
    num_frames: int,
    size: int | tuple[int, int],
    rng: np.random.Generator,
) -> np.ndarray:
    """Render one demo clip as uint8 [T, H, W, 3].

    The shape's side is drawn from 8-12 px at 32x32 (scaled with the frame) and its start from
    every position that keeps it fully in frame for the whole clip; it moves at constant speed
    so it travels TRAVEL_FRACTION of the frame over the clip. Hard edges: no anti-aliasing.
    """
    if colour not in COLOURS:
        raise ValueError(f"colour {colour!r} is not one of {sorted(COLOURS)}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction {direction!r} is not one of {sorted(DIRECTIONS)}")
    if shape not in SHAPES:
        raise ValueError(f"shape {shape!r} is not one of {SHAPES}")
    height, width = (size, size) if isinstance(size, int) else size
    if num_frames < 2:
        raise ValueError(f"num_frames must be >= 2 for a moving shape, got {num_frames}")

    short = min(height, width)
    side = rng.uniform(MIN_SIZE_FRACTION * short, MAX_SIZE_FRACTION * short)
    ux, uy = DIRECTIONS[direction]
    travel_x, travel_y = TRAVEL_FRACTION * width * abs(ux), TRAVEL_FRACTION * height * abs(uy)
    # Centre ranges that keep the box [c - side/2, c + side/2] in frame at both ends of the path.
    lo_x, hi_x = side / 2, width - side / 2 - travel_x
    lo_y, hi_y = side / 2, height - side / 2 - travel_y
    if hi_x < lo_x or hi_y < lo_y:
        raise ValueError(f"frame {height}x{width} is too small for a shape of side {side:.1f} to travel in")
    start_x, start_y = rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)
    if ux < 0:  # moving left: start at the right end of the path
        start_x += travel_x
    if uy < 0:  # moving up: start at the bottom end of the path
        start_y += travel_y

    clip = np.empty((num_frames, height, width, 3), dtype=np.uint8)  # [T, H, W, 3]
    clip[:] = BACKGROUND
    rgb = np.array(COLOURS[colour], dtype=np.uint8)
    for t in range(num_frames):
        progress = t / (num_frames - 1)
        cx = start_x + ux * travel_x * progress
        cy = start_y + uy * travel_y * progress
        clip[t][_shape_mask(shape, cx, cy, side, height, width)] = rgb
    return clip
