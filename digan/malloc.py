"""glibc malloc settings for CPU work: keep freed tensor memory in the process for reuse.

PyTorch's CPU tensors come from glibc malloc. Blocks above malloc's mmap threshold (adaptive, at most
32 MiB; one activation of the discriminator at 64x64 with 512 channels is 64 MiB for 8 images) are mapped
afresh on every allocation and unmapped when freed, and the heap top is trimmed back to the OS. Every
first touch of such memory is a page fault in which the kernel zeroes a 4 KiB page. Measured on the
2-core development VM at the official settings (benchmarks/train_step.py, row `official`): one D step
took ~2 million minor faults, one G step ~1 million; with the settings below, near zero after the
first iteration, and the D step went from 21 s to 15 s, the G step from 9.7 s to 7 s.

`keep_freed_memory()` turns mapping off (all blocks come from the heap) and moves the trim threshold to
2 GiB, so freed blocks are reused as they are, the way a GPU caching allocator keeps its blocks. A
training step allocates the same sizes every iteration, so the heap settles after a few iterations and
stays there. The price is memory: the heap holds its peak, and PyTorch's 64-byte-aligned requests
(posix_memalign) are a little larger than a freed block of the same size, so the heap also grows until
freed neighbours coalesce. Measured peak RSS at the official settings: see benchmarks/train_step.py
(`--default-malloc` for the comparison). `dist.malloc_keep_freed=false` turns it off.
PyTorch's CPU performance guide gets the same effect from jemalloc or tcmalloc via LD_PRELOAD; mallopt
needs no package and applies from the moment it is called. It is a no-op off glibc (macOS, musl).
"""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4  # <malloc.h>
_TRIM_THRESHOLD = (1 << 31) - 1  # mallopt takes an int: 2 GiB of free heap top before any is returned
_TOP_PAD = 64 << 20  # grow the heap in 64 MiB steps (fewer brk calls)
_applied = False


def keep_freed_memory() -> bool:
    """Apply the settings to this process (idempotent); True where glibc accepted them."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
                    and mallopt(_M_TOP_PAD, _TOP_PAD))
    return _applied


def configure_malloc(dist, device) -> bool:
    """`keep_freed_memory()` when `device` (a torch.device or its name) is the CPU and `dist.malloc_keep_freed`
    (a DistConfig) asks for it; what every CPU entry point calls. True where applied."""
    return str(device).split(":")[0] == "cpu" and dist.malloc_keep_freed and keep_freed_memory()
