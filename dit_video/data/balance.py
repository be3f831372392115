"""Rank-balanced steps (data.balance): every rank's batch in a training step costs about the same.

With buckets or packing the W batches of one step (one per rank) differ in shape, and a DiT's
cost is not proportional to its tokens: attention grows with the square of a clip's tokens. A
step lasts as long as its most expensive rank; the others wait at the gradient all-reduce.

Cost of a clip (CostModel): the DiT's training FLOPs (dit_video.model.flops.dit_flops: forward +
backward, recompute excluded) for the latents of its (frames, height, width) after the VAE and
the DiT's patching, split into linear layers and attention products. A batch costs the sum of
its clips: a bucket batch is B clips of one shape, and a pack's attention is block-diagonal, so
its clips do not interact.

The balanced order, a pure function of the units' costs and the world size W (balanced_order):

    the epoch's units (order.py's global batches or packing.py's packs; in order.py's order,
    unit u is read at step u // W by rank u mod W)
      --drop the last (n mod W): the same epoch tail order.py skips-->
      --cost classes: costs within COST_TOLERANCE of each other-->
      --class k takes n_k // W whole steps, the steps that already hold most of its units;
        its units already there stay, its others fill the free ranks in epoch order-->
      --the n_k mod W units left of each class, sorted by cost, fill the remaining (mixed) steps

So most units keep their step and rank (docs/performance.md: 30-80% move on a realistic mix, where
sorting the epoch by cost would move all), steps keep their place in the epoch, and shapes still
alternate over it. When every unit costs the same (one bucket) or W = 1, the order is exactly
order.py's, so the demo (one bucket, one process) trains bit for bit as without balancing. An
uninterrupted epoch trains exactly the samples order.py's plan trains; only who shares a step changes.

World-size changes (segment_order): the order depends on W, so the loader position carries the
epoch's history, `segments` = ((W_1, k_1), ..., (W_m, k_m)): k_i steps read at world size W_i, after
a prefix of `prefix` units read in order.py's order (a run that began without balancing). Replaying
the history gives the units already consumed; a new world size re-plans only the rest. No unit is
repeated or dropped except the tail of fewer than W units the epoch ends with, as in order.py.

Step statistics (step_balance): rank imbalance = max over ranks of the step's cost / mean - 1, and
pad fraction = token slots of the step's batches that hold no clip (a pack short of max_tokens;
bucket batches are always full) / all slots. Every rank computes both for every step from the
plan alone: no collective.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from dit_video.data.buckets import Bucket
from dit_video.model.config import DiTConfig
from dit_video.model.flops import dit_flops

LatentShape = Callable[[int, int, int], Sequence[int]]  # (num_frames, height, width) in pixels -> (T', H', W')
# Units whose costs differ by less than this share a class (balanced_order): a step of one class
# leaves each rank idle for at most this share of it.
COST_TOLERANCE = 0.005


@dataclass(frozen=True)
class ClipCost:
    """What one clip costs the DiT per training step."""

    tokens: int  # video tokens after the VAE and patching
    linear: float  # training FLOPs of the matmuls (grow linearly with tokens; per-sample terms included)
    attention: float  # training FLOPs of the attention products q k^T and p v (self-attention: tokens^2)

    @property
    def flops(self) -> float:
        return self.linear + self.attention


def clip_cost(cfg: DiTConfig, latent_shape: Sequence[int], text_len: int) -> ClipCost:
    """ClipCost of one sample with latents (T', H', W') and `text_len` text tokens.

    Attention products have an input gradient on both sides, so their backward is 2x forward and
    their training FLOPs are 3x forward; every other matmul is the linear part."""
    fc = dit_flops(cfg, tuple(latent_shape), text_len)
    attention = 3 * fc.attention
    return ClipCost(math.prod(cfg.grid(tuple(latent_shape))), float(fc.training - attention), float(attention))


class CostModel:
    """(num_frames, height, width) of a clip in pixels -> ClipCost, through the VAE's latent shape.

    latent_shape: the VAE's (e.g. CausalVAE.latent_shape); text_len: padded text tokens (the text
    encoder's max_length). Costs are cached per shape."""

    def __init__(self, cfg: DiTConfig, latent_shape: LatentShape, text_len: int):
        self.cfg, self.latent_shape, self.text_len = cfg, latent_shape, int(text_len)
        self._cache: dict[tuple[int, int, int], ClipCost] = {}

    def __call__(self, num_frames: int, height: int, width: int) -> ClipCost:
        shape = (int(num_frames), int(height), int(width))
        if shape not in self._cache:
            self._cache[shape] = clip_cost(self.cfg, self.latent_shape(*shape), self.text_len)
        return self._cache[shape]


ClipCosts = Callable[[int, int, int], ClipCost]  # (num_frames, height, width) -> ClipCost, e.g. a CostModel


def cost_table(cost: ClipCosts, buckets: Sequence[Bucket | None]) -> dict[tuple[int, int, int], ClipCost]:
    """{(T, H, W): ClipCost} for every bucket shape (None entries skipped): plain data that travels
    to DataLoader workers."""
    return {(b.num_frames, b.height, b.width): cost(b.num_frames, b.height, b.width) for b in buckets if b is not None}


@dataclass
class UnitCosts:
    """Per unit (global batch or pack) of an epoch: what it costs and how full it is."""

    flops: np.ndarray  # float64 [n] training FLOPs of the unit's clips
    tokens: np.ndarray  # int64 [n] video tokens of its clips
    slots: np.ndarray  # int64 [n] video tokens its shape holds (bucket: batch_size clips; pack: max_tokens)


def unit_costs(plan: Sequence[np.ndarray], shapes: Sequence[Bucket | None], bucket_of: np.ndarray,
               buckets: Sequence[Bucket], costs: dict[tuple[int, int, int], ClipCost],
               max_tokens: int | None = None) -> UnitCosts:
    """UnitCosts of an epoch's units. shapes[g]: the Bucket unit g is read at (all its clips in
    that shape), or None for a pack (each clip at its own bucket's shape, slots = max_tokens)."""
    n = len(plan)
    flops, tokens, slots = np.zeros(n), np.zeros(n, np.int64), np.zeros(n, np.int64)
    per_bucket = [costs[(b.num_frames, b.height, b.width)] for b in buckets]
    bucket_flops = np.array([c.flops for c in per_bucket])  # [K]
    bucket_tokens = np.array([c.tokens for c in per_bucket], dtype=np.int64)  # [K]
    packs = [g for g, shape in enumerate(shapes) if shape is None]
    if packs:
        if max_tokens is None:
            raise ValueError("unit_costs: packs need max_tokens (their token slots)")
        members = [np.asarray(plan[g], dtype=np.int64) for g in packs]
        starts = np.cumsum([0] + [len(m) for m in members[:-1]])  # [P]
        clips = bucket_of[np.concatenate(members)]  # [sum of pack sizes] bucket per clip
        flops[packs] = np.add.reduceat(bucket_flops[clips], starts)
        tokens[packs] = np.add.reduceat(bucket_tokens[clips], starts)
        slots[packs] = int(max_tokens)
    for g, shape in enumerate(shapes):
        if shape is not None:
            c = costs[(shape.num_frames, shape.height, shape.width)]
            flops[g], tokens[g], slots[g] = len(plan[g]) * c.flops, len(plan[g]) * c.tokens, shape.batch_size * c.tokens
    return UnitCosts(flops, tokens, slots)


def cost_classes(flops: np.ndarray, tolerance: float = COST_TOLERANCE) -> np.ndarray:
    """int64 [n] class of each unit: walking the costs upwards, a class starts at the first cost more
    than (1 + tolerance) x the class's cheapest, so a class's costs are within `tolerance`."""
    values, inverse = np.unique(flops, return_inverse=True)  # [V] sorted distinct costs
    of_value = np.empty(len(values), dtype=np.int64)
    k, floor = -1, -math.inf
    for v, cost in enumerate(values.tolist()):
        if cost > floor * (1.0 + tolerance) or k < 0:
            k, floor = k + 1, cost
        of_value[v] = k
    return of_value[inverse.reshape(-1)]


def _step_classes(step_of: np.ndarray, klass: np.ndarray, num_steps: int, world_size: int) -> np.ndarray:
    """int64 [S] class of each step, -1 = a mixed step. Class k gets (its units // W) steps: first the
    steps already holding most of its units (greedy, most units first, earlier steps first), then
    free steps in order."""
    num_classes = int(klass.max()) + 1
    pairs, count = np.unique(step_of * num_classes + klass, return_counts=True)  # (step, class) -> units
    steps, classes = pairs // num_classes, pairs % num_classes
    quota = np.bincount(klass, minlength=num_classes) // world_size  # [K] full steps per class
    step_class = np.full(num_steps, -1, dtype=np.int64)
    unassigned = int(quota.sum())
    for j in np.lexsort((steps, -count)).tolist():
        if unassigned == 0:
            break
        if step_class[steps[j]] < 0 and quota[classes[j]] > 0:
            step_class[steps[j]] = classes[j]
            quota[classes[j]] -= 1
            unassigned -= 1
    rest = np.repeat(np.arange(num_classes), quota)  # quota no step with the class's units took
    step_class[np.flatnonzero(step_class < 0)[:len(rest)]] = rest
    return step_class


def balanced_order(flops: np.ndarray, world_size: int, tolerance: float = COST_TOLERANCE) -> np.ndarray:
    """Indices into `flops` (units in epoch order), step-major: entries [s W, (s+1) W) are step s.

    Unit u sits at step u // W, rank u mod W in order.py's order. The last (n mod W) units are left
    out (the epoch tail). Units are grouped into cost classes (cost_classes); class k fills
    (n_k // W) whole steps, chosen among the steps that already hold most of its units, and its
    units already there keep their place. Each class's other n_k mod W units fill the remaining
    (mixed) steps, sorted by cost, so a mixed step holds units of neighbouring classes."""
    W = world_size
    n = len(flops) - len(flops) % W
    num_steps = n // W
    units = np.arange(n)  # [n]
    if num_steps == 0:
        return units
    klass = cost_classes(np.asarray(flops[:n], dtype=np.float64), tolerance)  # [n]
    step_class = _step_classes(units // W, klass, num_steps, W)  # [S]
    out = np.full((num_steps, W), -1, dtype=np.int64)  # [S, W] unit per (step, rank)
    stay = step_class[units // W] == klass  # [n] already in a step of its class: keeps (step, rank)
    out[units[stay] // W, units[stay] % W] = units[stay]
    in_mixed = step_class[units // W] < 0  # [n]
    num_classes = int(klass.max()) + 1
    by_class = np.argsort(klass, kind="stable")  # [n] units grouped by class, in epoch order within one
    class_start = np.searchsorted(klass[by_class], np.arange(num_classes + 1))  # [K + 1]
    free = np.flatnonzero(out.reshape(-1) < 0)  # flat (step, rank) slots left, in order
    free = free[np.argsort(step_class[free // W], kind="stable")]  # grouped by their step's class (-1 first)
    free_start = np.searchsorted(step_class[free // W], np.arange(num_classes + 1))  # [K + 1]
    leftovers = []
    for k in range(num_classes):
        members = by_class[class_start[k]:class_start[k + 1]]
        pool = members[~stay[members]]  # [p] class k's units not yet placed, in epoch order
        slots = free[free_start[k]:free_start[k + 1]]  # [f] free slots of class k's steps, f <= p
        # the n_k mod W units for the mixed steps: those already in one (they may keep their place), then the last
        spare = np.concatenate([pool[in_mixed[pool]], pool[~in_mixed[pool]][::-1]])[:len(pool) - len(slots)]
        out.reshape(-1)[slots] = np.setdiff1d(pool, spare)  # [f] sorted: epoch order
        leftovers.append(spare)
    mixed = np.flatnonzero(step_class < 0)  # [M]
    if len(mixed):
        spare = np.concatenate(leftovers)
        chunks = spare[np.argsort(flops[spare], kind="stable")].reshape(len(mixed), W)  # [M, W] by cost
        for step, chunk in zip(mixed.tolist(), chunks[np.argsort(chunks.min(axis=1), kind="stable")], strict=True):
            here = chunk // W == step  # units of this step keep their rank
            out[step, chunk[here] % W] = chunk[here]
            out[step, out[step] < 0] = np.sort(chunk[~here])
    return out.reshape(-1)  # [S * W]


Segments = tuple[tuple[int, int], ...]  # ((world size, steps read), ...) of one epoch, in order


def segment_order(flops: np.ndarray, prefix: int, segments: Segments, world_size: int) -> tuple[np.ndarray, int, Segments]:
    """The units world size `world_size` reads in the rest of an epoch, given what was read before.

    flops [n]: unit costs in epoch order; prefix: units read in epoch order before any balanced
    step; segments: the balanced steps read since ((W_i, k_i), ...). Returns (order, done, past):
    order = unit indices of the current segment, step-major (balanced_order of the units not yet
    read); done = its steps already read (> 0 when the last segment had this world size: a resume);
    past = the segments before the current one."""
    n = len(flops)
    if not 0 <= prefix <= n:
        raise ValueError(f"data loader state: {prefix} batches read in order, but the epoch has {n}")
    remaining = np.arange(prefix, n)  # [m] unread units, in epoch order
    past = tuple((int(w), int(k)) for w, k in segments)
    done = 0
    if past and past[-1][0] == world_size:  # the same world size as when the state was saved: carry on
        past, done = past[:-1], past[-1][1]
    for w, k in past:
        order = remaining[balanced_order(flops[remaining], w)]
        if k * w > len(order):
            raise ValueError(f"data loader state: {k} steps of {w} ranks read, but that segment has {len(order) // w}")
        remaining = remaining[~np.isin(remaining, order[: k * w])]
    order = remaining[balanced_order(flops[remaining], world_size)]
    if done * world_size > len(order):
        raise ValueError(f"data loader state: {done} steps of {world_size} ranks read, but the epoch has {len(order) // world_size}")
    return order, done, past


def step_balance(units: UnitCosts, step: np.ndarray) -> tuple[float, float]:
    """(rank imbalance, pad fraction) of one step: `step` = the W unit indices its ranks read."""
    flops = units.flops[step]  # [W]
    mean = flops.mean()
    imbalance = float(flops.max() / mean - 1.0) if mean > 0 else 0.0
    slots = units.slots[step].sum()
    pad = float(1.0 - units.tokens[step].sum() / slots) if slots > 0 else 0.0
    return imbalance, pad


Position = tuple  # (epoch, batches_into_epoch) or (epoch, batches_into_epoch, segments)


def loader_position(position: Sequence) -> Position:
    """A loader position with plain ints: (epoch, batches_into_epoch[, segments]); `segments` (the
    balanced history, Segments) is kept only when not empty."""
    epoch, read = int(position[0]), int(position[1])
    segments = tuple((int(w), int(k)) for w, k in (position[2] if len(position) > 2 else ()))
    return (epoch, read, segments) if segments else (epoch, read)


@dataclass
class EpochReading:
    """Which unit each training index of one epoch reads, from a loader position on.

    Index i of the epoch is read by step (i - start) // W, rank i mod W of this run (order.train_steps).
    """

    order: np.ndarray | None  # [S * W] unit per index, step-major; None: index i is unit i (order.py)
    start: int  # the first unread index
    length: int  # indices in the epoch
    before: int  # units read before index 0 of `order` (prefix and past segments)
    past: Segments | None  # balanced segments before the current one; None = not balancing
    world_size: int
    units: UnitCosts | None  # None: no cost model (no step statistics)

    def unit(self, index: int) -> int:
        return index if self.order is None else int(self.order[index])

    def position(self, epoch: int, after: int) -> Position:
        """The loader position once every index before `after` (a step boundary) is read."""
        if self.past is None:
            return (epoch, after)
        return loader_position((epoch, self.before + after, self.past + ((self.world_size, after // self.world_size),)))

    def step_stats(self, index: int, rank: int) -> dict[str, float]:
        """{"rank_imbalance", "pad_fraction"} of the step whose rank `rank` reads `index` ({} without costs)."""
        if self.units is None:
            return {}
        step = np.arange(index - rank, index - rank + self.world_size)  # [W] indices of the step
        imbalance, pad = step_balance(self.units, step if self.order is None else self.order[step])
        return {"rank_imbalance": imbalance, "pad_fraction": pad}


def read_epoch(plan: Sequence[np.ndarray], shapes: Sequence[Bucket | None], bucket_of: np.ndarray,
               buckets: Sequence[Bucket], position: Position, world_size: int, balance: bool,
               costs: dict[tuple[int, int, int], ClipCost] | None, max_tokens: int | None = None) -> EpochReading:
    """The EpochReading of an epoch's units (plan, shapes: PlannedShardDataset.epoch_plan_shapes) from
    `position` on. Balancing needs `costs` (cost_table) unless every unit costs the same (one shape,
    no packs) or one process reads an epoch without a balanced history: then the balanced order is
    order.py's for every world size and resume point, and the position stays order.py's too."""
    _, read, *rest = position
    segments: Segments = tuple(rest[0]) if rest else ()
    units = unit_costs(plan, shapes, bucket_of, buckets, costs, max_tokens) if costs is not None else None
    one_shape = None not in shapes and len({(s.num_frames, s.height, s.width, s.batch_size) for s in shapes}) <= 1
    uniform = one_shape if units is None else bool(np.all(units.flops == units.flops[:1]))
    if not balance or (not segments and (uniform or world_size == 1)):
        return EpochReading(None, read, len(plan), 0, None, world_size, units)
    if units is None and not one_shape:
        raise ValueError(
            "data.balance: balancing batches of several shapes over several processes needs the DiT's cost per "
            "clip; train through dit_video.run (task=dit), set VideoDataModule.clip_cost, or set data.balance=false"
        )
    flops = units.flops if units is not None else np.zeros(len(plan))
    prefix = read - sum(w * k for w, k in segments)
    order, done, past = segment_order(flops, prefix, segments, world_size)
    before = prefix + sum(w * k for w, k in past)
    return EpochReading(order, done * world_size, len(order), before, past, world_size, units)
