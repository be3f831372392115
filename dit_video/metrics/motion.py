"""Camera motion and scene, read off the pixels: no learned weights, deterministic.

  estimate_motion   the global motion between consecutive frames: translation (dx, dy) by phase
                    correlation, refined together with a zoom (log scale about the frame centre)
                    by Gauss-Newton on the brightness-constancy residual; a pair without a
                    clear correlation peak (unrelated frames) counts as no motion
  clip_motion       a clip's whole motion as (pan, tilt, zoom): the least-squares slope of the
                    accumulated per-pair motion, times the clip's length, in frame fractions
  classify_motion   that motion as one camera-motion label (dit_video.data.camera conventions)
  motion_accuracy   labels of clips against the motion their captions name
  motion_fidelity   labels of clips against those of reference clips (a VAE's reconstructions
                    against its inputs): 1.0 when every clip moves as its reference does
  scene_accuracy    the scene of clips, by nearest neighbours in colour statistics among real
                    reference clips, against the scene their captions name
  camera_scores     all of the above for generated (or reconstructed) clips against captions

Units: pan and tilt are how far the picture content moves over the whole clip, as a fraction of
the frame's width or height (+x right, +y down, so a camera panning left moves content by +x);
zoom is the content's displacement at the frame's mean distance from the centre (ZOOM_RADIUS of
its side), as a fraction of the frame, positive when content grows. The three are comparable, so
the largest names the motion. A slope over the accumulated path, not the sum of the steps,
is what tells a pan from shuffled frames: the sum of shuffled steps telescopes to a random
displacement, its slope stays near zero.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dit_video.data.camera import CAMERA_MOTIONS

# Frames are box-filtered down to at most this many pixels on their short side before estimation:
# global motion needs no more, and the cost stays flat for large videos.
WORK_SIZE = 64
# Gaussian blur (std in working pixels) before the gradient refinement: smooth gradients make the
# linearisation valid over the ~1-2 px a camera moves between frames.
BLUR_SIGMA = 1.0
GAUSS_NEWTON_STEPS = 8
# Frame pairs whose phase-correlation peak is lower than this share no coherent content (noise,
# flicker, a cut) and count as no motion. Measured: every consecutive pair of 40 held-out camera
# clips peaks at >= 0.36 (median 0.77); pairs of independent noise frames at <= 0.2.
MIN_PEAK = 0.25
# Mean distance of a frame's pixels from its centre, as a fraction of its side (0.383 for a square):
# a zoom by log-scale z moves content there by about z * ZOOM_RADIUS of the frame.
ZOOM_RADIUS = 0.383
# Below this much motion over the whole clip (a fraction of the frame: ~2.5 px at 32 x 32) a clip
# counts as still. The camera set's moves are 0.3-0.45 (pans) and ~0.2-0.3 (zooms).
STILL_THRESHOLD = 0.08
MOTION_LABELS = tuple(CAMERA_MOTIONS)


# ----------------------------------------------------------------------------- estimation


def _gray(clip: np.ndarray) -> np.ndarray:
    """uint8 [T, H, W, 3] -> float64 luma [T, h, w] in [0, 1], box-filtered to <= WORK_SIZE."""
    x = clip.astype(np.float64) @ np.array([0.299, 0.587, 0.114]) / 255.0  # [T, H, W]
    factor = max(1, min(x.shape[1:]) // WORK_SIZE)
    if factor > 1:
        t, h, w = x.shape
        h, w = h // factor * factor, w // factor * factor
        x = x[:, :h, :w].reshape(t, h // factor, factor, w // factor, factor).mean(axis=(2, 4))  # [T, h, w]
    return x


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of [..., H, W] with edge padding."""
    radius = max(1, int(round(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    pad = [(0, 0)] * (x.ndim - 2) + [(radius, radius), (radius, radius)]
    p = np.pad(x, pad, mode="edge")
    h, w = x.shape[-2:]
    rows = sum(k[i] * p[..., i:i + h, :] for i in range(len(k)))  # [..., H, W + 2r]
    return sum(k[i] * rows[..., :, i:i + w] for i in range(len(k)))  # [..., H, W]


def _phase_correlation(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frame pairs a, b [P, h, w] -> (dx [P], dy [P], peak [P]) with b(x) ~= a(x - d): where the
    content of `a` moved to in `b`, to a fraction of a pixel (a parabola through the peak and its
    neighbours), and the height of the correlation peak (1 for a pure shift)."""
    p, h, w = a.shape
    window = np.outer(np.hanning(h), np.hanning(w))  # damps the wrap-around edges
    fa = np.fft.fft2((a - a.mean(axis=(1, 2), keepdims=True)) * window)
    fb = np.fft.fft2((b - b.mean(axis=(1, 2), keepdims=True)) * window)
    cross = fb * np.conj(fa)
    surface = np.fft.ifft2(cross / (np.abs(cross) + 1e-9)).real  # [P, h, w], peaks at +d
    peak = surface.reshape(p, -1).argmax(axis=1)
    py, px, i = peak // w, peak % w, np.arange(p)

    def vertex(c_minus: np.ndarray, c0: np.ndarray, c_plus: np.ndarray) -> np.ndarray:
        denom = c_minus - 2 * c0 + c_plus
        safe = np.where(np.abs(denom) < 1e-12, 1.0, denom)
        return np.where(np.abs(denom) < 1e-12, 0.0, np.clip(0.5 * (c_minus - c_plus) / safe, -0.5, 0.5))

    c0 = surface[i, py, px]
    dy = py + vertex(surface[i, (py - 1) % h, px], c0, surface[i, (py + 1) % h, px])
    dx = px + vertex(surface[i, py, (px - 1) % w], c0, surface[i, py, (px + 1) % w])
    return np.where(dx > w / 2, dx - w, dx), np.where(dy > h / 2, dy - h, dy), c0  # wrap to [-w/2, w/2]


def _bilinear(img: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """img [P, H, W, C] sampled bilinearly at float pixel coordinates xs, ys [P, H, W] (clamped
    to the frame) -> [P, H, W, C], in float64. torch's grid_sample: ~7x numpy's gather here."""
    p, h, w, c = img.shape
    grid = torch.from_numpy(np.stack([xs / (w - 1) * 2 - 1, ys / (h - 1) * 2 - 1], axis=-1))  # [P, H, W, 2]
    src = torch.from_numpy(np.ascontiguousarray(img)).permute(0, 3, 1, 2)  # [P, C, H, W]
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=True)  # [P, C, H, W]
    return out.permute(0, 2, 3, 1).numpy()


def _refine(a: np.ndarray, b: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Gauss-Newton on (dx, dy, log scale z) for b(x) = a(c + (x - c - d) / e^z), c the frame
    centre, for frame pairs a, b [P, h, w] from a start (dx, dy) [P]; returns [P, 3].

    Pixels whose source falls outside `a` (content entering the frame) get no weight, and large
    residuals are down-weighted (Huber), so new content at the edges does not bias the fit."""
    p, h, w = a.shape
    gy, gx = np.gradient(a, axis=(1, 2))  # [P, h, w] each
    stacked = np.stack([a, gx, gy], axis=-1)  # [P, h, w, 3]: one interpolation for all three
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    theta = np.stack([dx, dy, np.zeros(p)], axis=1)  # [P, 3]
    for _ in range(GAUSS_NEWTON_STEPS):
        s = np.exp(theta[:, 2])[:, None, None]  # [P, 1, 1]
        u = xs - cx - theta[:, 0, None, None]  # [P, h, w]: position relative to the moved centre
        v = ys - cy - theta[:, 1, None, None]
        sx, sy = cx + u / s, cy + v / s  # where each pixel of b comes from in a
        inside = (sx >= 1) & (sx <= w - 2) & (sy >= 1) & (sy <= h - 2)
        warped = _bilinear(stacked, sx, sy)  # [P, h, w, 3]
        r = np.where(inside, b - warped[..., 0], 0.0)  # [P, h, w]
        ax, ay = warped[..., 1], warped[..., 2]
        # d a(source) / d(dx, dy, z): the source moves by -1/s per unit of d and by -(u, v)/s per unit of z
        jac = np.stack([-ax / s, -ay / s, -(ax * u + ay * v) / s], axis=-1).reshape(p, -1, 3)  # [P, h*w, 3]
        flat = r.reshape(p, -1)
        spread = 1.4826 * np.median(np.abs(np.where(inside, r, np.nan)).reshape(p, -1), axis=1)  # robust std
        spread = np.nan_to_num(spread, nan=0.0)[:, None] + 1e-6
        weight = inside.reshape(p, -1) * np.minimum(1.0, 1.5 * spread / (np.abs(flat) + 1e-12))  # [P, h*w]
        jw = jac * weight[..., None]
        lhs = jw.transpose(0, 2, 1) @ jac + 1e-6 * np.eye(3)  # [P, 3, 3]
        step = np.linalg.solve(lhs, (jw.transpose(0, 2, 1) @ flat[..., None]))[..., 0]  # [P, 3]
        ok = inside.reshape(p, -1).sum(axis=1) >= 16  # too little overlap: keep the phase estimate
        theta = theta + np.where(ok[:, None], step, 0.0)
        if np.abs(step).max() < 1e-3:
            break
    return theta


def estimate_motion(clip: np.ndarray) -> np.ndarray:
    """uint8 clip [T, H, W, 3] -> float64 [T - 1, 3]: per consecutive frame pair, the content's
    displacement (dx, dy) as a fraction of the frame's width and height, and the log zoom
    (positive when content grows)."""
    gray = _blur(_gray(_check_clip(clip)), BLUR_SIGMA)  # [T, h, w]
    h, w = gray.shape[1:]
    a, b = gray[:-1], gray[1:]  # [T - 1, h, w] each
    dx, dy, peak = _phase_correlation(a, b)
    motion = _refine(a, b, dx, dy)  # [T - 1, 3] in pixels and log scale
    flat = (a.std(axis=(1, 2)) < 1e-4) | (b.std(axis=(1, 2)) < 1e-4)  # a flat frame carries no motion
    motion[flat | (peak < MIN_PEAK)] = 0.0
    return motion / np.array([w, h, 1.0])


def clip_motion(clip: np.ndarray) -> np.ndarray:
    """uint8 clip [T, H, W, 3] -> float64 [3]: (pan, tilt, zoom) over the whole clip, in frame
    fractions (module docstring): the least-squares slope of the accumulated path times T - 1."""
    steps = estimate_motion(clip)  # [T - 1, 3]
    path = np.concatenate([np.zeros((1, 3)), np.cumsum(steps, axis=0)])  # [T, 3]
    t = np.arange(len(path), dtype=np.float64)
    t -= t.mean()
    slope = (t[:, None] * (path - path.mean(axis=0))).sum(axis=0) / (t * t).sum()  # [3] per frame
    motion = slope * (len(path) - 1)
    motion[2] *= ZOOM_RADIUS
    return motion


def classify_motion(motion: np.ndarray) -> str:
    """(pan, tilt, zoom) from clip_motion -> a camera-motion label: the largest component and its
    sign, or "still" below STILL_THRESHOLD."""
    i = int(np.abs(motion).argmax())
    if abs(motion[i]) < STILL_THRESHOLD:
        return "still"
    sign = int(np.sign(motion[i]))
    for label, direction in CAMERA_MOTIONS.items():
        if direction[i] == sign:
            return label
    raise AssertionError("every component and sign has a label")


# ----------------------------------------------------------------------------- captions


_MOTION_PATTERNS = [  # (regex, label): free-text phrasings of a camera motion
    (r"\bpan(?:s|ning|ned)?\s+(?:to\s+the\s+)?left\b", "pan left"),
    (r"\bpan(?:s|ning|ned)?\s+(?:to\s+the\s+)?right\b", "pan right"),
    (r"\btilt(?:s|ing|ed)?\s+up(?:wards?)?\b", "tilt up"),
    (r"\btilt(?:s|ing|ed)?\s+down(?:wards?)?\b", "tilt down"),
    (r"\bzoom(?:s|ing|ed)?\s+in\b", "zoom in"),
    (r"\bzoom(?:s|ing|ed)?\s+out\b", "zoom out"),
    (r"\bcamera\s+(?:is\s+|stays\s+|holds\s+)?(?:still|static|steady)\b|\bstatic\s+(?:shot|camera)\b", "still"),
]
_CLAUSE = re.compile(r",?\s*(?:and\s+|as\s+|while\s+)?the\s+camera\b.*$|,?\s*(?:a\s+)?static\s+(?:shot|camera)\b.*$")


def caption_motion(caption: str) -> str | None:
    """The camera motion a caption names ("pan left", ..., "still"), or None if it names none
    or more than one."""
    text = caption.lower()
    found = {label for pattern, label in _MOTION_PATTERNS if re.search(pattern, text)}
    return found.pop() if len(found) == 1 else None


def caption_scene(caption: str) -> str:
    """What a caption says is seen: the caption without its camera clause, normalised
    ("a city street with cars and bicycles, the camera pans left" -> "a city street with cars and bicycles")."""
    return " ".join(_CLAUSE.sub("", caption.lower().strip()).split())


def motion_applies(captions: Sequence[str]) -> bool:
    """True when every caption names exactly one camera motion."""
    return bool(captions) and all(caption_motion(c) is not None for c in captions)


# ----------------------------------------------------------------------------- scores


def _check_clip(clip) -> np.ndarray:
    clip = np.asarray(clip.cpu() if hasattr(clip, "cpu") else clip)
    if clip.dtype != np.uint8 or clip.ndim != 4 or clip.shape[-1] != 3 or clip.shape[0] < 2:
        raise ValueError(f"motion metrics need uint8 clips [T >= 2, H, W, 3], got {clip.dtype} {tuple(clip.shape)}; "
                         "convert float videos with dit_video.encoders.base.video_to_clip")
    return clip


def motion_labels(clips) -> tuple[list[str], np.ndarray]:
    """Clips (uint8 [N, T, H, W, 3] or a list of [T, H, W, 3]) -> (labels, motions float64 [N, 3])."""
    motions = np.array([clip_motion(c) for c in clips]).reshape(-1, 3)  # [N, 3]
    return [classify_motion(m) for m in motions], motions


def motion_accuracy(clips, captions: Sequence[str]) -> dict:
    """Fraction of clips whose estimated camera motion is the one their caption names.

    Returns {"motion": accuracy, "chance": 1 / 7, "per_clip": [{"caption", "target", "predicted",
    "motion": [pan, tilt, zoom]}]}. Raises ValueError if a caption names no camera motion."""
    if len(clips) != len(captions):
        raise ValueError(f"motion_accuracy: {len(clips)} clips but {len(captions)} captions")
    targets = [caption_motion(c) for c in captions]
    if None in targets:
        bad = captions[targets.index(None)]
        raise ValueError(f"caption {bad!r} names no single camera motion (pan left/right, tilt up/down, "
                         "zoom in/out, still)")
    labels, motions = motion_labels(clips)
    hits = [p == t for p, t in zip(labels, targets, strict=True)]
    return {"motion": float(np.mean(hits)) if hits else float("nan"), "chance": 1 / len(MOTION_LABELS),
            "per_clip": [{"caption": c, "target": t, "predicted": p, "motion": m.round(4).tolist()}
                         for c, t, p, m in zip(captions, targets, labels, motions, strict=True)]}


def motion_fidelity(reference_clips, clips) -> dict:
    """Agreement of the camera motion in `clips` with that in `reference_clips` (same order and
    count), e.g. a VAE's reconstructions against its inputs.

    Returns {"motion_fidelity": fraction of clips with the reference's motion label,
    "motion_error": mean Euclidean distance of (pan, tilt, zoom) in frame fractions}."""
    if len(clips) != len(reference_clips):
        raise ValueError(f"motion_fidelity: {len(clips)} clips but {len(reference_clips)} references")
    ref_labels, ref_motion = motion_labels(reference_clips)
    labels, motion = motion_labels(clips)
    return {"motion_fidelity": float(np.mean([a == b for a, b in zip(ref_labels, labels, strict=True)])),
            "motion_error": float(np.linalg.norm(ref_motion - motion, axis=1).mean())}


def scene_features(clip) -> np.ndarray:
    """uint8 clip [T, H, W, 3] -> float64 [F]: colour statistics that survive blur and motion:
    the mean and spread of each opponent channel, and a coarse joint histogram of them."""
    x = _check_clip(clip).astype(np.float64).reshape(-1, 3) / 255.0  # [P, 3]
    lum = x.mean(axis=1)
    rg, yb = x[:, 0] - x[:, 1], 0.5 * (x[:, 0] + x[:, 1]) - x[:, 2]
    channels = np.stack([lum, rg, yb], axis=1)  # [P, 3]
    hist, _ = np.histogramdd(channels, bins=(4, 4, 4), range=((0, 1), (-0.5, 0.5), (-0.5, 0.5)))
    hist = np.sqrt(hist.ravel() / len(x))  # Hellinger embedding: distances between histograms
    return np.concatenate([channels.mean(axis=0), channels.std(axis=0), hist])


class SceneClassifier:
    """k nearest real reference clips in scene_features (standardised per feature) vote for a scene."""

    def __init__(self, reference_clips, reference_captions: Sequence[str], k: int = 5):
        if len(reference_clips) != len(reference_captions) or not len(reference_clips):
            raise ValueError(f"SceneClassifier: need as many reference clips as captions (> 0), got "
                             f"{len(reference_clips)} and {len(reference_captions)}")
        self.scenes = [caption_scene(c) for c in reference_captions]
        feats = np.stack([scene_features(c) for c in reference_clips])  # [R, F]
        self.mean, self.std = feats.mean(axis=0), feats.std(axis=0) + 1e-6
        self.features = (feats - self.mean) / self.std
        self.k = min(k, len(feats))

    def predict(self, clips) -> list[str]:
        """Clips -> the scene each shows (a caption_scene of the references); ties go to the nearest."""
        out = []
        for clip in clips:
            f = (scene_features(clip) - self.mean) / self.std
            nearest = [self.scenes[i] for i in np.argsort(((self.features - f) ** 2).sum(axis=1), kind="stable")[: self.k]]
            votes = Counter(nearest)
            best = max(votes.values())
            out.append(next(s for s in nearest if votes[s] == best))
        return out

    @property
    def labels(self) -> list[str]:
        return sorted(set(self.scenes))


def scene_accuracy(clips, captions: Sequence[str], classifier: SceneClassifier) -> dict:
    """Fraction of clips whose nearest real clips show the scene their caption names."""
    if len(clips) != len(captions):
        raise ValueError(f"scene_accuracy: {len(clips)} clips but {len(captions)} captions")
    targets = [caption_scene(c) for c in captions]
    predicted = classifier.predict(clips)
    return {"scene": float(np.mean([p == t for p, t in zip(predicted, targets, strict=True)])),
            "chance": 1 / len(classifier.labels), "predicted": predicted}


def camera_scores(clips, captions: Sequence[str], classifier: SceneClassifier | None = None) -> dict:
    """Scene and camera motion of clips against their captions: {"motion", "scene", "both" (both
    right in the same clip), "chance_motion", "chance_scene", "num_clips", "per_clip"}; scene
    entries are absent without a classifier."""
    motion = motion_accuracy(clips, captions)
    out = {"motion": motion["motion"], "chance_motion": motion["chance"], "num_clips": len(captions),
           "per_clip": motion["per_clip"]}
    if classifier is not None:
        scene = scene_accuracy(clips, captions, classifier)
        both = [row["predicted"] == row["target"] and s == caption_scene(row["caption"])
                for row, s in zip(motion["per_clip"], scene["predicted"], strict=True)]
        out |= {"scene": scene["scene"], "both": float(np.mean(both)), "chance_scene": scene["chance"]}
        for row, s in zip(out["per_clip"], scene["predicted"], strict=True):
            row["scene"] = s
    return out
