"""glibc heap policy for the two kinds of long loops here (glibc only; a no-op elsewhere).

Give freed memory back between large per-tensor steps (`release_freed_memory`, the packer):

glibc raises its mmap threshold to the size of each freed mmapped chunk (up to 32 MB), after which the row-block
temporaries of a 7B-sized tensor come from the heap, whose freed holes are kept: packing six 7B-shaped linears
one after another, the resident size went 371 -> 546 MB without a trim and stayed at 232 MB with one after each
(`omniquant pack` of a whole 7B model, 291 tensors, peaked at 3.9 GiB without it). `malloc_trim(0)` returns the
free pages of every arena.

Keep it within a training loop (`retained_heap`, calibration): every step allocates and frees the same activation
temporaries, and with glibc's defaults (an mmap threshold that starts at 128 kB, a heap top trimmed once 2x that is
free) many of them go back to the OS and are faulted in again, page by page, on the next step. A fixed 32 MB mmap
threshold (glibc's upper limit) and a 1 GB trim threshold keep them in the heap: SmolLM2 W2g128 blockap 1 + 1
calibration, one thread, 3.48 M -> 0.67 M minor page faults, 168.2 -> 158.7 s, peak RSS 2.74 -> 2.76 GB, results bit
for bit the same (bench/README.md, "Calibration time").
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools

# mallopt parameters (malloc.h) and glibc's defaults
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
DEFAULT_THRESHOLD = 128 * 1024
KEEP_MMAP_THRESHOLD = 32 << 20  # glibc refuses more than HEAP_MAX_SIZE / 2 = 32 MB on 64-bit
KEEP_TRIM_THRESHOLD = 1 << 30


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def release_freed_memory() -> None:
    """malloc_trim(0) where glibc provides it."""
    if (libc := _libc()) is not None:
        libc.malloc_trim(0)


@contextlib.contextmanager
def retained_heap():
    """Within the block: allocations up to 32 MB come from the heap and freed heap memory stays mapped (module
    docstring). On exit: glibc's default thresholds (static from then on: mallopt ends the dynamic adjustment) and
    the free pages returned."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, KEEP_MMAP_THRESHOLD)
    libc.mallopt(M_TRIM_THRESHOLD, KEEP_TRIM_THRESHOLD)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, DEFAULT_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_THRESHOLD)
        libc.malloc_trim(0)
