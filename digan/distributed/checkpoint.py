"""Training checkpoints: layout, atomic writes, the completion marker, find-latest and storage access.

One checkpoint is a folder `step-XXXXXXXX/` under the run folder `{storage_path}/{run_name}/`:

    G/state/...                 DeepSpeed state of G (weights, Adam, ZeRO shards of every rank)
    D/state/...                 DeepSpeed state of the D_I + D_M engine
    train_state.pt              rank 0: step, cur_nimg, kimg, G_ema, config dict, resume history
    rank_state_00000.pt ...     one per rank: data-loader position and RNG states of that rank
    generator.pt                the export read by digan.generate ({config, G_ema, step, kimg}); written LAST

How a half-written checkpoint never becomes "the latest":
  1. every rank writes its part into a local temp folder (files themselves via temp + rename), and only
     then hands the folder to Ray (`ray.train.report`), which copies it to storage;
  2. Ray registers the checkpoint (the one `ray.train.get_checkpoint()` returns on resume) only once
     every rank's copy has finished;
  3. after a barrier that follows the report on every rank, and once Ray confirms the registration
     (`get_all_reported_checkpoints(COMMITTED)`), rank 0 writes `generator.pt` into the stored folder
     (temp + rename on a local disk; a single object PUT on S3, which appears atomically). A
     folder holding `generator.pt` is therefore complete, and `find_latest` (like
     `digan.models.find_generator_file`) only considers such folders.
Keeping the last K is Ray's `CheckpointConfig(num_to_keep=K)`, which deletes whole folders.

Everything here is plain files + pyarrow filesystems (local or S3); no Ray or DeepSpeed imports.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from typing import Any

import torch

from digan.storage import atomic_write

CHECKPOINT_RE = re.compile(r"^step-(\d{8})$")
TRAIN_STATE_FILE = "train_state.pt"
GENERATOR_FILE = "generator.pt"  # same name as digan.models.GENERATOR_FILE
G_DIR, D_DIR = "G", "D"
FULL_OPTIMIZER_FILE = "optimizer_full.pt"  # ZeRO-1/2: the whole optimizer state, for another worker count
DS_TAG = "state"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def rank_state_file(rank: int) -> str:
    return f"rank_state_{rank:05d}.pt"


def parse_step(name: str) -> int | None:
    m = CHECKPOINT_RE.match(name)
    return int(m.group(1)) if m else None


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save that publishes `path` only once it is complete (`digan.storage.atomic_write`)."""
    with atomic_write(path) as f:
        torch.save(obj, f)


def load_weights_only(path: str | os.PathLike) -> Any:
    """Every file we write loads with weights_only=True (plain tensors and Python types only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------------------------------
# Listing a run's checkpoints on a pyarrow filesystem (`digan.storage.arrow_filesystem`).


def list_checkpoints(fs, run_fs_path: str, complete_only: bool = True) -> list[tuple[int, str]]:
    """[(step, fs path)] of the checkpoints in a run folder, oldest first (complete ones unless told)."""
    import pyarrow.fs as pafs

    info = fs.get_file_info(run_fs_path)
    if info.type != pafs.FileType.Directory:
        return []
    out = []
    for entry in fs.get_file_info(pafs.FileSelector(run_fs_path)):
        step = parse_step(entry.base_name)
        if step is None or entry.type != pafs.FileType.Directory:
            continue
        if complete_only and fs.get_file_info(f"{entry.path}/{GENERATOR_FILE}").type != pafs.FileType.File:
            continue
        out.append((step, entry.path))
    return sorted(out)


class ResumeError(ValueError):
    """A checkpoint that cannot be resumed with the current settings (the message says what to change)."""


def check_resumable(saved_config: dict, zero_stage: int, world_size: int, directory: str | None = None) -> int:
    """The checkpoint's worker count, after checking that it can resume on `world_size` workers (else one line).

    ZeRO-0 checkpoints hold the whole state and resume on any number of workers. ZeRO-1/2 partition Adam's
    state over the data-parallel ranks and DeepSpeed cannot repartition it, so their checkpoints also carry
    the whole optimizer state (FULL_OPTIMIZER_FILE), which resumes them on another count at the same stage.
    """
    saved = saved_config.get("dist", {})
    saved_workers, saved_stage = int(saved.get("num_workers", world_size)), int(saved.get("zero_stage", 0))
    if world_size == saved_workers or max(saved_stage, zero_stage) == 0:
        return saved_workers
    full = directory is not None and all(os.path.exists(os.path.join(directory, d, FULL_OPTIMIZER_FILE))
                                         for d in (G_DIR, D_DIR))
    if saved_stage != zero_stage or not full:
        why = (f"from ZeRO-{saved_stage} to ZeRO-{zero_stage}" if saved_stage != zero_stage
               else "and it has no whole optimizer state (written by an older version)")
        raise ResumeError(
            f"the checkpoint was written by {saved_workers} worker(s) with ZeRO-{saved_stage} and this run has "
            f"{world_size} with ZeRO-{zero_stage}: cannot change the worker count {why}; resume with "
            f"dist.num_workers={saved_workers} and dist.zero_stage={saved_stage}")
    return saved_workers


def find_latest(fs, run_fs_path: str) -> str | None:
    """fs path of the newest complete checkpoint of a run folder, or None."""
    found = list_checkpoints(fs, run_fs_path)
    return found[-1][1] if found else None


# ----------------------------------------------------------------------------------------------------
# Local staging folders (a checkpoint before Ray copies it, S3-bound run outputs).


STAGING_PREFIX = "digan-staging-"  # + the writer's PID: checkpoints before Ray copies them, S3-bound run outputs


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def clean_stale_staging(tmp: str | None = None) -> list[str]:
    """Remove the staging folders that processes which no longer run left behind (a worker killed while it
    wrote a checkpoint, or a lost node's, when it comes back); folders of live processes stay."""
    tmp = tmp or tempfile.gettempdir()
    removed = []
    for entry in os.scandir(tmp):
        if not (entry.name.startswith(STAGING_PREFIX) and entry.is_dir(follow_symlinks=False)):
            continue
        pid = entry.name[len(STAGING_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
    return removed


def staging_dir(name: str) -> str:
    """A new local staging folder, named after this process (so `clean_stale_staging` knows its writer)."""
    return tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-{name}-")
