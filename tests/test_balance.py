"""Balanced steps (data/balance.py): the clip cost model against dit_flops; the balanced order (every
unit once except the tail, order.py's order when costs are equal or W = 1, like-cost steps);
world-size changes without repeats or drops; exact resume with 2 workers; the same samples per
epoch; and the per-step figures the loader hands to the Throughput callback and the report."""

from __future__ import annotations

import csv
import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from test_buckets import write_mixed_shard
from tiny_run import ROOT, TINY_DIT, compose_train, tiny_run

from dit_video.build import build_dit_config
from dit_video.data.balance import (
    ClipCost,
    CostModel,
    balanced_order,
    clip_cost,
    cost_classes,
    cost_table,
    segment_order,
    unit_costs,
)
from dit_video.data.buckets import make_buckets
from dit_video.data.config import VideoDataConfig
from dit_video.data.datamodule import VideoDataModule
from dit_video.data.packing import pack_epoch, pack_epoch_decreasing
from dit_video.eval.evaluate import markdown_report
from dit_video.eval.throughput import Throughput, ThroughputConfig, throughput_markdown, throughput_summary
from dit_video.model.config import DiTConfig
from dit_video.model.flops import dit_flops
from dit_video.preflight import main as preflight_main
from dit_video.run import train

TINY = DiTConfig(in_channels=4, text_dim=8, hidden_size=32, depth=2, num_heads=2, patch_size=(1, 2, 2))
TEXT_LEN = 7


def latent_shape(num_frames: int, height: int, width: int) -> tuple[int, int, int]:
    return 1 + (num_frames - 1) // 4, height // 8, width // 8  # a causal 4x8x8 VAE


COST = CostModel(TINY, latent_shape, TEXT_LEN)


# -- the cost model -----------------------------------------------------------------------------
@pytest.mark.parametrize("variant", [{}, {"conditioning": "mmdit", "num_dual_blocks": 1}])
@pytest.mark.parametrize("shape", [(5, 8, 8), (1, 8, 8), (9, 16, 8)])
def test_clip_cost_splits_dit_flops_into_linear_and_attention(shape, variant):
    cfg = DiTConfig(**{**TINY.__dict__, **variant})
    fc, cost = dit_flops(cfg, shape, TEXT_LEN), clip_cost(cfg, shape, TEXT_LEN)
    assert cost.flops == fc.training and cost.linear + cost.attention == fc.training
    assert cost.attention == 3 * fc.attention  # forward + a backward of 2x: both operands need gradients
    assert cost.tokens == math.prod(cfg.grid(shape))
    if not variant:  # cross-attention DiT: self-attention N^2 plus cross-attention N x L, per block
        n, d = cost.tokens, cfg.hidden_size
        assert cost.attention == 3 * cfg.depth * (4 * n * n * d + 4 * n * TEXT_LEN * d)


def test_cost_model_prices_pixels_through_the_vae_and_attention_grows_with_tokens_squared():
    assert COST(17, 64, 64) == clip_cost(TINY, (5, 8, 8), TEXT_LEN)
    short, long = COST(17, 64, 64), COST(33, 64, 64)  # 80 and 144 tokens
    assert long.tokens / short.tokens == 144 / 80
    assert (144 / 80) ** 1.9 < long.attention / short.attention < (144 / 80) ** 2  # self ~ tokens^2, cross ~ tokens
    assert long.linear / short.linear < 144 / 80  # per-sample terms (timestep MLP, adaLN) do not grow


def test_unit_costs_of_bucket_batches_and_packs():
    buckets = make_buckets([{"num_frames": 17, "size": [64, 64], "batch_size": 3},
                            {"num_frames": 1, "size": [64, 64], "batch_size": 5}])
    table = cost_table(COST, buckets)
    a, b = table[(17, 64, 64)], table[(1, 64, 64)]
    bucket_of = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    batches = [np.array([0, 1, 2]), np.array([3, 4, 5, 6, 7])]
    units = unit_costs(batches, buckets, bucket_of, buckets, table)
    assert units.flops.tolist() == [3 * a.flops, 5 * b.flops] and units.tokens.tolist() == [3 * a.tokens, 5 * b.tokens]
    assert (units.slots == units.tokens).all()  # full bucket batches: no pad
    packs = [np.array([0, 3, 4]), np.array([1, 2, 5])]
    units = unit_costs(packs, [None, None], bucket_of, buckets, table, max_tokens=200)
    assert units.flops.tolist() == [a.flops + 2 * b.flops, 2 * a.flops + b.flops]
    assert units.tokens.tolist() == [a.tokens + 2 * b.tokens, 2 * a.tokens + b.tokens] and units.slots.tolist() == [200, 200]


# -- the balanced order -------------------------------------------------------------------------
def _imbalance(flops: np.ndarray, steps: np.ndarray) -> float:
    per_rank = flops[steps]  # [S, W]
    return float(np.mean(per_rank.max(axis=1) / per_rank.mean(axis=1) - 1))


def test_balanced_order_reads_every_unit_once_except_the_tail():
    flops = np.random.default_rng(0).choice([1.0, 1.0, 1.0, 3.0, 7.5], size=103)
    for world in (1, 4, 8, 16):
        order = balanced_order(flops, world)
        assert sorted(order.tolist()) == list(range(103 - 103 % world))  # the last 103 mod W: order.py's tail


def test_balanced_order_is_order_py_s_with_equal_costs_or_one_rank():
    assert balanced_order(np.full(50, 2.0), 8).tolist() == list(range(48))
    flops = np.random.default_rng(1).choice([1.0, 3.0, 7.5], size=37)
    assert balanced_order(flops, 1).tolist() == list(range(37))


def test_balanced_steps_cost_the_same_and_most_units_keep_their_place():
    """64 ranks, 90% clip batches and 10% image batches costing 3.5x (the dit_256 bucket mix): today's
    steps idle ranks, balanced ones do not, and most batches keep their (step, rank)."""
    world = 64
    flops = np.where(np.random.default_rng(2).random(64 * 40) < 0.1, 3.5, 1.0)
    today = np.arange(len(flops)).reshape(-1, world)
    balanced = balanced_order(flops, world).reshape(-1, world)
    assert _imbalance(flops, today) > 0.5
    assert _imbalance(flops, balanced) < 0.05
    assert np.mean(balanced.reshape(-1) == today.reshape(-1)) > 0.6


def test_cost_classes_group_costs_within_the_tolerance():
    klass = cost_classes(np.array([1.0, 1.004, 1.02, 1.0, 5.0, 1.021]), tolerance=0.005)
    assert klass.tolist() == [0, 0, 1, 0, 2, 1]


def test_world_size_changes_mid_epoch_repeat_and_drop_nothing():
    """4 ranks for 7 steps, 3 ranks for 10, then 5 ranks to the end of the epoch: every unit is read
    at most once, and the only units left are the last segment's tail (fewer than 5)."""
    flops = np.random.default_rng(3).choice([1.0, 2.0, 5.0], size=200)
    history, seen = (), []
    for world, steps in ((4, 7), (3, 10), (5, None)):
        order, done, past = segment_order(flops, 0, history, world)
        assert done == 0 and past == history
        steps = len(order) // world if steps is None else steps
        seen += order[: steps * world].tolist()
        history = past + ((world, steps),)
    assert len(seen) == len(set(seen)), "a unit was read twice"
    left = sorted(set(range(200)) - set(seen))
    assert len(left) == (200 - 4 * 7 - 3 * 10) % 5  # the tail: remaining mod W, as order.py skips
    # a resume at the world size the state was saved with carries on with the same plan
    fresh, _, _ = segment_order(flops, 0, ((4, 7),), 3)
    resumed, done, past = segment_order(flops, 0, ((4, 7), (3, 2)), 3)
    assert done == 2 and past == ((4, 7),) and resumed.tolist() == fresh.tolist()
    # a prefix read in order.py's order (a run that began unbalanced) is not read again
    order, _, _ = segment_order(flops, 30, (), 4)
    assert sorted(order.tolist()) == list(range(30, 198))
    with pytest.raises(ValueError, match="data loader state"):
        segment_order(flops, 0, ((4, 60),), 3)


def test_packs_decreasing_fill_fuller_and_keep_the_partition():
    rng = np.random.default_rng(4)
    bucket_of = rng.integers(-1, 4, size=3000)
    tokens, budget = [45, 44, 25, 5], 180
    for packs in (pack_epoch_decreasing(bucket_of, tokens, budget, seed=1, epoch=0, window=512),
                  pack_epoch(bucket_of, tokens, budget, 8, 1, 0)):
        flat = np.concatenate(packs)
        assert sorted(flat.tolist()) == np.flatnonzero(bucket_of >= 0).tolist()
        assert max(sum(tokens[bucket_of[i]] for i in p) for p in packs) <= budget
    decreasing = pack_epoch_decreasing(bucket_of, tokens, budget, seed=1, epoch=0, window=512)
    first = pack_epoch(bucket_of, tokens, budget, 8, 1, 0)
    assert len(decreasing) < len(first)  # fuller packs: fewer of them
    again = pack_epoch_decreasing(bucket_of, tokens, budget, seed=1, epoch=0, window=512)
    assert [p.tolist() for p in decreasing] == [p.tolist() for p in again]  # a pure function of (seed, epoch)


# -- the loader ---------------------------------------------------------------------------------
BUCKETS = [{"num_frames": 9, "size": [16, 16]}, {"num_frames": 9, "size": [16, 32]},
           {"num_frames": 5, "size": [32, 16]}, {"num_frames": 1, "size": [16, 16]}]


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory):
    """Square, wide and tall videos and png images (8 of each) in two shards: four buckets whose
    batches cost the DiT different amounts."""
    root = tmp_path_factory.mktemp("balance")
    rng = np.random.default_rng(0)
    sizes = {"square": (16, 16, 9), "wide": (16, 32, 9), "tall": (32, 16, 5), "image": (24, 24, 1)}
    for shard in range(2):
        write_mixed_shard(root / f"mixed-{shard:06d}.tar", sizes, 16, rng,
                          key=lambda kind, i, s=shard: f"{kind}_{s}{i:02d}")
    return root


def _module(root, workers: int = 0, balance: bool = True, packing: dict | None = None,
            cost: bool = True) -> VideoDataModule:
    cfg = VideoDataConfig(shards=str(root / "mixed-*.tar"), val_shards=None, num_frames=9, fps=8.0, size=(16, 16),
                          buckets=[{**b, "batch_size": 2} for b in BUCKETS], num_workers=workers, seed=5,
                          balance=balance, packing=packing)
    module = VideoDataModule(cfg)
    module.clip_cost = COST if cost else None
    module.tokens_per_clip = lambda t, h, w: COST(t, h, w).tokens
    return module


def _consume(module: VideoDataModule, n: int) -> list[dict]:
    loader = module.train_dataloader()
    out = [module.on_before_batch_transfer(b, 0) for b in itertools.islice(loader, n)]
    del loader
    return out


def _ranks(module: VideoDataModule, world: int, steps: int | None = None) -> list[list[dict]]:
    """Each rank's batches, read in this process (rank r of `world`): `steps` each, or to the epoch's end."""
    out = []
    for rank in range(world):
        ds = module.train_dataset()
        ds.rank, ds.world_size = rank, world
        batches = []
        for batch in iter(ds):
            batches.append(batch)
            if len(batches) == steps or batch["position"][0] > module._position[0]:
                break
        out.append(batches)
    return out


@pytest.mark.parametrize("packing", [None, {"enabled": True, "max_tokens": 12, "fit": "decreasing"}])
def test_balanced_resume_with_two_workers_gives_the_same_batches(mixed_shards, monkeypatch, packing):
    """Rank 1 of 2, balanced (bucket batches or packs): stop mid-epoch, resume from the state, and
    the batches (keys, frames, crops) are the uninterrupted run's, into the next epoch."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    steps = len(_module(mixed_shards, packing=packing).train_dataset().epoch_plan(0)) // 2
    reference = _consume(_module(mixed_shards, workers=2, packing=packing), steps + 2)
    unbalanced = _consume(_module(mixed_shards, balance=False, packing=packing), steps)
    assert [b["key"] for b in reference[:steps]] != [b["key"] for b in unbalanced]  # balancing moved batches
    first = _module(mixed_shards, workers=2, packing=packing)
    _consume(first, 3)
    state = first.state_dict()
    assert state["epoch"] == 0 and state["batches_into_epoch"] == 6 and state["segments"] == [[2, 3]]
    resumed = _module(mixed_shards, workers=2, packing=packing)
    resumed.load_state_dict(state)
    for want, got in zip(reference[3:], _consume(resumed, steps - 1), strict=True):
        assert want["key"] == got["key"]
        clips = (want["clip"], got["clip"]) if packing else ([want["clip"]], [got["clip"]])
        assert all(torch.equal(a, b) for a, b in zip(*clips, strict=True))


def test_balanced_world_size_change_repeats_and_drops_nothing(mixed_shards):
    """2 ranks for 2 steps, then 5 ranks to the end of the epoch: no sample twice, and the samples
    left out are the tail only: the last (remaining mod 5) unread batches, in epoch order."""
    module = _module(mixed_shards)
    first = _ranks(module, 2, steps=2)
    module.on_before_batch_transfer(first[0][-1], 0)
    state = module.state_dict()
    assert state["batches_into_epoch"] == 4 and state["segments"] == [[2, 2]]
    later = _module(mixed_shards)
    later.load_state_dict(state)
    rest = _ranks(later, 5)
    assert [len(r) for r in rest] == [2] * 5  # 12 batches left: 2 steps of 5, the same for every rank
    assert all(r[-1]["position"] == (1, 0) for r in rest)  # and the epoch ends for all at once
    seen = [k for r in first + rest for b in r for k in b["key"]]
    assert len(seen) == len(set(seen)), "a sample was read twice"
    ds = later.train_dataset()
    plan = ds.epoch_plan(0)
    read_first = {k for r in first for b in r for k in b["key"]}
    unread = [[ds.index.samples[i].key for i in batch] for batch in plan
              if not read_first & {ds.index.samples[i].key for i in batch}]
    assert len(plan) == 16 and len(unread) == 12
    assert set(k for batch in unread[-2:] for k in batch) == {ds.index.samples[i].key for b in plan for i in b} - set(seen)


def test_a_balanced_epoch_trains_the_same_samples_as_order_py(mixed_shards):
    """Uninterrupted epoch at 2 ranks: the samples are order.py's, in steps that cost the same."""
    balanced, today = (_ranks(_module(mixed_shards, balance=b), 2) for b in (True, False))
    keys = [sorted(k for r in run for b in r for k in b["key"]) for run in (balanced, today)]
    assert keys[0] == keys[1]
    imbalance = [[b["rank_imbalance"] for b in run[0]] for run in (balanced, today)]
    assert max(imbalance[1]) > 0.2 and max(imbalance[0]) == 0.0  # 4 buckets x 4 batches: whole steps per bucket
    assert all(b["pad_fraction"] == 0.0 for b in balanced[0])  # bucket batches are full


def test_balance_without_clip_costs_is_a_clear_error_only_where_it_matters(mixed_shards):
    module = _module(mixed_shards, cost=False)
    assert len(_consume(module, 2)) == 2  # one process: order.py's order, no cost needed
    with pytest.raises(ValueError, match="data.balance: .*clip_cost.*data.balance=false"):
        _ranks(_module(mixed_shards, cost=False), 2, steps=1)


def test_turning_balance_off_mid_epoch_starts_the_next_epoch(mixed_shards, caplog):
    """order.py cannot continue an epoch read in balanced steps: the loader says so and starts the next."""
    module = _module(mixed_shards, balance=False)
    module.load_state_dict({"version": 1, "epoch": 0, "batches_into_epoch": 4, "segments": [[2, 2]], "seed": 5,
                            "world_size": 2, "fingerprint": None})
    batch = _consume(module, 1)[0]
    assert batch["position"] == (1, 1) and "starting epoch 1 from its beginning" in caplog.text


def test_balance_and_packing_fit_config_errors_name_the_field(mixed_shards):
    with pytest.raises(ValueError, match="data.packing.fit: must be one of"):
        VideoDataConfig(packing={"enabled": True, "fit": "best"}).packing.validate()
    with pytest.raises(ValueError, match="data.balance: must be true or false"):
        VideoDataConfig(val_shards=None, shards=str(mixed_shards / "mixed-*.tar"), balance="yes").validate()


# -- throughput logging and the report ------------------------------------------------------------
def test_throughput_logs_the_plans_rank_imbalance_and_pad_fraction():
    callback = Throughput(ThroughputConfig(log_every_n_steps=2))
    callback.dit_cfg, callback.text_len, callback.peak = TINY, TEXT_LEN, 1.0
    logged = []
    trainer = SimpleNamespace(world_size=1, global_step=0, is_global_zero=True,
                              logger=SimpleNamespace(log_metrics=lambda metrics, step: logged.append(metrics)))
    module = SimpleNamespace(device=torch.device("cpu"))
    for step, (imbalance, pad) in enumerate([(0.5, 0.1), (0.1, 0.0), (0.3, 0.2), (0.1, 0.2)], start=1):
        trainer.global_step = step
        batch = {"latents": torch.zeros(2, 4, 5, 8, 8), "rank_imbalance": imbalance, "pad_fraction": pad}
        callback.on_train_batch_end(trainer, module, None, batch, step)
    assert [m["perf/rank_imbalance"] for m in logged] == pytest.approx([0.3, 0.2])
    assert [m["perf/pad_fraction"] for m in logged] == pytest.approx([0.05, 0.2])


def test_throughput_summary_reads_the_run_metrics(tmp_path):
    with open(tmp_path / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "step", "train/loss", "perf/rank_imbalance", "perf/pad_fraction"])
        writer.writerows([[0, 1, 0.5, "", ""], [0, 10, "", 0.2, 0.0], [0, 20, "", 0.4, 0.1]])
    summary = throughput_summary(tmp_path / "metrics.csv")
    assert summary["perf/rank_imbalance"] == pytest.approx({"mean": 0.3, "last": 0.4, "count": 2})
    assert set(summary) == {"perf/rank_imbalance", "perf/pad_fraction"}
    markdown = "\n".join(throughput_markdown(summary))
    assert "| rank imbalance (max rank cost / mean - 1) | 0.3 | 0.4 | 2 |" in markdown
    assert throughput_summary(tmp_path / "missing.csv") == {} and throughput_markdown({}) == []


def test_evaluate_report_shows_the_training_throughput():
    report = {"checkpoint": "run/checkpoints/last.ckpt", "num_samples": 1, "results": {"ema": {}}, "skipped": {},
              "sampling": {"sampler": "euler", "steps": 2, "cfg": 4.0, "shift": 1.0},
              "throughput": {"perf/pad_fraction": {"mean": 0.04, "last": 0.04, "count": 2}}}
    markdown = markdown_report(report)
    assert "Training throughput" in markdown and "| pad fraction (batch slots without a clip) | 0.04 | 0.04 | 2 |" in markdown


def test_training_logs_the_planned_pad_fraction_end_to_end(tmp_path_factory, tmp_path):
    """train.py with packing: run.py gives the loader the DiT's clip costs, each batch carries its
    step's plan figures, Throughput logs them and evaluate's summary reads them back. Demo clips
    are 80 tokens: three fill 240 of a 250-token pack."""
    world = tiny_run(tmp_path_factory)
    train(compose_train("+experiment=demo", f"data.shards={world['shards']}/train-*.tar", "data.val_shards=null",
                        "data.num_workers=0", "num_threads=1", *TINY_DIT, f"vae.path={world['vae']}",
                        "+data.packing={enabled: true, max_tokens: 250}", "trainer.max_steps=3",
                        "eval.throughput.log_every_n_steps=1", f"run_dir={tmp_path}", "trainer.enable_model_summary=false"))
    summary = throughput_summary(tmp_path / "metrics.csv")
    assert summary["perf/pad_fraction"]["mean"] == pytest.approx(10 / 250) and summary["perf/pad_fraction"]["count"] >= 2
    assert summary["perf/rank_imbalance"]["mean"] == 0.0  # one process


def test_clip_cost_is_a_frozen_record():
    cost = ClipCost(10, 1.0, 2.0)
    assert cost.flops == 3.0
    with pytest.raises(AttributeError):
        cost.tokens = 3  # the loader's workers share the table: it must not change under them


def test_preflight_prints_the_clip_costs_balance_plans_with(capsys):
    preflight_main(["+experiment=dit_256", "data=webvid_256_buckets", "--bucket", "33x256x256"])
    out = capsys.readouterr().out.split("clip cost")[1]
    dit_1b = build_dit_config(OmegaConf.load(ROOT / "conf" / "model" / "dit_1b.yaml"), 16, 4096)
    c = CostModel(dit_1b, latent_shape, 226)(33, 256, 256)  # dit_256: 16 latent channels, T5-XXL (226 tokens)
    assert f"33x256x256: 2304 tokens, linear {c.linear / 1e12:.2f} + attention {c.attention / 1e12:.2f}" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("    ")]
    assert len(rows) == 7  # one per bucket of webvid_256_buckets
    ratio = {row[0]: float(row[-1].rstrip("x")) for row in rows}
    assert ratio["1x256x256"] > 3 * ratio["33x256x256"]  # 132 images hold 3.7x the tokens of 4 clips
