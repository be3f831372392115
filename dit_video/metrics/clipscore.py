"""CLIPScore per frame (Hessel et al. 2021) with a local CLIP model.

    CLIPScore(frame, caption) = 100 * max(cos(E_image(frame), E_text(caption)), 0)

(the paper scales by w = 2.5 instead of 100; we follow the 0-100 convention common in
text-to-video papers and torchmetrics). A clip's score is the mean over its frames; the
per-frame curve shows whether a video drifts away from its prompt.

The model is any Hugging Face `CLIPModel` folder (config.json, weights, tokenizer files), e.g. a
local copy of openai/clip-vit-base-patch32, loaded offline (local_files_only). Frames are
preprocessed as CLIP was trained: bicubic resize of the short side to the model's image size,
centre crop, the CLIP mean/std normalisation (from preprocessor_config.json if the folder has
one).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# The normalisation CLIP was trained with (Radford et al. 2021; OpenAI's released preprocessing).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class CLIPScorer:
    """A local CLIP model and tokenizer; `score(clips, captions)` scores every frame."""

    def __init__(self, path: str | Path, device: str = "cpu"):
        from transformers import AutoTokenizer, CLIPModel

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"clip_path: no Hugging Face CLIP model at '{path}' (needs config.json, weights and tokenizer "
                "files; save one with CLIPModel.save_pretrained + tokenizer.save_pretrained)"
            )
        self.model = CLIPModel.from_pretrained(str(path), local_files_only=True).eval().requires_grad_(False).to(device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.device = device
        self.image_size = int(self.model.config.vision_config.image_size)
        self.mean, self.std = CLIP_MEAN, CLIP_STD
        pre = path / "preprocessor_config.json"
        if pre.is_file():
            values = json.loads(pre.read_text())
            self.mean, self.std = tuple(values.get("image_mean", CLIP_MEAN)), tuple(values.get("image_std", CLIP_STD))

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 [N, H, W, 3] -> normalised float [N, 3, S, S] (S = the model's image size)."""
        x = frames.permute(0, 3, 1, 2).float() / 255.0  # [N, 3, H, W]
        h, w = x.shape[-2:]
        scale = self.image_size / min(h, w)
        size = (max(self.image_size, round(h * scale)), max(self.image_size, round(w * scale)))
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        top, left = (size[0] - self.image_size) // 2, (size[1] - self.image_size) // 2
        x = x[..., top:top + self.image_size, left:left + self.image_size]  # [N, 3, S, S]
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std

    @staticmethod
    def _pooled(out) -> torch.Tensor:
        # transformers 5 returns a model output whose pooler_output is the projected embedding.
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    @torch.no_grad()
    def text_embeddings(self, captions: list[str]) -> torch.Tensor:
        """captions -> unit-norm text embeddings [N, E]."""
        max_len = int(self.model.config.text_config.max_position_embeddings)
        tokens = self.tokenizer(list(captions), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        emb = self._pooled(self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                        attention_mask=tokens["attention_mask"].to(self.device)))
        return F.normalize(emb.float(), dim=-1)

    @torch.no_grad()
    def image_embeddings(self, frames: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """uint8 frames [N, H, W, 3] -> unit-norm image embeddings [N, E]."""
        out = []
        for i in range(0, len(frames), batch_size):
            pixels = self.preprocess(frames[i:i + batch_size]).to(self.device)
            out.append(F.normalize(self._pooled(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1))
        return torch.cat(out)

    def score(self, clips, captions: list[str]) -> dict:
        """uint8 clips [N, T, H, W, 3] + N captions -> {"clipscore": mean over clips,
        "per_clip": [N] mean over frames, "per_frame": [N, T] scores in [0, 100]}."""
        clips = torch.as_tensor(np.asarray(clips))
        if clips.ndim != 5 or len(clips) != len(captions):
            raise ValueError(f"clipscore: need clips [N, T, H, W, 3] and N captions, got {tuple(clips.shape)} "
                             f"and {len(captions)} captions")
        n, t = clips.shape[:2]
        text = self.text_embeddings(list(captions))  # [N, E]
        image = self.image_embeddings(clips.reshape(n * t, *clips.shape[2:])).reshape(n, t, -1)  # [N, T, E]
        per_frame = 100.0 * (image * text[:, None]).sum(-1).clamp(min=0)  # [N, T]
        per_clip = per_frame.mean(dim=1)  # [N]
        return {"clipscore": float(per_clip.mean()), "per_clip": per_clip.tolist(), "per_frame": per_frame.tolist()}


def clipscore(clips, captions: list[str], path: str | Path) -> dict:
    """One-call CLIPScore with the CLIP model at `path` (see CLIPScorer.score)."""
    return CLIPScorer(path).score(clips, captions)
