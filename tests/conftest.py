"""Shared fixtures. Every server a test starts binds to 127.0.0.1 and is stopped by its PID."""

import os

import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
torch.set_num_threads(2)

pytest_plugins = ["fixtures_s3"]  # s3_server / s3_env: a real S3 server (weed mini) on 127.0.0.1
