"""Text encoders built from config nodes, on the tiny random models of tiny_text_models.py:
concatenation (T5 + CLIP), the builder's field checks, identities, every conf/text_encoder/*.yaml,
Hydra composition and preflight."""

import os
import shutil

import pytest
import tiny_text_models
import torch
from tiny_text_models import CAPTIONS, CLIP_PROJ, CLIP_WIDTH, WIDTH, tiny_model

from dit_video.encoders import TextEncoder
from dit_video.encoders.text import HFTextEncoder
from dit_video.encoders.text_concat import ConcatTextEncoder, build_text_encoder

dirs, offline = tiny_text_models.dirs, tiny_text_models.offline  # the shared pytest fixtures


def test_concat_t5_clip_sequence_and_pooled(dirs):
    node = {
        "name": "t5+clip",
        "encoders": [
            {"path": str(dirs["t5"]), "max_length": 8, "name": "t5"},
            {"path": str(dirs["clip"]), "max_length": 10, "name": "clip", "clip_pooled": "projected"},
        ],
    }
    enc = build_text_encoder(node)
    assert isinstance(enc, ConcatTextEncoder) and isinstance(enc, TextEncoder)
    assert enc.dim == CLIP_WIDTH and enc.pooled_dim == CLIP_PROJ and enc.max_length == 18
    t5, clip = enc.encoders
    text_emb, text_mask, pooled = enc.encode_pooled(CAPTIONS)
    t5_emb, t5_mask, _ = t5.encode_pooled(CAPTIONS)
    clip_emb, clip_mask, clip_pooled = clip.encode_pooled(CAPTIONS)
    n = t5_emb.shape[1]
    assert text_emb.shape == (3, n + clip_emb.shape[1], CLIP_WIDTH)
    assert torch.equal(text_mask, torch.cat([t5_mask, clip_mask], dim=1))
    assert (
        torch.equal(text_emb[:, :n, :WIDTH], t5_emb) and not text_emb[:, :n, WIDTH:].any()
    )  # zero-padded features
    assert torch.equal(text_emb[:, n:], clip_emb) and torch.equal(pooled, clip_pooled)

    # Flux/HunyuanVideo style: CLIP gives only the pooled vector.
    node["encoders"][1]["sequence"] = False
    pooled_only = build_text_encoder(node)
    text_emb, text_mask, pooled = pooled_only.encode_pooled(CAPTIONS)
    assert pooled_only.dim == WIDTH and torch.equal(text_emb, t5_emb) and torch.equal(text_mask, t5_mask)
    assert torch.equal(pooled, clip_pooled)
    assert pooled_only.identity()["sha256"] != enc.identity()["sha256"]  # the sequence flag is part of it


def test_concat_without_pooled_encoders_has_none(dirs):
    enc = build_text_encoder({"encoders": [{"path": str(dirs["bert"])}, {"path": str(dirs["umt5"])}]})
    assert enc.pooled_dim == 0 and enc.encode_pooled(CAPTIONS)[2] is None
    assert enc.name == f"{dirs['bert'].name}+{dirs['umt5'].name}"


@pytest.mark.parametrize(
    ("node", "match"),
    [
        ({"path": "x", "max_len": 3}, r"text_encoder: unknown field\(s\) \['max_len'\]"),
        ({"encoders": [{"name": "t5"}]}, r"text_encoder.encoders.0.path is missing"),
        ({"encoders": [{"path": "x", "pooled": 1}]}, r"text_encoder.encoders.0: unknown field"),
    ],
)
def test_builder_names_the_bad_field(node, match):
    with pytest.raises(ValueError, match=match):
        build_text_encoder(node)


def test_identity_changes_with_the_weights(dirs, tmp_path):
    copy = tmp_path / "t5_copy"
    shutil.copytree(dirs["t5"], copy)
    before = HFTextEncoder(copy).identity()
    assert before == {**HFTextEncoder(dirs["t5"]).identity(), "path": str(copy), "name": "t5_copy"}
    model = tiny_model("t5")
    with torch.no_grad():
        model.shared.weight[5] += 1.0
    model.save_pretrained(copy)
    after = HFTextEncoder(copy).identity()
    assert after["sha256"] != before["sha256"] and len(after["sha256"]) == 64
    concat = [
        build_text_encoder({"encoders": [{"path": str(p)}, {"path": str(dirs["clip"])}]})
        for p in (dirs["t5"], copy)
    ]
    assert concat[0].identity()["sha256"] != concat[1].identity()["sha256"]


def test_every_text_encoder_config_builds(dirs):
    """Each conf/text_encoder/*.yaml has only known fields and builds once its paths point at models
    (the tiny ones here, of the family its `kind` names)."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from dit_video.encoders.text_concat import text_encoder_paths

    conf = Path(__file__).resolve().parents[1] / "conf" / "text_encoder"
    built = 0
    for yaml in sorted(conf.glob("*.yaml")):
        node = OmegaConf.to_container(OmegaConf.load(yaml))
        if yaml.stem == "minilm":
            continue  # the real MiniLM: tests/test_text_minilm.py
        parts = node["encoders"] if "encoders" in node else [node]
        for part in parts:
            part["path"] = str(dirs[part["kind"]])
            part["crop_start"] = 0  # counts real-tokenizer tokens; the tiny tokenizer splits the template otherwise
        assert [f for f, _ in text_encoder_paths(node)][0].startswith("text_encoder.")
        enc = build_text_encoder(node)
        text_emb, text_mask = enc.encode(CAPTIONS)
        assert text_emb.shape[-1] == enc.dim and text_mask.any(1).all()
        built += 1
    assert built >= 5  # t5_xxl, umt5_xxl, clip_l, t5_clip, llm


def test_build_from_hydra_config(dirs):
    """run.build_text_encoder composes conf/text_encoder/t5_clip.yaml with command-line overrides."""
    from hydra import compose, initialize_config_dir

    from dit_video.build import build_text_encoder as run_build

    conf = os.path.join(os.path.dirname(__file__), "..", "conf")
    with initialize_config_dir(config_dir=os.path.abspath(conf), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "text_encoder=t5_clip",
                f"text_encoder.encoders.0.path={dirs['t5']}",
                f"text_encoder.encoders.1.path={dirs['clip_plain']}",
                "text_encoder.encoders.0.max_length=8",
            ],
        )
    enc = run_build(cfg)
    assert isinstance(enc, ConcatTextEncoder) and enc.dim == WIDTH and enc.pooled_dim == CLIP_WIDTH


def test_preflight_names_every_missing_encoder_path():
    from hydra import compose, initialize_config_dir

    from dit_video.errors import ConfigError
    from dit_video.run import preflight

    conf = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "conf"))
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose("train", overrides=["text_encoder=t5_clip", "text_encoder.encoders.1.path=/no/clip"])
    with pytest.raises(ConfigError) as err:
        preflight(cfg)
    assert "text_encoder.encoders.0.path: no Hugging Face model at 'weights/t5-v1_1-xxl'" in str(err.value)
    assert "text_encoder.encoders.1.path: no Hugging Face model at '/no/clip'" in str(err.value)


def test_identities_key_a_latent_cache(dirs):
    """data/latents.py keys caches on (name, sha256, max_length, dim, dtype) of the identity."""
    import json

    from dit_video.data.latents import text_key

    concat = build_text_encoder(
        {"encoders": [{"path": str(dirs["t5"])}, {"path": str(dirs["clip"]), "sequence": False}]}
    )
    for enc in (HFTextEncoder(dirs["t5"]), concat):
        ident = json.loads(json.dumps(enc.identity()))  # JSON-able, as checkpoints and cache metadata need
        key = text_key(ident)
        assert key["dim"] == enc.dim and key["max_length"] == enc.max_length and len(key["sha256"]) == 64
    assert text_key(concat.identity())["dtype"] == "float32+float32"
