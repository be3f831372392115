"""End to end on CPU: a tiny Wan-shaped diffusers model is converted, fully fine-tuned on the demo shards
through dit_video.run with init_from (the loss falls), sampled with our sampler, exported to diffusers,
reloaded there, and diffusers' model gives the same predictions and samples. Plus init_from's refusals
and preflight's fine-tuning rows."""

from __future__ import annotations

import re

import pytest
import torch
from tiny_run import TINY_DATA, compose_train, tiny_run
from tiny_wan import assert_close, load_wan, padded_text, save_wan, wan_forward

from dit_video.build import build_data, build_dit_config, init_dit_from
from dit_video.checkpoint.load import load_checkpoint
from dit_video.convert import load_dit_weights
from dit_video.convert.__main__ import main as convert_main
from dit_video.diffusion import sample
from dit_video.encoders.base import clip_to_video
from dit_video.errors import ConfigError
from dit_video.export import export
from dit_video.model import DiT
from dit_video.pipeline import Pipeline
from dit_video.preflight import main as preflight_main
from dit_video.run import preflight, train

pytest.importorskip("diffusers")

TEXT_LEN = 32  # MiniLM's max_length: captions are padded to it, as Wan's to 512
# A Wan-shaped model for the demo's 4-channel VAE latents and 384-d MiniLM captions.
TINY_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                text_dim=384, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True)
# The same shape as model overrides of conf/model/wan2_1_t2v_1_3b.yaml (its Wan layout, demo sizes).
WAN_MODEL = ["model=wan2_1_t2v_1_3b", "model.hidden_size=32", "model.depth=2", "model.num_heads=2",
             "model.mlp_ratio=2.0", "model.rope_axes_dim=[8,4,4]", "model.freq_dim=32", f"model.text_len={TEXT_LEN}"]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """{"wan", "converted", "run", "cfg"}: the diffusers folder, our converted file, the fine-tuning run."""
    tiny = tiny_run(tmp_path_factory)  # demo shards and a 6-step demo VAE
    root = tmp_path_factory.mktemp("wan_finetune")
    wan = save_wan(root / "wan", TINY_WAN, shard=False)
    converted = root / "wan.safetensors"
    convert_main([str(wan), str(converted), "--text-len", str(TEXT_LEN)])  # 1. convert
    data = [f"data.shards={tiny['shards']}/train-*.tar", f"data.val_shards={tiny['shards']}/val-*.tar"]
    cfg = compose_train("+experiment=demo", *data, *TINY_DATA, *WAN_MODEL, f"vae.path={tiny['vae']}",
                        f"init_from={converted}", "eval=off", "trainer.max_steps=12", "optim.lr=3e-3",
                        "optim.warmup_steps=1", "ema_decay=0.5", f"run_dir={root / 'run'}",
                        "trainer.enable_model_summary=false")
    threads = torch.get_num_threads()
    train(cfg)  # 2. full fine-tuning from the converted weights
    torch.set_num_threads(threads)
    return {"wan": wan, "converted": converted, "run": root / "run", "cfg": cfg}


def test_fine_tuning_from_converted_weights_lowers_the_loss(finetuned):
    """The held-out loss (fixed clips, noise and t) of the converted weights vs the fine-tuned ones."""
    pipe = Pipeline.from_checkpoint(finetuned["run"] / "checkpoints" / "last.ckpt", weights="raw", device="cpu")
    data_cfg, datamodule = build_data(finetuned["cfg"])
    datamodule.setup("fit")
    batch = next(iter(datamodule.val_dataloader()))
    with torch.no_grad():
        latents = pipe.vae.encode(clip_to_video(batch["clip"])).float()
        text_emb, text_mask = pipe.text_encoder.encode(batch["caption"])
        start = DiT(pipe.dit.cfg).eval()
        init_dit_from(start, str(finetuned["converted"]))
        losses = [pipe.objective.loss(dit, latents, text_emb, text_mask, generator=torch.Generator().manual_seed(0))[0]
                  for dit in (start, pipe.dit)]
    print(f"held-out loss: converted {losses[0]:.4f}, fine-tuned {losses[1]:.4f}")
    assert losses[1] < 0.8 * losses[0], losses
    # ... and it started from them: 12 small AdamW steps stay near the converted weights, far from a fresh init
    ckpt = load_checkpoint(finetuned["run"] / "checkpoints" / "last.ckpt")
    assert ckpt["dit_video"]["config"]["init_from"] == str(finetuned["converted"])
    trained = torch.cat([ckpt["state_dict"][f"dit.{k}"].flatten() for k, _ in start.named_parameters()])
    converted = torch.cat([p.flatten() for p in start.parameters()])
    fresh = torch.cat([p.flatten() for p in DiT(start.cfg).parameters()])
    assert 0 < (trained - converted).norm() < 0.5 * (fresh - converted).norm()


def test_samples_and_exported_diffusers_model_agree(finetuned, tmp_path):
    """Our sampler with our DiT == our sampler with diffusers' reloaded export (fp32), same noise."""
    pipe = Pipeline.from_checkpoint(finetuned["run"] / "checkpoints" / "last.ckpt", device="cpu")  # EMA weights, as sampling uses
    clips, latents = pipe.generate(["a red square moving left", "a blue circle moving up"], seeds=[0, 1], steps=4,
                                   cfg=3.0, autocast=False, return_latents=True)  # 3. sample
    assert clips.shape == (2, 17, 32, 32, 3) and clips.dtype.name == "uint8"
    out, _ = export(finetuned["run"], tmp_path / "diffusers")  # 4. export (EMA weights)
    wan = load_wan(out)  # 5. reload in diffusers

    def diffusers_model(x, t, text_emb, text_mask):
        return wan_forward(wan, x, t, padded_text(text_emb, text_mask, TEXT_LEN))

    text_emb, text_mask = pipe.text_encoder.encode(["a red square moving left", "a blue circle moving up"])
    null_emb, null_mask = pipe.text_encoder.encode([""])
    noise = torch.stack([torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(s)) for s in (0, 1)])
    with torch.no_grad():
        theirs = sample(diffusers_model, text_emb, text_mask, tuple(noise.shape), null_text_emb=null_emb,
                        null_text_mask=null_mask, steps=4, cfg=3.0, shift=pipe.objective.cfg.shift, noise=noise,
                        objective=pipe.objective)
        assert_close(latents, theirs, "sampled latents", tol=1e-4)  # 4 steps x 2 guided calls, each equal to 1e-5
        t = torch.tensor([0.3, 0.9])
        assert_close(pipe.dit(noise, t, text_emb, text_mask), diffusers_model(noise, t, text_emb, text_mask), "forward")


def test_init_from_refuses_other_configs_and_missing_files_in_one_line(finetuned, tmp_path):
    demo = build_dit_config(compose_train("model=dit_demo").model, in_channels=4, text_dim=384)
    with pytest.raises(ConfigError, match=r"init_from=.*model\.hidden_size=32 there, 192 in this run") as err:
        init_dit_from(DiT(demo), str(finetuned["converted"]))
    assert "\n" not in str(err.value)
    cfg, _, _ = load_dit_weights(finetuned["converted"])
    cfg.text_len = 16  # a field that changes no weight's shape still changes the model
    with pytest.raises(ConfigError, match=r"model\.text_len=32 there, 16 in this run"):
        init_dit_from(DiT(cfg), str(finetuned["converted"]))
    cfg.text_len, cfg.attn_backend, cfg.rope_scale = TEXT_LEN, "sdpa", (2.0, 1.0, 1.0)  # free: no weight changes
    init_dit_from(DiT(cfg), str(finetuned["converted"]))
    missing = compose_train("+experiment=demo", f"init_from={tmp_path / 'nope.safetensors'}")
    with pytest.raises(ConfigError, match=r"init_from: '.*nope.safetensors' does not exist"):
        preflight(missing)


@pytest.mark.parametrize("model", ["wan2_1_t2v_1_3b", "wan2_1_t2v_14b"])
def test_preflight_gives_full_and_lora_fine_tuning_memory_on_1_and_8_gpus(model, capsys):
    preflight_main(["+experiment=wan_1_3b_finetune", f"model={model}"])
    out = capsys.readouterr().out
    rows = {m.group(1).strip(): [float(v) for v in m.group(2).split()]
            for m in re.finditer(r"^  ([A-Za-z0-9,+\- ]+?)\s+((?:\d+\.\d+\s*){10})$", out, re.M)}
    assert "81x480x832 -> latents (21, 60, 104) -> 32760 tokens" in out
    one, eight = rows["full, 1 GPU"], rows["full, 8 GPUs"]
    assert eight == rows["FSDP + ckpt"]  # the experiment's own node: 8 GPUs, FSDP2 + activation checkpointing
    assert one[2] == pytest.approx(8 * eight[2], rel=0.01)  # AdamW moments: all on one GPU, an eighth on eight
    assert one[-1] > eight[-1]
    lora_one, lora_eight = rows["LoRA r32, 1 GPU"], rows["LoRA r32, 8 GPUs"]  # conf/lora/wan.yaml's rank
    assert lora_one[1] < 0.05 * one[1] and lora_one[2] < 0.05 * one[2]  # no gradients or moments for the base
    assert lora_one[-1] < one[-1] and lora_eight[-1] < eight[-1]
    assert lora_eight[6] == eight[6]  # the same activations: backward runs through every frozen layer
