"""Text encoder adapters on tiny random models saved with `save_pretrained` and loaded offline:
T5, UMT5, CLIP, a BERT and a Llama, one at a time."""

import logging

import pytest
import tiny_text_models
import torch
from tiny_text_models import CAPTIONS, CLIP_PROJ, CLIP_WIDTH, TEMPLATES

from dit_video.encoders import TextEncoder
from dit_video.encoders.text import HFTextEncoder

dirs, offline = tiny_text_models.dirs, tiny_text_models.offline  # the shared pytest fixtures


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

