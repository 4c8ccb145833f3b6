"""compute_metrics spread over 2 ranks (torch.distributed gloo on 127.0.0.1, two real processes) gives the
single-process numbers, and a rank that lost its real-feature cache does not deadlock the other."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from digan.config import load_config
from digan.metrics import compute_metrics
from digan.metrics import compute as compute_mod
from digan.models import build_generator

from test_metrics_compute import batches, real_windows

N = 8
NAMES = ["fvd16", "kvd16", "fid"]


def _generator():
    torch.manual_seed(0)
    return build_generator(load_config("demo-32").model).eval()


def _worker(rank: int, world: int, port: int, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        G, real = _generator(), real_windows()[:N]
        mine = real[rank::world]  # each rank reads its own share of the real clips
        kw = dict(detector="proxy", seed=5, dataset_key="bikes@32", rank=rank, world_size=world)
        first = compute_metrics(G, batches(mine, 2), NAMES, N, **kw)
        if rank == 1:
            compute_mod._REAL_CACHE.clear()  # rank 1 restarted: only rank 0 still has the features
        second = compute_metrics(G, batches(mine, 2), NAMES, N, **kw)
        queue.put((rank, first, second))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_match_one_process():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_worker, args=(2, port, queue), nprocs=2, join=True, start_method="spawn")
    results = dict((r, (a, b)) for r, a, b in (queue.get(timeout=60) for _ in range(2)))
    single = compute_metrics(_generator(), batches(real_windows()[:N], 4), NAMES, N, detector="proxy", seed=5)
    for rank in (0, 1):
        first, second = results[rank]
        assert set(first) == {"proxy_fvd16", "proxy_kvd16", "proxy_fid"}
        assert first == pytest.approx(single, rel=1e-4)  # float32 batching only
        assert second == pytest.approx(first, rel=1e-6)
