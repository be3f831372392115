"""Text encoder adapters on tiny random models saved with `save_pretrained` and loaded offline:
T5, UMT5, CLIP, a BERT and a Llama, alone and concatenated."""

import logging
import os
import shutil

import pytest
import torch

from dit_video.encoders import TextEncoder
from dit_video.encoders.text import HFTextEncoder
from dit_video.encoders.text_concat import ConcatTextEncoder, build_text_encoder

WORDS = "a the red blue green square disc moves left right up down bounces colour of video shape fast slow".split()
SPECIAL = [
    "[PAD]",
    "[UNK]",
    "[BOS]",
    "[EOS]",
]  # ids 0..3; CLIP's eos id must not be 2 (its legacy argmax path)
VOCAB = SPECIAL + WORDS
WIDTH = 16  # hidden size of every tiny model but CLIP
CLIP_WIDTH, CLIP_PROJ = 24, 12  # a wider CLIP, so concatenation has to pad T5's features
# How each family's tokenizer frames a caption (what the real tokenizers do).
TEMPLATES = {
    "bert": "[BOS] $A [EOS]",  # [CLS] ... [SEP]
    "t5": "$A [EOS]",  # ... </s>
    "umt5": "$A [EOS]",
    "clip": "[BOS] $A [EOS]",  # <|startoftext|> ... <|endoftext|>
    "llm": "[BOS] $A",  # <s> ...
}


def save_tokenizer(directory, kind: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=TEMPLATES[kind], special_tokens=[("[BOS]", 2), ("[EOS]", 3)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    ).save_pretrained(directory)


def tiny_model(kind: str, projection: bool = True):
    import transformers as tf

    ids = {"vocab_size": len(VOCAB), "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}
    torch.manual_seed(0)
    if kind in ("t5", "umt5"):
        config_cls, model_cls = (
            (tf.T5Config, tf.T5EncoderModel) if kind == "t5" else (tf.UMT5Config, tf.UMT5EncoderModel)
        )
        config = config_cls(
            d_model=WIDTH, d_kv=8, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0, **ids
        )
        return model_cls(config)
    if kind == "clip":
        config = tf.CLIPTextConfig(
            hidden_size=CLIP_WIDTH,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=CLIP_PROJ,
            **ids,
        )
        return (tf.CLIPTextModelWithProjection if projection else tf.CLIPTextModel)(config)
    if kind == "bert":
        return tf.BertModel(
            tf.BertConfig(
                hidden_size=WIDTH,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=32,
                max_position_embeddings=64,
                **ids,
            )
        )
    config = tf.LlamaConfig(
        hidden_size=WIDTH,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        **ids,
    )
    return tf.LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """kind -> a saved tiny model + tokenizer; 'clip_plain' is a CLIPTextModel (no projection)."""
    out = {}
    for kind in TEMPLATES:
        out[kind] = tmp_path_factory.mktemp(kind)
        tiny_model(kind).save_pretrained(out[kind])
        save_tokenizer(out[kind], kind)
    out["clip_plain"] = tmp_path_factory.mktemp("clip_plain")
    tiny_model("clip", projection=False).save_pretrained(out["clip_plain"])
    save_tokenizer(out["clip_plain"], "clip")
    return out


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


CAPTIONS = ["a red square moves left", "a blue disc", ""]


def tokenizer_mask(path, captions):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return torch.tensor(tok(captions, padding="longest")["attention_mask"], dtype=torch.bool)


@pytest.mark.parametrize("kind", list(TEMPLATES))
def test_kind_detected_shapes_and_masks(dirs, kind):
    enc = HFTextEncoder(dirs[kind], max_length=16)
    assert enc.kind == kind and isinstance(enc, TextEncoder)
    text_emb, text_mask, pooled = enc.encode_pooled(CAPTIONS)
    assert text_emb.dtype == torch.float32 and text_mask.dtype == torch.bool
    assert text_emb.shape == (3, text_mask.shape[1], enc.dim)
    assert torch.equal(text_mask, tokenizer_mask(dirs[kind], CAPTIONS))  # the tokenizer's own padding mask
    assert text_mask.sum(1).min() >= 1  # "" keeps its special tokens: no empty row
    if kind == "clip":
        assert enc.pooled_dim == CLIP_WIDTH and pooled.shape == (3, CLIP_WIDTH)  # default clip_pooled=pooler
    else:
        assert enc.pooled_dim == 0 and pooled is None
    emb2, mask2 = enc.encode(CAPTIONS)
    assert torch.equal(emb2, text_emb) and torch.equal(mask2, text_mask)


@pytest.mark.parametrize("kind", list(TEMPLATES))
def test_padding_does_not_change_real_tokens(dirs, kind):
    enc = HFTextEncoder(dirs[kind], max_length=16)
    alone, mask_alone, pooled_alone = enc.encode_pooled(["a blue disc"])
    padded, mask_padded, pooled_padded = enc.encode_pooled(
        ["a blue disc", "the green square bounces up fast"]
    )
    n = int(mask_alone.sum())
    assert mask_padded.shape[1] > n and int(mask_padded[0].sum()) == n and not mask_padded[0, n:].any()
    torch.testing.assert_close(padded[0, :n], alone[0, :n], atol=1e-5, rtol=1e-4)
    if pooled_alone is not None:
        torch.testing.assert_close(pooled_padded[0], pooled_alone[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("saved", "clip_pooled", "field"),
    [("clip", "projected", "text_embeds"), ("clip_plain", "pooler", "pooler_output")],
)
def test_clip_pooled_equals_transformers(dirs, saved, clip_pooled, field):
    import transformers as tf

    enc = HFTextEncoder(dirs[saved], max_length=16, clip_pooled=clip_pooled)
    ref_cls = tf.CLIPTextModelWithProjection if clip_pooled == "projected" else tf.CLIPTextModel
    ref = ref_cls.from_pretrained(str(dirs[saved]), local_files_only=True).eval()
    batch = enc.tokenizer(CAPTIONS, padding="longest", return_tensors="pt")
    with torch.no_grad():
        want = ref(**batch)
    text_emb, _, pooled = enc.encode_pooled(CAPTIONS)
    assert enc.pooled_dim == (CLIP_PROJ if clip_pooled == "projected" else CLIP_WIDTH)
    torch.testing.assert_close(pooled, getattr(want, field))
    torch.testing.assert_close(text_emb, want.last_hidden_state)


def test_projected_pooling_without_projection_weights_fails(dirs):
    with pytest.raises(ValueError, match="clip_pooled=pooler"):
        HFTextEncoder(dirs["clip_plain"], clip_pooled="projected")


def test_t5_is_the_encoder_only_model(dirs):
    import transformers as tf

    enc = HFTextEncoder(dirs["t5"], max_length=16)
    assert isinstance(enc.model, tf.T5EncoderModel)
    ref = tf.T5EncoderModel.from_pretrained(str(dirs["t5"]), local_files_only=True).eval()
    batch = enc.tokenizer(CAPTIONS, padding="longest", return_tensors="pt")
    with torch.no_grad():
        want = ref(**batch).last_hidden_state
    torch.testing.assert_close(enc.encode(CAPTIONS)[0], want)


def test_truncation_warns_once_with_the_count(dirs, caplog):
    enc = HFTextEncoder(dirs["t5"], max_length=4)
    long = "a red square moves left fast"  # 6 words + </s>
    with caplog.at_level(logging.WARNING, logger="dit_video.encoders.text"):
        _, mask = enc.encode([long, "a disc", long + " up"])
        enc.encode([long])
    messages = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert len(messages) == 1 and "2 of 3 captions" in messages[0], messages
    assert mask.shape[1] == 4 and mask[0].all() and mask[1].sum() == 3


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_weights_float32_outputs(dirs, dtype):
    enc = HFTextEncoder(dirs["clip"], max_length=16, dtype=dtype, clip_pooled="projected")
    assert {p.dtype for p in enc.parameters()} == {getattr(torch, dtype)}
    text_emb, _, pooled = enc.encode_pooled(CAPTIONS)
    assert text_emb.dtype == pooled.dtype == torch.float32
    full, _, full_pooled = HFTextEncoder(dirs["clip"], max_length=16, clip_pooled="projected").encode_pooled(
        CAPTIONS
    )
    torch.testing.assert_close(text_emb, full, atol=0.1, rtol=0.05)  # the same model, rounded weights
    assert enc.identity()["dtype"] == dtype


def test_frozen_eval_and_no_grad(dirs):
    enc = HFTextEncoder(dirs["bert"], max_length=16)
    assert not any(p.requires_grad for p in enc.parameters())
    wrapper = torch.nn.Sequential(enc).train()  # a parent's .train() must not reach the frozen encoder
    assert not enc.training and not enc.model.training
    enc.model.requires_grad_(True)  # so only encode's own no_grad can keep autograd out
    with torch.enable_grad():
        text_emb, _ = enc.encode(CAPTIONS)
    assert not text_emb.requires_grad and text_emb.grad_fn is None
    del wrapper


def test_llm_hidden_state_layer_and_cropped_template(dirs):
    from transformers import AutoModel

    ref = AutoModel.from_pretrained(str(dirs["llm"]), local_files_only=True).eval()
    last = HFTextEncoder(dirs["llm"], max_length=16)
    penult = HFTextEncoder(dirs["llm"], max_length=16, hidden_state_layer=-2)
    batch = last.tokenizer(CAPTIONS, padding="longest", return_tensors="pt")
    with torch.no_grad():
        want = ref(**batch, output_hidden_states=True)
    torch.testing.assert_close(last.encode(CAPTIONS)[0], want.last_hidden_state)
    torch.testing.assert_close(penult.encode(CAPTIONS)[0], want.hidden_states[-2])
    assert not torch.allclose(want.hidden_states[-2], want.last_hidden_state)

    # "[BOS] the colour of" is cropped: 4 tokens, the caption starts right after them.
    templated = HFTextEncoder(
        dirs["llm"], max_length=6, prompt_template="the colour of {caption} video", crop_start=4
    )
    text_emb, text_mask = templated.encode(["red square", "a blue disc moves left fast"])
    assert text_mask.sum(1).tolist() == [3, 6]  # caption + "video"; the long one truncated at max_length
    full = last.tokenizer(["the colour of red square video"], return_tensors="pt")
    with torch.no_grad():
        want = ref(**full).last_hidden_state  # [1, 7, D]
    torch.testing.assert_close(text_emb[0, :3], want[0, 4:7])
    assert templated.identity()["crop_start"] == 4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"crop_start": 2}, "empty caption"),
        ({"hidden_state_layer": 3}, "hidden_state_layer=3"),
        ({"max_length": 513}, "max_length=513"),
        ({"prompt_template": "no slot"}, "prompt_template"),
        ({"kind": "gpt"}, "kind='gpt'"),
        ({"dtype": "fp8"}, "dtype='fp8'"),
    ],
)
def test_bad_settings_fail_at_construction(dirs, kwargs, match):
    with pytest.raises(ValueError, match=match):
        HFTextEncoder(dirs["llm"], **kwargs)


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
            continue  # the real MiniLM: tests/test_encoders.py
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

    from dit_video.run import build_text_encoder as run_build

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

    from dit_video.run import ConfigError, preflight

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
