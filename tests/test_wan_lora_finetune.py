"""End to end on CPU with LoRA: a tiny Wan-shaped diffusers model is converted, LoRA-fine-tuned on the demo
shards through dit_video.run (lora=wan; the loss falls), sampled with our sampler, exported merged and as a
diffusers LoRA, reloaded in diffusers (from_pretrained, and WanPipeline.load_lora_weights on the base), and
the outputs agree. The base weights stay bitwise the converted ones; only the adapters are checkpointed."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_wan_finetune import TEXT_LEN, TINY_WAN, WAN_MODEL
from tiny_run import TINY_DATA, compose_train, tiny_run
from tiny_wan import assert_close, load_wan, padded_text, save_wan, wan_forward

from dit_video.build import build_data, init_dit_from
from dit_video.checkpoint.load import load_checkpoint
from dit_video.convert.__main__ import main as convert_main
from dit_video.diffusion import sample
from dit_video.encoders.base import clip_to_video
from dit_video.errors import CheckpointError, ConfigError
from dit_video.export import export
from dit_video.export import main as export_main
from dit_video.lora import is_adapter_key
from dit_video.model import DiT
from dit_video.pipeline import Pipeline
from dit_video.run import train

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytestmark = pytest.mark.slow  # ~25 s on 2 cores: the module fixture trains 12 steps through train.py

PROMPTS = ["a red square moving left", "a blue circle moving up"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """{"wan", "converted", "run", "cfg"}: the diffusers folder, our converted file, the LoRA run."""
    tiny = tiny_run(tmp_path_factory)  # demo shards and a 6-step demo VAE
    root = tmp_path_factory.mktemp("wan_lora")
    wan = save_wan(root / "wan", TINY_WAN, shard=False)
    converted = root / "wan.safetensors"
    convert_main([str(wan), str(converted), "--text-len", str(TEXT_LEN)])  # 1. convert
    data = [f"data.shards={tiny['shards']}/train-*.tar", f"data.val_shards={tiny['shards']}/val-*.tar"]
    base = ["+experiment=demo", *data, *TINY_DATA, *WAN_MODEL, f"vae.path={tiny['vae']}", "eval=off"]
    cfg = compose_train(*base, f"init_from={converted}", "lora=wan", "lora.rank=8", "lora.alpha=16",
                        "trainer.max_steps=12", "optim.lr=1e-2", "optim.warmup_steps=1", "ema_decay=0.5",
                        f"run_dir={root / 'run'}", "trainer.enable_model_summary=false")
    threads = torch.get_num_threads()
    train(cfg)  # 2. LoRA fine-tuning on the frozen converted weights
    torch.set_num_threads(threads)
    return {"wan": wan, "converted": converted, "run": root / "run", "cfg": cfg, "base": base}


def test_lora_fine_tuning_lowers_the_loss_and_checkpoints_only_the_adapters(lora_run):
    ckpt_path = lora_run["run"] / "checkpoints" / "last.ckpt"
    ckpt = load_checkpoint(ckpt_path)
    keys = list(ckpt["state_dict"])
    assert keys and all(is_adapter_key(k) for k in keys), [k for k in keys if not is_adapter_key(k)][:3]
    assert {k.split(".", 1)[0] for k in keys} == {"dit", "ema"}  # the adapters and their EMA, nothing frozen
    base = DiT(Pipeline.from_checkpoint(ckpt_path, weights="raw", device="cpu").dit.cfg)
    init_dit_from(base, str(lora_run["converted"]))
    n_base = sum(p.numel() for p in base.parameters())
    n_adapters = sum(v.numel() for k, v in ckpt["state_dict"].items() if k.startswith("dit."))
    assert n_adapters < 0.5 * n_base  # tiny here; ~2% of Wan 1.3B at rank 32
    moments = [v for s in ckpt["optimizer_states"][0]["state"].values() for v in s.values() if v.dim() > 0]
    assert sum(m.numel() for m in moments) == 2 * n_adapters  # AdamW state of the adapters only
    assert ckpt["dit_video"]["lora"]["rank"] == 8 and ckpt["dit_video"]["lora"]["base"] == str(lora_run["converted"])
    # the held-out loss (fixed clips, noise and t): converted weights vs converted + trained adapters
    pipe = Pipeline.from_checkpoint(ckpt_path, weights="raw", device="cpu")
    _, datamodule = build_data(lora_run["cfg"])
    datamodule.setup("fit")
    batch = next(iter(datamodule.val_dataloader()))
    with torch.no_grad():
        latents = pipe.vae.encode(clip_to_video(batch["clip"])).float()
        text_emb, text_mask = pipe.text_encoder.encode(batch["caption"])
        losses = [pipe.objective.loss(dit.eval(), latents, text_emb, text_mask,
                                      generator=torch.Generator().manual_seed(0))[0] for dit in (base, pipe.dit)]
    print(f"held-out loss: converted {losses[0]:.4f}, LoRA-fine-tuned {losses[1]:.4f}")
    assert losses[1] < 0.9 * losses[0], losses


def test_samples_merged_export_and_diffusers_lora_agree(lora_run, tmp_path):
    pipe = Pipeline.from_checkpoint(lora_run["run"] / "checkpoints" / "last.ckpt", device="cpu")  # EMA adapters merged, as sampling uses
    clips, latents = pipe.generate(PROMPTS, seeds=[0, 1], steps=4, cfg=3.0, autocast=False, return_latents=True)  # 3.
    assert clips.shape == (2, 17, 32, 32, 3)
    export_main([f"ckpt={lora_run['run']}", f"out={tmp_path / 'merged'}", "--format", "diffusers"])  # 4. export
    export_main([f"ckpt={lora_run['run']}", f"out={tmp_path / 'lora.safetensors'}", "--format", "lora"])
    assert all(k.startswith("transformer.blocks.") for k in load_file(str(tmp_path / "lora.safetensors")))
    merged = load_wan(tmp_path / "merged")  # 5. reload in diffusers: the merged model ...
    from diffusers import WanPipeline

    wan_pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None,
                           transformer=load_wan(lora_run["wan"]))
    wan_pipe.load_lora_weights(str(tmp_path / "lora.safetensors"))  # ... and the base with diffusers' LoRA loader
    text_emb, text_mask = pipe.text_encoder.encode(PROMPTS)
    null_emb, null_mask = pipe.text_encoder.encode([""])
    noise = torch.stack([torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(s)) for s in (0, 1)])
    t = torch.tensor([0.3, 0.9])
    ours = pipe.dit(noise, t, text_emb, text_mask)
    for name, wan in (("merged export", merged), ("diffusers LoRA", wan_pipe.transformer)):
        def diffusers_model(x, t, text_emb, text_mask, wan=wan):
            return wan_forward(wan, x, t, padded_text(text_emb, text_mask, TEXT_LEN))

        with torch.no_grad():
            theirs = sample(diffusers_model, text_emb, text_mask, tuple(noise.shape), null_text_emb=null_emb,
                            null_text_mask=null_mask, steps=4, cfg=3.0, shift=pipe.objective.cfg.shift, noise=noise,
                            objective=pipe.objective)
            assert_close(latents, theirs, f"sampled latents, {name}", tol=1e-4)
            assert_close(ours, diffusers_model(noise, t, text_emb, text_mask), f"forward, {name}")
    # the adapters moved the model: the base alone gives other outputs
    with torch.no_grad():
        base_out = wan_forward(load_wan(lora_run["wan"]), noise, t, padded_text(text_emb, text_mask, TEXT_LEN))
    assert (base_out - ours).abs().max() > 1e-3


def test_lora_refusals_are_one_line(lora_run, tmp_path):
    with pytest.raises(ConfigError, match="init_from"):
        train(compose_train(*lora_run["base"], "lora=wan", f"run_dir={tmp_path / 'a'}"))
    with pytest.raises(ConfigError, match="lora.rank"):
        train(compose_train(*lora_run["base"], "lora=wan", "lora.rank=0", f"init_from={lora_run['converted']}",
                            f"run_dir={tmp_path / 'b'}"))
    with pytest.raises(CheckpointError, match="no LoRA adapters"):
        export(lora_run["converted"], tmp_path / "x.safetensors", fmt="lora")
    with pytest.raises(CheckpointError, match="missing; pass base="):
        export(lora_run["run"], tmp_path / "y", base=str(tmp_path / "moved.safetensors"))
