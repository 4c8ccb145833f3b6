"""The repository stands alone: no tracked file points at a machine path or a document it does not contain."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Joined at run time so that this file never matches its own patterns.
_FORBIDDEN = [
    "DEVELOPERS" + r"\.md",              # notes of one workplace, not shipped
    "shared" + "/reference",
    "reference" + " note",
    "/" + "work/",                       # a machine's checkout path
    "/tmp" + "/metrics",
    "ray-deepspeed" + "-stack",
    "offline-eval" + "-data",
    "digan-official" + r"\.md",
    "slurm" + "-loopback",
    "style" + r"\.md",
]
PATTERN = re.compile("|".join(_FORBIDDEN))


def _tracked_text_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    files = []
    for name in out.decode().split("\0"):
        p = REPO / name
        if name and p.is_file() and not p.is_symlink():
            files.append(p)
    return files


def test_no_pointers_outside_the_repository():
    hits = []
    for p in _tracked_text_files():
        data = p.read_bytes()
        if b"\0" in data[:8192]:  # binary
            continue
        for n, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            if PATTERN.search(line):
                hits.append(f"{p.relative_to(REPO)}:{n}: {line.strip()[:100]}")
    assert not hits, "tracked files point outside the repository:\n" + "\n".join(hits)


def test_the_patterns_catch_what_they_should():
    for text in ("see DEVELOPERS" + ".md", "/" + "work/shared/x", "ray-deepspeed" + "-stack.md §2",
                 "/tmp" + "/metrics/jaxenv"):
        assert PATTERN.search(text), text
    assert not PATTERN.search("README.md, docs/ and ~/work-dir are fine")
