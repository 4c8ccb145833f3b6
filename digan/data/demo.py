"""`ensure_demo_shards`: the embedded demo dataset (data_shards.demo), built once per resolution and cached."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path

from digan.config import DataConfig


def ensure_demo_shards(cfg: DataConfig, resolution: int) -> str:
    """Build the demo shards under `cfg.demo_dir` if missing; return their folder.

    Keyed by resolution, clip length and recipe version. Safe when several processes race (the Ray
    workers of one node): a file lock makes one of them build while the others wait, and the build
    goes to a temp folder renamed into place only when complete, so a half-built folder is never
    visible, even across hosts sharing a file system without working locks.
    """
    from data_shards.demo import DEMO_VERSION, build_demo

    root = Path(cfg.demo_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"demo-v{DEMO_VERSION}-{resolution}px-{cfg.num_frames}f"
    if (final / "manifest.json").exists():
        return str(final)
    with open(root / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "manifest.json").exists():  # another process built it while we waited
            return str(final)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}.tmp-"))
        try:
            build_demo(str(tmp), resolution, clip_length=cfg.num_frames, workers=min(2, os.cpu_count() or 1),
                       progress=False)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700: others on shared storage could not enter
            try:
                os.rename(tmp, final)
            except OSError:  # lost a race with a host that does not share our lock: theirs is complete too
                if not (final / "manifest.json").exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(final)
