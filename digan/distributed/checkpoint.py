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
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch

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
    """torch.save into a temp file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_weights_only(path: str | os.PathLike) -> Any:
    """Every file we write loads with weights_only=True (plain tensors and Python types only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------------------------------
# Storage: a local folder or s3://bucket/prefix, as a pyarrow filesystem + path (what Ray's RunConfig takes).


def resolve_storage(storage_path: str, s3_endpoint_url: str | None = None, s3_region: str | None = None):
    """(pyarrow filesystem, fs path) for `train.storage_path`.

    A folder becomes an absolute local path (pyarrow LocalFileSystem). `s3://bucket/prefix` becomes an
    s3fs filesystem wrapped for pyarrow and the path "bucket/prefix". The endpoint comes from
    `s3_endpoint_url`, else AWS_ENDPOINT_URL(_S3); credentials only from the AWS chain (never passed here).
    """
    import pyarrow.fs as pafs

    if storage_path.startswith("s3://"):
        import s3fs

        endpoint = s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        fs = s3fs.S3FileSystem(endpoint_url=endpoint or None,
                               client_kwargs={"region_name": s3_region} if s3_region else {},
                               config_kwargs={"s3": {"addressing_style": "path"}})
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), storage_path[len("s3://"):].rstrip("/")
    return pafs.LocalFileSystem(), str(Path(storage_path).expanduser().resolve())


def display_path(fs, fs_path: str) -> str:
    """A path a user can paste: absolute local path, or s3://bucket/key."""
    import pyarrow.fs as pafs

    return fs_path if isinstance(fs, pafs.LocalFileSystem) else f"s3://{fs_path}"


def publish_file(fs, local_file: str | os.PathLike, fs_path: str) -> None:
    """Copy one local file to `fs_path` so that it appears complete or not at all.

    Local: write `.name.<random>.tmp` next to it, then rename. S3: one PUT (multipart uploads only
    become visible when completed).
    """
    import pyarrow.fs as pafs

    parent = fs_path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{parent}/.{Path(fs_path).name}.{uuid.uuid4().hex}.tmp"
        try:
            pafs.copy_files(str(local_file), tmp, destination_filesystem=fs)
            fs.move(tmp, fs_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    else:
        with open(local_file, "rb") as src, fs.open_output_stream(fs_path) as dst:
            while chunk := src.read(8 << 20):
                dst.write(chunk)


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
