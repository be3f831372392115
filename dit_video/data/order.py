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
