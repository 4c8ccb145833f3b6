"""Rank helpers, cross-rank reductions, seeding and RNG state for the training workers.

Everything here works with or without an initialised `torch.distributed` process group (rank 0 of a
world of 1 otherwise), so the same code runs in one process and under Ray Train. No Ray or DeepSpeed
imports: the worker passes in what it got from them.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def comm_device() -> torch.device:
    """The device collectives run on: CUDA for NCCL, CPU for gloo."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def batch_slice(batch: int, world: int, rank: int, unit: int = 1) -> tuple[int, int]:
    """(first global sample index, number of samples) of `rank`'s share of a global batch of `batch`.

    Even shares when `world` divides `batch` into whole `unit`s (D's minibatch-stddev group); otherwise, as an
    elastic group of any size may need, shares of whole units that differ by at most one unit, the first ranks
    taking the larger ones (so no rank's D sees a partial group); even shares smaller than a unit when the batch
    has fewer units than ranks. Ranks weight their losses by share * world / batch so that the averaged
    gradient is still the global batch's mean (`share_weight`).
    """
    even = batch % world == 0
    if even and ((batch // world) % unit == 0 or batch // unit < world):
        size = batch // world
        return rank * size, size
    if batch % unit or batch // unit < world:
        raise ValueError(f"a batch of {batch} cannot be shared by {world} ranks in groups of {unit}")
    base, extra = divmod(batch // unit, world)
    start = (rank * base + min(rank, extra)) * unit
    return start, (base + (rank < extra)) * unit


def share_weight(size: int, batch: int, world: int) -> float:
    """The factor on a rank's mean loss that makes the mean over ranks the mean over the global batch."""
    return size * world / batch


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def dist_mean(values: dict[str, float]) -> dict[str, float]:
    """Mean of each value over the ranks, in ONE all-reduce (every rank must pass the same keys).

    Keys are sorted so that the tensor layout agrees across ranks whatever the insertion order.
    """
    if world_size() == 1 or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t /= world_size()
    return dict(zip(keys, t.tolist()))


def dist_sum(values: dict[str, float]) -> dict[str, float]:
    """Sum of each value over the ranks, in one all-reduce (same keys on every rank)."""
    if world_size() == 1 or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, t.tolist()))


def any_rank(*flags: bool) -> tuple[bool, ...]:
    """Each flag true on every rank if it is true on any rank (one MAX all-reduce), so all ranks branch alike."""
    if world_size() == 1:
        return tuple(bool(f) for f in flags)
    t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32, device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in t.tolist())


# ----------------------------------------------------------------------------------------------------
# Seeding and RNG state. Each rank gets its own stream derived from the global seed, so two ranks never
# draw the same z; the states go into the checkpoint so a resumed run continues the same streams.


def seed_for_rank(seed: int, rank: int) -> int:
    """A per-rank seed that differs between ranks and between global seeds (fits in 63 bits)."""
    return (seed * 1_000_003 + rank * 7919 + 12345) % (2**63 - 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) RNG states as tensors and plain types (weights_only-loadable)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
