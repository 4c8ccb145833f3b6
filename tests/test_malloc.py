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
    elif sys.argv[1] == "config":  # what the CPU entry points call: configure_malloc(cfg.dist, device)
        from digan.config import load_config
        from digan.malloc import configure_malloc
        print(configure_malloc(load_config("demo-32", sys.argv[3:]).dist, sys.argv[2]))
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


def run_script(*args: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, *args], check=True, capture_output=True, text=True).stdout
    return out.strip().splitlines()


def faults_per_alloc(mode: str) -> float:
    return float(run_script(mode)[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_keep_freed_memory_removes_page_faults_of_reallocation():
    default, kept = faults_per_alloc("default"), faults_per_alloc("keep")
    # glibc's default maps 64 MiB afresh each time: a fault per 4 KiB page (16384; fewer with THP "always")
    assert default >= 16
    assert kept <= max(2, default / 100)  # the freed blocks are reused as they are


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_configure_malloc_follows_the_config_and_the_device():
    """On by default on the CPU (dist.malloc_keep_freed), off when the config says so, never on a GPU run."""
    assert load_config("demo-32").dist.malloc_keep_freed is True
    applied, faults = run_script("config", "cpu")
    assert applied == "True" and float(faults) <= 100  # vs ~16384 page faults per allocation when off
    applied, faults = run_script("config", "cpu", "dist.malloc_keep_freed=false")
    assert applied == "False" and float(faults) >= 16
    applied, _ = run_script("config", "cuda:0")
    assert applied == "False"
