"""In-training evaluation on 2 gloo ranks with an FSDP2-sharded EMA, whose every forward is a
collective (the all-gather of its weights): held-out loss and samples must make every rank run the
same forwards, and hand collectives only tensors on the module's device.

On a cluster a rank that skips a forward hangs the others until the NCCL timeout, and NCCL refuses
the host float64 tensors the held-out loss once all-reduced; on gloo the first may still hang and
the second passes silently, so the ranks' collectives are recorded and compared, with host tensors
emulated (tests/spawn_ranks.py): 4 held-out batches over 2 ranks (2 + 2: only the device can be
wrong), then 3 (2 + 1), and 1 prompt over 2.
"""

from __future__ import annotations

import contextlib
import datetime
import types

import numpy as np
import torch
import torch.distributed as dist
from spawn_ranks import spawn_ranks

WORLD = 2
LATENT_SHAPE = (3, 4, 4)


def tiny_dit():
    from dit_video.model import DiT, DiTConfig

    torch.manual_seed(0)
    model = DiT(DiTConfig(in_channels=4, text_dim=16, hidden_size=32, depth=2, num_heads=2))
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.1)  # leave adaLN-Zero, so the loss depends on every weight
    return model


def held_out_batches(rank: int, even: bool = False) -> list[dict]:
    """Rank 0 reads 2 held-out batches, rank 1 one (what uneven shards give), or 2 each."""
    sizes = [2, 2] if even or rank == 0 else [2]
    g = torch.Generator().manual_seed(100 + rank)
    return [{"clip": torch.randn(b, 4, *LATENT_SHAPE, generator=g), "caption": [f"clip {rank}"] * b} for b in sizes]


def fake_module(ema):
    """What ValidationLoss reads of a DiTModule: the weights (EMA), the device, the encoders, the objective, meta."""
    from omegaconf import OmegaConf
    from strategy_run import ROOT

    from dit_video.diffusion import build_objective

    device = torch.device("cpu")

    def encode_text_pooled(captions):  # as DiTModule's: the text encoder's output moved to the module's device
        text = torch.stack([torch.full((3, 16), float(len(c))) for c in captions])  # [B, L, D]
        return text.to(device), torch.ones(len(captions), 3, dtype=torch.bool).to(device), None

    objective = build_objective(OmegaConf.to_container(OmegaConf.load(ROOT / "conf/objective/rectified_flow.yaml")))
    return types.SimpleNamespace(ema=ema, dit=ema, device=device, objective=objective, meta={"latent_shape": LATENT_SHAPE},
                                 weights=lambda kind: contextlib.nullcontext(ema),  # DiTModule.weights: raw and EMA are one here
                                 encode_clips=lambda clip: clip.float(), encode_text_pooled=encode_text_pooled)


def _rank(rank: int, store: str, queue) -> None:
    from torch.distributed.fsdp import fully_shard

    from dit_video.eval.samples import sample_across_ranks
    from dit_video.eval.val_loss import ValidationLoss, ValLossConfig

    torch.set_num_threads(1)
    # A short timeout: a rank left waiting in a collective fails the test in seconds, not minutes.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=30))
    try:
        ema = tiny_dit()
        for block in ema.blocks:  # the EMA as an FSDP2 run holds it (parallel.parallelize_dit_module)
            fully_shard(block)
        fully_shard(ema)
        ema.eval()
        module = fake_module(ema)
        metrics = {}
        for even in (True, False):  # even shards first: only the device of the reduced tensors can fail there
            data = types.SimpleNamespace(val_dataloader=lambda even=even: held_out_batches(rank, even))
            trainer = types.SimpleNamespace(datamodule=data, is_global_zero=rank == 0, logger=None)
            metrics[even] = ValidationLoss(ValLossConfig(every_n_steps=1, max_batches=4)).evaluate(trainer, module)

        calls = []

        def generate(prompts, seeds):
            calls.append(list(prompts))
            noise = torch.stack([torch.randn(4, *LATENT_SHAPE, generator=torch.Generator().manual_seed(s)) for s in seeds])
            n = len(prompts)
            with torch.no_grad():
                out = ema(noise, torch.full((n,), 0.5), torch.zeros(n, 1, 16), torch.ones(n, 1, dtype=torch.bool))
            video = (out[:, :3].clamp(-1, 1) * 127 + 128).to(torch.uint8)  # [n, 3, T, H, W]
            return video.permute(0, 2, 3, 4, 1).numpy()  # [n, T, H, W, 3]

        clips, owner = sample_across_ranks(generate, ["a red square moving left"], [7])
        queue.put((rank, {"metrics": metrics, "calls": calls, "clips": clips, "owner": owner}))
    finally:
        dist.destroy_process_group()


def test_sharded_ema_evaluation_runs_the_same_forwards_on_every_rank(tmp_path):
    done = spawn_ranks(_rank, str(tmp_path / "store"), WORLD, timeout=90, host_tensors=True)
    from dit_video.eval.val_loss import ValLossConfig, held_out_sums

    # Held-out loss: the padded forward's result is dropped; both ranks report the loss over the 3
    # real batches, as one process computes it batch by batch with the whole (unsharded) EMA.
    dit = tiny_dit().eval()
    for even, samples in ((True, 8), (False, 6)):  # uneven: 2 + 2 + 2 samples, the dummy batch not counted
        sums, counts = zip(*(held_out_sums(fake_module(dit), dit, held_out_batches(r, even), ValLossConfig(max_batches=4))
                             for r in range(WORLD)), strict=True)
        expected = float(sum(s.sum() for s in sums) / sum(c.sum() for c in counts))
        assert float(sum(c.sum() for c in counts)) == samples
        for rank in range(WORLD):
            assert abs(done[rank]["metrics"][even]["val/loss"] - expected) < 1e-5 * expected
    # Samples: one prompt, two ranks: rank 1 generates a padding clip too, dropped after the gather.
    assert [len(c) for c in done[0]["calls"]] == [len(c) for c in done[1]["calls"]] == [1]
    assert done[0]["owner"] == done[1]["owner"] == [0]
    np.testing.assert_array_equal(done[0]["clips"], done[1]["clips"])
    assert done[0]["clips"].shape == (1, 3, 4, 4, 3)
