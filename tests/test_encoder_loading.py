"""Frozen encoders once per node: of the processes of one node, only the first hashes the encoders'
weights for the run's identity record (dit_video.distributed.once_per_node behind
run.encoder_identities); the others read its result. And the frozen encoders never reach the
optimizer: requires_grad is off, no gradient, no optimizer state."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf

WORLD = 2


def _count_and_return(log: str) -> dict:
    with open(log, "a") as f:
        f.write("computed\n")
    time.sleep(0.5)  # long enough that the other process asks while this one still computes
    return {"sha256": "abc"}


def _once(rank: int, cache: str, log: str, queue) -> None:
    from functools import partial

    from dit_video.distributed import once_per_node

    queue.put((rank, once_per_node("the key", partial(_count_and_return, log), Path(cache))))


def test_once_per_node_computes_once_for_two_processes(tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    log = tmp_path / "log.txt"
    procs = [ctx.Process(target=_once, args=(r, str(tmp_path / "cache"), str(log), queue)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0] * WORLD
    results = dict(queue.get(timeout=5) for _ in range(WORLD))
    assert results == {0: {"sha256": "abc"}, 1: {"sha256": "abc"}}
    assert log.read_text() == "computed\n"  # one process computed, the other read its result


def test_files_key_changes_when_a_file_is_rewritten(tmp_path):
    from dit_video.distributed import files_key

    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "weights.safetensors").write_bytes(b"1234")
    before = files_key([folder])
    assert [Path(f).name for f, _, _ in before] == ["weights.safetensors"]  # found in a subfolder
    (folder / "sub" / "weights.safetensors").write_bytes(b"12345")
    assert files_key([folder]) != before


def _saved_vae(root: Path) -> Path:
    from dit_video.encoders import save_vae
    from dit_video.encoders.causal_vae import VAE_PRESETS, CausalVAE

    torch.manual_seed(0)
    config = VAE_PRESETS["tiny"]
    vae = CausalVAE(config)
    shift, scale = torch.zeros(config.latent_channels), torch.ones(config.latent_channels)
    save_vae(root / "vae", vae, config, shift, scale)
    return root / "vae"


def _identities(rank: int, vae_dir: str, cache: str, queue) -> None:
    import dit_video.distributed
    from dit_video.build import encoder_identities
    from dit_video.encoders import HFTextEncoder, load_vae, minilm_path

    dit_video.distributed.NODE_CACHE = Path(cache)  # this test's "node", not the machine's /tmp one
    torch.set_num_threads(1)
    vae, text = load_vae(vae_dir), HFTextEncoder(minilm_path(), max_length=16)
    cfg = OmegaConf.create({"vae": {"path": vae_dir}, "text_encoder": {"path": minilm_path(), "max_length": 16}})
    ids = encoder_identities(cfg, vae, text)
    hashed = vae._sha256 is not None and text._sha256 is not None  # identity() ran here (it caches the hash)
    queue.put((rank, hashed, json.dumps(ids, sort_keys=True)))


def test_encoder_identities_are_hashed_by_one_process_per_node(tmp_path):
    from dit_video.encoders import HFTextEncoder, load_vae, minilm_path

    vae_dir = _saved_vae(tmp_path)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_identities, args=(r, str(vae_dir), str(tmp_path / "cache"), queue))
             for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * WORLD
    results = [queue.get(timeout=5) for _ in range(WORLD)]
    assert sorted(hashed for _, hashed, _ in results) == [False, True]  # exactly one process hashed
    expected = {"vae": load_vae(vae_dir).identity(), "text_encoder": HFTextEncoder(minilm_path(), max_length=16).identity()}
    assert all(json.loads(ids) == json.loads(json.dumps(expected)) for _, _, ids in results)


def test_frozen_encoders_get_no_gradient_and_no_optimizer_state(tmp_path):
    from dit_video.diffusion import build_objective
    from dit_video.encoders import HFTextEncoder, load_vae, minilm_path
    from dit_video.lit_module import DiTModule, OptimConfig
    from dit_video.model import DiT, DiTConfig

    vae, text = load_vae(_saved_vae(tmp_path)), HFTextEncoder(minilm_path(), max_length=16)
    objective = build_objective(OmegaConf.to_container(OmegaConf.load(Path(__file__).parents[1] / "conf/objective/rectified_flow.yaml")))
    dit = DiT(DiTConfig(in_channels=vae.latent_channels, text_dim=text.dim, hidden_size=32, depth=1, num_heads=2))
    module = DiTModule(dit, objective, vae, text, OptimConfig(), ema_decay=0.9, meta={})
    frozen = [p for name in ("vae", "text_encoder") for p in getattr(module, name).parameters()]
    assert frozen and not any(p.requires_grad for p in frozen)
    optimizer = module.configure_optimizers()["optimizer"]
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in dit.parameters()}  # the DiT's parameters, nothing else
    clip = torch.randint(0, 256, (1, 5, 32, 32, 3), dtype=torch.uint8)  # [B, T, H, W, 3]
    latents, text_emb, text_mask, *_ = module.model_inputs({"clip": clip, "caption": ["a red square"]})
    loss, _ = objective.loss(dit, latents, text_emb, text_mask)
    loss.backward()
    assert all(p.grad is None for p in frozen)
