"""Shared fixtures. Every server a test starts binds to 127.0.0.1 and is stopped by its PID."""

import os

import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
torch.set_num_threads(2)
