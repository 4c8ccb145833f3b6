"""Shared fixtures. Every server a test starts binds to 127.0.0.1 and is stopped by its PID."""

import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
torch.set_num_threads(2)

pytest_plugins = ["fixtures_s3"]  # s3_server / s3_env: a real S3 server (weed mini) on 127.0.0.1


@pytest.fixture
def one_thread():
    """Tiny nets: one intra-op thread. With 2 threads on a contended 2-core machine, OpenMP's spinning
    workers made these steps 10-20x slower (measured), and a single thread is as fast when idle."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
