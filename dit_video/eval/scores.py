"""The metrics of generated clips, each computed only where it applies: the rest are listed under
"skipped" with the reason, so a report never shows a number that measures nothing.

  motion     (any data) the camera motion of each generated clip (dit_video/metrics/motion.py)
             against the real clip of the same caption (motion fidelity: same motion label, and
             the mean (pan, tilt, zoom) distance), and against the caption where it names a motion
  probe      caption faithfulness of the synthetic demo, only when every prompt is a demo caption
  camera     scene and camera motion of the camera demo (eval/camera.py), when every prompt names
             a camera motion
  fvd        Frechet Video Distance against the run's held-out clips, with local I3D weights
  clipscore  per-frame CLIPScore, with a local CLIP model
"""

from __future__ import annotations

import numpy as np

from dit_video.data.browse import browse_shards
from dit_video.eval.camera import CameraScorer
from dit_video.metrics.clipscore import CLIPScorer
from dit_video.metrics.frechet import frechet_distance_features
from dit_video.metrics.fvd import i3d_features, load_i3d
from dit_video.metrics.motion import (
    caption_motion,
    motion_accuracy,
    motion_applies,
    motion_fidelity,
    motion_labels,
)
from dit_video.metrics.probe import caption_faithfulness, probe_applies

NOT_DEMO = "prompts are not demo captions (colour, shape, direction)"
NO_REAL = "prompts given by hand: no real clip of the same caption"
NO_NAMED_MOTION = "no prompt names a camera motion (pan, tilt, zoom or still)"


def _real_clips(shards, num: int, num_frames: int) -> np.ndarray:
    samples = browse_shards(shards, limit=num, num_frames=num_frames)
    clips = [s["clip"] for s in samples if s["clip"] is not None and len(s["clip"]) == num_frames]
    if len(clips) < 2:
        raise ValueError(f"real_shards: need >= 2 clips of {num_frames} frames for FVD, found {len(clips)} in {shards}")
    return np.stack(clips)


def motion_score(clips: np.ndarray, prompts: list[str], real: np.ndarray | None) -> tuple[dict, dict[str, str]]:
    """({"vs_real", "error_vs_real", "vs_caption", "num_named", "per_clip"}, skipped): generated
    clips [N, T, H, W, 3] against the real clips of the same captions (None: prompts given by
    hand) and against the captions that name a camera motion."""
    result, skipped = {}, {}
    labels, motions = motion_labels(clips)
    per_clip = [{"prompt": p, "generated": label, "caption": caption_motion(p), "motion": m.round(4).tolist()}
                for p, label, m in zip(prompts, labels, motions, strict=True)]
    if real is not None:
        fidelity = motion_fidelity(real, clips)  # the real clip of the same caption is the reference
        result |= {"vs_real": fidelity["motion_fidelity"], "error_vs_real": fidelity["motion_error"]}
        for row, label in zip(per_clip, motion_labels(real)[0], strict=True):
            row["real"] = label
    else:
        skipped["motion_vs_real"] = NO_REAL
    named = [i for i, p in enumerate(prompts) if caption_motion(p) is not None]
    if named:
        result |= {"vs_caption": motion_accuracy(clips[named], [prompts[i] for i in named])["motion"],
                   "num_named": len(named)}
    else:
        skipped["motion_vs_caption"] = NO_NAMED_MOTION
    return result | {"per_clip": per_clip}, skipped


def real_motion(real: np.ndarray | None, prompts: list[str]) -> dict | None:
    """How often the real clips move as their captions say (the ceiling of motion vs caption), or
    None without real clips or captions naming a motion."""
    named = [i for i, p in enumerate(prompts) if caption_motion(p) is not None]
    if real is None or not named:
        return None
    return {"vs_caption": motion_accuracy(real[named], [prompts[i] for i in named])["motion"], "num_named": len(named)}


class Scorers:
    """Every metric of one evaluation, with what each needs loaded once (CLIP, I3D and the FVD
    reference features, the camera scene references). `score` runs on each set of generated
    clips (one per checkpoint and weights) with the same prompts."""

    def __init__(self, prompts: list[str], *, probe: bool | None = None, camera_shards=None, camera: bool | None = None,
                 clip_path: str | None = None, i3d_path: str | None = None, i3d_size: int = 224,
                 fvd_shards=None, num_real: int = 64):
        self.probe = probe_applies(prompts) if probe is None else probe
        run_camera = motion_applies(prompts) if camera is None else camera
        self.camera = CameraScorer(camera_shards) if run_camera else None
        self.clip = CLIPScorer(clip_path) if clip_path else None
        self.i3d = load_i3d(i3d_path) if i3d_path else None
        self.i3d_size, self.fvd_shards, self.num_real = i3d_size, fvd_shards, num_real
        self.fvd_reference: dict | None = None
        self._real_features: np.ndarray | None = None

    def score(self, clips: np.ndarray, prompts: list[str], real: np.ndarray | None) -> tuple[dict, dict[str, str]]:
        """(result, skipped) for generated clips uint8 [N, T, H, W, 3] of `prompts`; `real` are
        the real clips of the same samples, or None."""
        result, skipped = {}, {}
        result["motion"], skipped_motion = motion_score(clips, prompts, real)
        skipped |= skipped_motion
        if self.probe:
            probe = caption_faithfulness(clips, prompts)
            result["probe"] = {k: v for k, v in probe.items() if k != "per_clip"}
            result["probe_per_clip"] = probe["per_clip"]
        else:
            skipped["probe"] = NOT_DEMO
        if self.camera is not None:
            scores = self.camera.score(clips, prompts)
            result["camera"] = {k: scores[k] for k in ("scene", "motion", "both", "num_clips") if k in scores}
            result["camera_per_clip"] = scores["per_clip"]
        if self.clip is not None:
            scores = self.clip.score(clips, prompts)
            result["clipscore"] = scores["clipscore"]
            result["clipscore_per_clip"] = scores["per_clip"]
        else:
            skipped["clipscore"] = "no clip_path (a local Hugging Face CLIP folder)"
        if self.i3d is None:
            skipped["fvd"] = "no i3d_path (local I3D weights; see dit_video/metrics/fvd.py)"
        elif not self.fvd_shards:
            skipped["fvd"] = "no real clips to compare with (real_shards, or the run's validation shards)"
        else:
            if self._real_features is None:
                reference = _real_clips(self.fvd_shards, self.num_real, clips.shape[1])
                self._real_features = i3d_features(reference, self.i3d, size=self.i3d_size)
                self.fvd_reference = {"shards": str(self.fvd_shards), "num_clips": len(reference), "size": self.i3d_size}
            fake = i3d_features(clips, self.i3d, size=self.i3d_size)
            result["fvd"] = frechet_distance_features(self._real_features, fake)
        return result, skipped
