"""What the benchmarks share: the repository on sys.path, the machine's load, a process's CPU time and peak
memory, and rows run in their own subprocess (so peak memory is per row) that print one JSON line.

Every benchmark is run as a script (`python benchmarks/x.py`), so this folder is on sys.path and
`from common import ...` finds this module; importing it puts the repository root there too.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def load_avg() -> str:
    """The 1, 5 and 15 minute load averages (other work on the machine skews every timing)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_seconds(children: bool = True) -> float:
    """CPU seconds used so far by this process (all its threads) and, with `children`, its finished children."""
    t = os.times()
    return t.user + t.system + (t.children_user + t.children_system if children else 0.0)


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (ru_maxrss, KiB on Linux), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def json_row(cmd: list[str], show_progress: bool = False) -> dict:
    """Run one row in its own process and return the JSON object its last stdout line holds. Its stderr (the
    row's progress) goes to ours with `show_progress`, else it is kept for the error: a failed row raises
    RuntimeError naming the command, its exit code and the last line of its stderr."""
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if show_progress else subprocess.PIPE, text=True)
    if out.returncode != 0:
        tail = (out.stderr or "").strip().splitlines() or ["(its stderr is above)"]
        raise RuntimeError(f"row {' '.join(cmd[1:])!r} failed (exit {out.returncode}): {tail[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
