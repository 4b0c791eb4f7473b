"""glibc heap policy for the two kinds of long loops here (glibc only; a no-op elsewhere).

Give freed memory back between large per-tensor steps (`release_freed_memory`: the packer after each tensor, the
lazy block loader after each block, `lazy_model.LazyBlocks.finish`):

glibc raises its mmap threshold to the size of each freed mmapped chunk (up to 32 MB), after which the row-block
temporaries of a 7B-sized tensor come from the heap, whose freed holes are kept: packing six 7B-shaped linears
one after another, the resident size went 371 -> 546 MB without a trim and stayed at 232 MB with one after each
(`omniquant pack` of a whole 7B model, 291 tensors, peaked at 3.9 GiB without it). RTN of a Llama-2-7B-shaped model
likewise: each block's scales / zeros stay allocated between freed holes, peak 3.30 -> 2.00 GiB with a trim per block;
1 epoch of LWC (2 x 128 tokens) 3.96 -> 2.23 GiB, wall 592 -> 616 s.
`malloc_trim(0)` returns the free pages of every arena.

Keep it within a training loop (`retained_heap`, the e2e stage): every step allocates and frees the same
activation temporaries (16 MB KL chunks, saved activations of 30 blocks), and with glibc's defaults (an mmap
threshold that starts at 128 kB, a heap top trimmed once twice that is free) many go back to the OS and are faulted
in again, page by page, at the next step. A fixed 32 MB mmap threshold (the dynamic threshold's own maximum) and a
1 GB trim threshold keep them mapped: SmolLM2 W2g128 `blockap` 1 + 1, one thread, the stage's `_loss` calls 38.4 ->
36.0 s and 1.90 M -> 0.91 M minor page faults, results bit for bit the same (bench/README.md, "Calibration time").
`retained_heap` is not used in the block loop: there glibc's dynamic threshold already keeps the faults low (~0.3 M
for 30 blocks), and a retained heap, which at 7B needs the per-block trim to stay bounded, cost more faults than it
saved.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools

# mallopt parameters (malloc.h) and glibc's defaults
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
DEFAULT_THRESHOLD = 128 * 1024
KEEP_MMAP_THRESHOLD = 32 << 20  # larger allocations stay mmapped (at 7B: whole weights, attention scores)
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
