"""Caption-faithfulness probe for the synthetic demo: does a generated clip show the colour,
motion direction and shape its caption asked for?

Each attribute is read off the pixels with hand-written, robust statistics (no learned
model, so the probe cannot share a generator's biases):
  foreground  pixels far from the clip's median colour (the background covers most pixels)
  colour      saturation-weighted vote of foreground pixels for the nearest palette hue
  direction   least-squares slope of the foreground centroid over frames; the axis with the
              larger |slope| and its sign (image coordinates: "down" is +y)
  shape       which corners of its bounding box the foreground fills: a square all four, an
              apex-up triangle the lower two, a circle none

`score` = mean of colour and direction accuracy: the two attributes that stay readable on
blurry samples. Chance is 1/5 for colour and 1/4 for direction.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from dit_video.data.synthetic import COLOURS, DIRECTIONS, SHAPES, caption_for

# A pixel is foreground if it is at least this far (RGB Euclidean) from the background, or
# half as far as the clip's most distinct pixels, whichever is larger: absolute enough to
# ignore compression noise, relative enough to follow a faded, blurry generated shape.
MIN_CONTRAST = 40.0
RELATIVE_CONTRAST = 0.5
# Frames with fewer foreground pixels than this carry no usable centroid or shape.
MIN_PIXELS = 4
# Box pixels with |u| + |v| above this (u, v in [-1, 1]) form the corner regions; every such
# point is outside the inscribed circle (u^2 + v^2 >= 1.5^2 / 2 > 1); 1.6 would also exclude
# the rounded corners of a blurred square.
CORNER_L1 = 1.5


def _hue(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float RGB [..., 3] in [0, 255] -> (hue in degrees [...], chroma = max - min [...])."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = rgb.max(axis=-1), rgb.min(axis=-1)
    chroma = mx - mn
    safe = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(mx == r, ((g - b) / safe) % 6, np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4))
    return hue * 60.0, chroma


_PALETTE_NAMES = list(COLOURS)
_PALETTE_HUES, _ = _hue(np.array([COLOURS[n] for n in _PALETTE_NAMES], dtype=np.float64))  # [K]


def parse_caption(caption: str) -> dict[str, str]:
    """"a red square moving left" -> {"colour": "red", "shape": "square", "direction": "left"}.
    Raises ValueError unless the caption names exactly one word of each vocabulary."""
    words = re.findall(r"[a-z]+", caption.lower())
    out = {}
    for attribute, vocabulary in (("colour", COLOURS), ("shape", SHAPES), ("direction", DIRECTIONS)):
        found = [w for w in words if w in vocabulary]
        if len(found) != 1:
            raise ValueError(
                f"caption {caption!r} must name exactly one {attribute} from {list(vocabulary)}; "
                "the probe only understands captions of the synthetic demo set"
            )
        out[attribute] = found[0]
    return out


def _foreground(clip: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [T, H, W, 3] -> (mask bool [T, H, W], contrast float [T, H, W])."""
    x = clip.astype(np.float32)  # [T, H, W, 3]
    background = np.median(x.reshape(-1, 3), axis=0)  # [3]
    contrast = np.linalg.norm(x - background, axis=-1)  # [T, H, W]
    threshold = max(MIN_CONTRAST, RELATIVE_CONTRAST * float(np.percentile(contrast, 99.5)))
    return contrast > threshold, contrast


def _predict_colour(clip: np.ndarray, mask: np.ndarray) -> str | None:
    if not mask.any():
        return None
    hue, chroma = _hue(clip[mask].astype(np.float64))  # [P] each
    gap = np.abs(hue[:, None] - _PALETTE_HUES[None, :]) % 360  # [P, K]
    nearest = np.minimum(gap, 360 - gap).argmin(axis=1)  # [P]
    # Weight by chroma: washed-out edge and noise pixels have an unreliable hue.
    votes = np.bincount(nearest, weights=chroma, minlength=len(_PALETTE_NAMES))  # [K]
    return _PALETTE_NAMES[int(votes.argmax())]


def _predict_direction(mask: np.ndarray, contrast: np.ndarray) -> str | None:
    weights = np.where(mask, contrast, 0.0)  # [T, H, W]
    _, height, width = mask.shape
    ys, xs = np.arange(height) + 0.5, np.arange(width) + 0.5
    times, cx, cy = [], [], []
    for t in range(mask.shape[0]):
        if mask[t].sum() < MIN_PIXELS:
            continue
        total = weights[t].sum()
        times.append(t)
        cx.append((weights[t].sum(axis=0) * xs).sum() / total)
        cy.append((weights[t].sum(axis=1) * ys).sum() / total)
    if len(times) < 2:
        return None
    slope_x = np.polyfit(times, cx, 1)[0]  # pixels per frame
    slope_y = np.polyfit(times, cy, 1)[0]
    if abs(slope_x) >= abs(slope_y):
        return "right" if slope_x > 0 else "left"
    return "down" if slope_y > 0 else "up"


def _majority_filter(mask: np.ndarray) -> np.ndarray:
    """bool [H, W] -> bool [H, W]: keep pixels with at least 4 of 8 neighbours set (drops specks)."""
    padded = np.pad(mask, 1).astype(np.int8)
    height, width = mask.shape
    neighbours = sum(
        padded[1 + dy:1 + dy + height, 1 + dx:1 + dx + width]
        for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)
    )
    return mask & (neighbours >= 4)


def corner_fill(frame: np.ndarray) -> tuple[float, float] | None:
    """bool [H, W] mask -> (upper, lower) fraction of the bounding box's corner regions that
    are filled, or None if the frame shows no shape.

    Corner regions are the box pixels with |u| + |v| > CORNER_L1 in box coordinates u, v in
    [-1, 1]; they lie outside the inscribed circle. So a square fills all four (1, 1), a
    circle none (0, 0), and an apex-up triangle only the lower two (0, 1). Robust to blur,
    unlike the ideal area ratios 1.0 / 0.785 / 0.5, which pixelation alone moves by ~0.15.
    """
    core = _majority_filter(frame)  # the box comes from the speck-free mask ...
    if core.sum() < MIN_PIXELS:
        return None
    rows, cols = np.nonzero(core)
    box = frame[rows.min():rows.max() + 1, cols.min():cols.max() + 1]  # ... the fill from the original
    height, width = box.shape
    v = (np.arange(height) + 0.5) / height * 2 - 1  # [h]
    u = (np.arange(width) + 0.5) / width * 2 - 1  # [w]
    corner = np.abs(v)[:, None] + np.abs(u)[None, :] > CORNER_L1  # [h, w]
    upper, lower = corner & (v < 0)[:, None], corner & (v > 0)[:, None]
    if not upper.any() or not lower.any():
        return None  # a box this thin has no corners to read
    return float(box[upper].mean()), float(box[lower].mean())


def _predict_shape(mask: np.ndarray) -> str | None:
    fills = [f for f in (corner_fill(frame) for frame in mask) if f is not None]
    if not fills:
        return None
    upper, lower = np.median(np.array(fills), axis=0)
    if lower - upper > 0.5:
        return "triangle"
    return "square" if (upper + lower) / 2 > 0.5 else "circle"


def predict_attributes(clip: np.ndarray) -> dict[str, str | None]:
    """uint8 [T, H, W, 3] -> {"colour", "direction", "shape"}; None where nothing is visible."""
    mask, contrast = _foreground(clip)  # [T, H, W] each
    return {
        "colour": _predict_colour(clip, mask),
        "direction": _predict_direction(mask, contrast),
        "shape": _predict_shape(mask),
    }


def caption_faithfulness(clips: np.ndarray | Sequence[np.ndarray], captions: Sequence[str]) -> dict:
    """Score generated clips against the captions they were generated from.

    clips: uint8 [N, T, H, W, 3] (numpy or torch) or a list of uint8 [T, H, W, 3].
    Returns {"score": mean of colour and direction accuracy (the headline number),
    "colour", "direction", "shape": accuracies in [0, 1], "chance_colour", "chance_direction",
    "chance_shape": what random guessing scores, "num_clips": N,
    "per_clip": [{"caption", "target": {...}, "predicted": {...}}] (None = nothing visible)}.
    """
    clips = [np.asarray(c.cpu() if hasattr(c, "cpu") else c) for c in clips]
    if len(clips) != len(captions):
        raise ValueError(f"caption_faithfulness: {len(clips)} clips but {len(captions)} captions")
    if not clips:
        raise ValueError("caption_faithfulness: no clips to score")
    for i, clip in enumerate(clips):
        if clip.dtype != np.uint8 or clip.ndim != 4 or clip.shape[-1] != 3:
            raise ValueError(
                f"caption_faithfulness: clip {i} must be uint8 [T, H, W, 3], got {clip.dtype} {tuple(clip.shape)}; "
                "convert float videos with dit_video.encoders.base.video_to_clip"
            )
    targets = [parse_caption(c) for c in captions]  # before any pixel work: fail fast on bad captions
    predictions = [predict_attributes(c) for c in clips]
    accuracy = {
        attribute: float(np.mean([p[attribute] == t[attribute] for p, t in zip(predictions, targets, strict=True)]))
        for attribute in ("colour", "direction", "shape")
    }
    return {
        "score": (accuracy["colour"] + accuracy["direction"]) / 2,
        **accuracy,
        "chance_colour": 1 / len(COLOURS),
        "chance_direction": 1 / len(DIRECTIONS),
        "chance_shape": 1 / len(SHAPES),
        "num_clips": len(clips),
        "per_clip": [
            {"caption": c, "target": t, "predicted": p}
            for c, t, p in zip(captions, targets, predictions, strict=True)
        ],
    }


def probe_prompts(seeds_per_prompt: int) -> tuple[list[str], list[int]]:
    """The probe's prompt set: every colour x direction once per seed, shapes cycling, so the
    score covers the vocabulary. Returns (prompts, seeds), seed 1000 * s + i."""
    prompts, seeds = [], []
    for s in range(seeds_per_prompt):
        for i, (colour, direction) in enumerate((c, d) for c in COLOURS for d in DIRECTIONS):
            prompts.append(caption_for(colour, SHAPES[(i + s) % len(SHAPES)], direction))
            seeds.append(1000 * s + i)
    return prompts, seeds


def probe_applies(prompts: Sequence[str]) -> bool:
    """True when every prompt parses as a demo caption (colour, shape, direction): only then
    does the probe measure anything."""
    try:
        for p in prompts:
            parse_caption(p)
    except ValueError:
        return False
    return True
