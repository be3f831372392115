"""The sample order: a pure function of (seed, epoch, world size, rank, worker) and the resume point.

One epoch is a list of *global batches*, fixed by (seed, epoch) alone and independent of how
many processes read it:

    samples --(group by bucket)--> per-bucket permutation (seed, epoch, bucket)
            --(chunk by the bucket's batch size; drop each bucket's incomplete tail)-->
            batches --(permutation (seed, epoch))--> global batches g = 0, 1, 2, ...

Training step s of rank r (world size W) reads global batch `start + s * W + r`, where `start` is
where this run entered the epoch (0, or the resume point). Inside a rank, DataLoader worker w
produces the steps s = w, w + N, w + 2N, ... and the DataLoader returns them in step order, so
the batches a rank sees do not depend on the worker count either.

After step s every rank has consumed global batches [0, start + (s + 1) * W): that number is the
whole loader state (`batches_into_epoch`). Resuming with another world size W' continues at the
same global batch, so no batch of the epoch is repeated or dropped, except the epoch tail:
the last (remaining mod W) global batches are skipped so that every rank does the same number
of steps (an uninterrupted run at that world size skips the same ones).

With data.balance (balance.py, on by default) the same global batches are regrouped into steps of
about the same DiT cost for the run's world size; with one bucket or one process that is this order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np


def epoch_batches(bucket_of: np.ndarray, batch_sizes: Sequence[int], seed: int, epoch: int,
                  shuffle: bool = True, drop_last: bool = True) -> list[np.ndarray]:
    """Global batches of one epoch: a list of int64 arrays of sample indices, one bucket each.

    bucket_of: int [N] bucket id per sample (-1 = unused). shuffle=False keeps index order (and
    bucket order) for validation; drop_last=False keeps each bucket's incomplete last batch.
    """
    batches: list[np.ndarray] = []
    for bucket, size in enumerate(batch_sizes):
        members = np.flatnonzero(bucket_of == bucket)  # [n_b] in index order
        if shuffle:
            members = np.random.default_rng([seed, epoch, 1, bucket]).permutation(members)
        stop = len(members) - len(members) % size if drop_last else len(members)
        batches.extend(members[i:i + size] for i in range(0, stop, size))
    if shuffle and batches:
        order = np.random.default_rng([seed, epoch, 2]).permutation(len(batches))
        batches = [batches[i] for i in order]
    return batches


def train_steps(num_batches: int, start: int, world_size: int, rank: int, num_workers: int,
                worker: int, steps_before: int = 0) -> Iterator[tuple[int, int, int]]:
    """(step, global batch index, batches_into_epoch after this step) for one training reader.

    `step` counts from the resume point; the third value is what the loader state records once
    the step's batch is consumed. `steps_before` = steps this reader's iterator made in earlier
    epochs: the DataLoader keeps taking workers in turn across the epoch boundary, so the turn
    continues from there rather than restarting at worker 0.
    """
    steps = max(0, num_batches - start) // world_size
    for step in range((worker - steps_before) % num_workers, steps, num_workers):
        yield step, start + step * world_size + rank, start + (step + 1) * world_size


def steps_per_rank(num_batches: int, start: int, world_size: int) -> int:
    """Training steps each rank makes in the rest of an epoch entered at `start`."""
    return max(0, num_batches - start) // world_size


def eval_steps(num_batches: int, world_size: int, rank: int, num_workers: int, worker: int) -> Iterator[int]:
    """Global batch indices of one validation reader: batch g goes to rank g mod W (no drops)."""
    mine = range(rank, num_batches, world_size)
    yield from (mine[s] for s in range(worker, len(mine), num_workers))


def mix_image_batches(batches: Sequence[np.ndarray], bucket_of: np.ndarray, image_batch_sizes: Sequence[int],
                      image_ratio: float, seed: int, epoch: int) -> tuple[list[np.ndarray], list[int]]:
    """Joint image+video training: add image batches to an epoch's clip batches.

    batches: the epoch's global batches (epoch_batches); image_batch_sizes[b]: images per image
    batch made from bucket b's samples (0 = none). Returns (batches, bucket id per batch), where
    an image batch of bucket b has id len(image_batch_sizes) + b (the loader reads one frame of
    each of its clips). For a bucket with n clip batches, n * r / (1 - r) image batches are added
    (stochastically rounded per epoch), so a fraction r = image_ratio of all batches are images on
    average; their samples come from fresh permutations of the bucket, then clip and image
    batches are shuffled together. Like epoch_batches, a pure function of (seed, epoch).
    """
    num_buckets = len(image_batch_sizes)
    ids = [int(bucket_of[b[0]]) for b in batches]
    if image_ratio <= 0:
        return list(batches), ids
    rounding = np.random.default_rng([seed, epoch, 4])
    images: list[np.ndarray] = []
    image_ids: list[int] = []
    for bucket, size in enumerate(image_batch_sizes):
        members = np.flatnonzero(bucket_of == bucket)  # [n_b]
        want = ids.count(bucket) * image_ratio / (1.0 - image_ratio)
        count = int(want) + int(rounding.random() < want - int(want))  # one draw per bucket, used or not
        if size == 0 or count == 0 or len(members) == 0:
            continue
        draw = np.random.default_rng([seed, epoch, 5, bucket])
        laps = -(-count * size // len(members))  # permutations needed to fill `count` batches
        pool = np.concatenate([draw.permutation(members) for _ in range(laps)])  # [laps * n_b]
        images.extend(pool[i * size:(i + 1) * size] for i in range(count))
        image_ids.extend([num_buckets + bucket] * count)
    mixed, mixed_ids = list(batches) + images, ids + image_ids
    order = np.random.default_rng([seed, epoch, 6]).permutation(len(mixed))
    return [mixed[i] for i in order], [mixed_ids[i] for i in order]
