"""Camera-motion scores of a run: scene and motion of real, VAE-reconstructed and generated clips.

Applies when the prompts name a camera motion (dit_video.metrics.motion.motion_applies), as the
captions of the camera demo set do. The scene is read by nearest real clips: references are the
run's own training clips (data.shards, or for a latent cache the clip shards it was encoded
from, recorded in its cache.json); the real and VAE rows use the held-out clips (data.val_shards,
or the val cache's source shards). Used by the in-training samples (eval/samples.py), `evaluate`
and the camera demo.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from dit_video.data.browse import browse_shards
from dit_video.data.camera import camera_caption, camera_combinations
from dit_video.data.latents import CACHE_FILE
from dit_video.encoders.base import clip_to_video, video_to_clip
from dit_video.metrics.motion import SceneClassifier, camera_scores, motion_fidelity
from dit_video.pipeline import Pipeline

NUM_REFERENCES = 420  # training clips read as scene references (20 per caption of the camera set)


def run_clip_shards(data: dict) -> tuple[list[str] | str | None, list[str] | str | None]:
    """(training clip shards, held-out clip shards) of a run's `data` config: the shards
    themselves, or those a latent cache (data.cache / data.val_cache) was encoded from."""

    def source(cache: str | None):
        meta = Path(str(cache)) / CACHE_FILE if cache else None
        return json.loads(meta.read_text())["source_shards"] if meta is not None and meta.is_file() else None

    if data.get("kind") == "latents":
        return source(data.get("cache")), source(data.get("val_cache"))
    return data.get("shards"), data.get("val_shards")


def read_clips(shards, limit: int) -> tuple[np.ndarray, list[str]]:
    """The first `limit` clips of `shards` that have a caption: (uint8 [N, T, H, W, 3], captions)."""
    samples = [s for s in browse_shards(shards, limit=limit) if s["clip"] is not None and s["caption"]]
    if not samples:
        raise ValueError(f"no captioned clips in {shards!r}")
    return np.stack([s["clip"] for s in samples]), [s["caption"] for s in samples]


class CameraScorer:
    """Scene (k nearest reference clips) and camera motion of clips against their captions; the
    references are read once, on first use."""

    def __init__(self, reference_shards, num_references: int = NUM_REFERENCES):
        self.reference_shards, self.num_references = reference_shards, num_references
        self._classifier: SceneClassifier | None = None

    @property
    def classifier(self) -> SceneClassifier | None:
        if self._classifier is None and self.reference_shards:
            self._classifier = SceneClassifier(*read_clips(self.reference_shards, self.num_references))
        return self._classifier

    def score(self, clips, captions: list[str]) -> dict:
        """{"motion", "scene", "both", chances, "num_clips", "per_clip"} (camera_scores); no scene
        entries when the run has no reference clips."""
        return camera_scores(clips, captions, self.classifier)


@torch.no_grad()
def reconstruct(vae, clips: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """uint8 clips [N, T, H, W, 3] -> the frozen VAE's encode -> decode, uint8 [N, T, H, W, 3]."""
    out = []
    for i in range(0, len(clips), batch_size):
        video = clip_to_video(torch.from_numpy(clips[i:i + batch_size]))  # [B, 3, T, H, W]
        out.append(video_to_clip(vae.decode(vae.encode(video)).float()).numpy())
    return np.concatenate(out)


def camera_table(scorer: CameraScorer, real: np.ndarray, real_captions: list[str], recon: np.ndarray | None,
                 generated: np.ndarray | None, prompts: list[str] | None) -> dict:
    """The rows real / VAE-reconstructed / generated: {row: {"scene", "motion", "both", "num_clips"}},
    plus "vae_motion_fidelity" (reconstructions moving as their inputs do) when `recon` is given."""
    rows: dict = {}
    for name, clips, captions in (("real", real, real_captions), ("vae", recon, real_captions),
                                  ("generated", generated, prompts)):
        if clips is not None:
            scores = scorer.score(clips, captions)
            rows[name] = {k: scores[k] for k in ("scene", "motion", "both", "num_clips") if k in scores}
    if recon is not None:
        rows["vae_motion_fidelity"] = motion_fidelity(real, recon)
    return rows


def format_table(rows: dict) -> str:
    """camera_table's rows as Markdown, with the generated/real ratio of "both"."""
    labels = {"real": "real held-out clips", "vae": "the same clips through the VAE", "generated": "generated from captions"}
    lines = ["| clips scored for (scene, camera motion) | scene | motion | both | clips |", "|---|---|---|---|---|"]
    for name, label in labels.items():
        if name in rows:
            r = rows[name]
            lines.append(f"| {label} | {r.get('scene', float('nan')):.2f} | {r['motion']:.2f} | "
                         f"{r.get('both', float('nan')):.2f} | {r['num_clips']} |")
    notes = ["chance: scene 1/3 on the camera set, motion 1/7"]
    if "vae" in rows and rows["real"]["motion"] > 0:
        notes.append(f"VAE/real motion {rows['vae']['motion'] / rows['real']['motion']:.2f}x")
    if "generated" in rows and rows["real"].get("both"):
        notes.append(f"generated/real scene+motion {rows['generated']['both'] / rows['real']['both']:.2f}x")
    if "vae_motion_fidelity" in rows:
        notes.append(f"VAE motion fidelity {rows['vae_motion_fidelity']['motion_fidelity']:.2f}")
    return "\n".join(lines + ["", "; ".join(notes)])


def camera_prompts(seeds_per_prompt: int) -> tuple[list[str], list[int]]:
    """Every (scene, motion) caption of the camera set, `seeds_per_prompt` times: (prompts, seeds);
    seed 1000 * s + i for the s-th repeat of caption i, so more repeats keep the first ones' clips."""
    if seeds_per_prompt < 1:
        raise ValueError(f"seeds_per_prompt={seeds_per_prompt}: must be >= 1")
    captions = [camera_caption(s, m) for s, m in camera_combinations()]
    prompts = [c for _ in range(seeds_per_prompt) for c in captions]
    seeds = [1000 * s + i for s in range(seeds_per_prompt) for i in range(len(captions))]
    return prompts, seeds


def run_sample_settings(pipe: Pipeline, steps: int | None = None, cfg: float | None = None,
                        shift: float | None = None) -> dict:
    """Sampler settings for the camera table: the run's own eval.samples (conf/eval/camera.yaml,
    recorded in its checkpoint), each replaced by an argument that is not None."""
    recorded = pipe.meta["config"]["eval"]["samples"]
    chosen = {"steps": steps, "cfg": cfg, "shift": shift}
    return {"sampler": recorded["sampler"]} | {k: recorded[k] if v is None else v for k, v in chosen.items()}


def measure_camera(ckpt: str | Path, train_shards, held_out_shards, seeds_per_prompt: int,
                   steps: int | None = None, cfg: float | None = None, shift: float | None = None) -> dict:
    """Sample every camera caption from checkpoint `ckpt` and score real held-out clips, their VAE
    reconstructions and the samples with one scorer (scene references: `train_shards`).

    Returns {"rows": camera_table rows, "seconds": {"sample", "score"}, "settings", "prompts",
    "seeds", "generated": uint8 [N, T, H, W, 3], "fps"}."""
    t0 = time.perf_counter()
    pipe = Pipeline.from_checkpoint(ckpt)
    settings = run_sample_settings(pipe, steps, cfg, shift) | {"checkpoint": str(ckpt)}
    prompts, seeds = camera_prompts(seeds_per_prompt)
    generated = pipe.generate(prompts, seeds, steps=settings["steps"], cfg=settings["cfg"], shift=settings["shift"],
                              sampler=settings["sampler"])
    t_sample = time.perf_counter() - t0

    t0 = time.perf_counter()
    real, real_captions = read_clips(held_out_shards, limit=10_000)
    rows = camera_table(CameraScorer(train_shards), real, real_captions, reconstruct(pipe.vae, real), generated, prompts)
    return {"rows": rows, "seconds": {"sample": t_sample, "score": time.perf_counter() - t0}, "settings": settings,
            "prompts": prompts, "seeds": seeds, "generated": generated, "fps": pipe.fps}
