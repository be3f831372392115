"""Run a function on WORLD spawned CPU processes (gloo tests) and collect what each rank reports."""

from __future__ import annotations

import torch.multiprocessing as mp


def spawn_ranks(target, store: str, world: int, timeout: float = 120.0) -> dict:
    """Start target(rank, store, queue) on `world` spawned processes, wait, and return
    {rank: result} from the (rank, result) pairs they put on the queue. A hung rank is killed and
    fails the test; a rank whose assertion fails exits non-zero, which fails it too."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, store, queue)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "a rank hung"
    assert [p.exitcode for p in procs] == [0] * world, "a rank failed (its traceback is in the captured stderr)"
    return dict(queue.get(timeout=5) for _ in range(world))
