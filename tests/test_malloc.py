"""digan.malloc: freed CPU tensor memory is reused without page faults (glibc), and the setting is opt-out."""

import subprocess
import sys
import textwrap

import pytest

from digan.config import load_config

SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    if sys.argv[1] == "keep":
        from digan.malloc import keep_freed_memory
        assert keep_freed_memory() and keep_freed_memory()  # applied, idempotent
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    # 64 MiB, above glibc's largest mmap threshold. Kept blocks settle after a few rounds: PyTorch's
    # posix_memalign asks for a little more than a freed block of the same size holds, until freed
    # neighbours have coalesced.
    for _ in range(12):
        torch.empty(16 << 20).fill_(1.0)
    before = faults()
    for _ in range(5):
        torch.empty(16 << 20).fill_(1.0)  # allocate, touch every page, free
    print((faults() - before) / 5)
""")


def faults_per_alloc(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_keep_freed_memory_removes_page_faults_of_reallocation():
    default, kept = faults_per_alloc("default"), faults_per_alloc("keep")
    # glibc's default maps 64 MiB afresh each time: a fault per 4 KiB page (16384; fewer with THP "always")
    assert default >= 16
    assert kept <= max(2, default / 100)  # the freed blocks are reused as they are


def test_keep_freed_memory_is_on_by_default_and_can_be_turned_off():
    assert load_config("demo-32").dist.malloc_keep_freed is True
    assert load_config("demo-32", ["dist.malloc_keep_freed=false"]).dist.malloc_keep_freed is False
