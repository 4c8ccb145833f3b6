"""Which records one reader (a DataLoader worker of one rank) reads in an epoch: its shards or record ranges.

Pure functions of the dataset's fields, the worker and the epoch, so every rank computes the same plan
without talking to the others: resampled shards (with replacement, per reader), exact epochs (contiguous
shares of whole batches, `exact_share`), or a single shuffled pass split by rank then worker.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from digan.data.loader import ClipStream


def seed_of(*parts: int) -> int:
    """A seed from integers (seed, rank, worker, epoch, purpose), the same in every process."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def shard_urls(ds: "ClipStream", worker: int, num_workers: int, epoch: int):
    """[{url}] (or [{url, lo, hi}] record ranges, exact epochs) this reader reads, in order."""
    if ds.resampled:
        # With replacement, independently per reader: no reader runs dry, every rank runs the same steps.
        rng = random.Random(seed_of(ds.seed, ds.rank, worker, epoch, 0))
        while True:
            yield {"url": rng.choice(ds.shards)}
    if ds.shard_clips is not None:  # exact epochs: this reader's contiguous share of the epoch's clips
        yield from exact_share(ds, worker, num_workers, epoch)[0]
        return
    order = list(ds.shards)
    random.Random(seed_of(ds.seed, epoch, 1)).shuffle(order)  # same permutation on every rank
    # split_by_node then split_by_worker, driven by the explicit rank/world size (not env vars)
    for url in order[ds.rank::ds.world_size][worker::num_workers]:
        yield {"url": url}


def exact_share(ds: "ClipStream", worker: int, num_workers: int, epoch: int) -> tuple[list[dict], int]:
    """Exact epochs: ([{url, lo, hi}] record ranges of this reader's share, its number of batches).

    The epoch's clips in a seeded shard order (the same on every rank) are cut into S = floor(N / G)
    global batches' worth (G = the global batch); rank r takes the S x B_r clips after the S x (B_0 + ...
    + B_{r-1}) of the ranks before it (B_r: its share of a global batch), its workers contiguous runs of
    whole batches of those. The N - S*G clips at the end of the order sit this epoch out.
    """
    order = list(range(len(ds.shards)))
    random.Random(seed_of(ds.seed, epoch, 1)).shuffle(order)
    steps, b = ds.steps_per_epoch(), ds.batch_size
    base, extra = divmod(steps, num_workers)
    first = worker * base + min(worker, extra)
    mine = base + (worker < extra)
    start = steps * ds.batch_start + first * b  # ranks before this one took steps x their shares
    end = start + mine * b
    ranges, pos = [], 0
    for i in order:
        n = ds.shard_clips[i]
        lo, hi = max(start - pos, 0), min(end - pos, n)
        if lo < hi:
            ranges.append({"url": ds.shards[i], "lo": lo, "hi": hi})
        pos += n
    return ranges, mine
