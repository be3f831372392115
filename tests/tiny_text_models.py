"""Tiny random text models of each family (T5, UMT5, CLIP, BERT, Llama) with word-level tokenizers,
saved with `save_pretrained` for offline loading, and the pytest fixtures the text encoder tests share.

A test module uses the fixtures by binding them at its top level:
    dirs, offline = tiny_text_models.dirs, tiny_text_models.offline
"""

import pytest
import torch

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

