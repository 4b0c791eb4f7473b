"""glibc heap policy (omniquant/heap.py): `retained_heap` sets the mmap / trim thresholds for a training loop and
restores glibc's defaults and returns the free pages on exit, also when the loop raises; without glibc it does
nothing."""

from __future__ import annotations

import pytest

from omniquant import heap


class _FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


@pytest.mark.parametrize("fail", [False, True])
def test_retained_heap_sets_and_restores_the_thresholds(monkeypatch, fail):
    libc = _FakeLibc()
    monkeypatch.setattr(heap, "_libc", lambda: libc)
    with pytest.raises(RuntimeError) if fail else heap.contextlib.nullcontext(), heap.retained_heap():
        assert libc.calls == [("mallopt", heap.M_MMAP_THRESHOLD, 32 << 20),
                              ("mallopt", heap.M_TRIM_THRESHOLD, 1 << 30)]
        if fail:
            raise RuntimeError("a training step failed")
    assert libc.calls[2:] == [("mallopt", heap.M_MMAP_THRESHOLD, 128 * 1024),
                              ("mallopt", heap.M_TRIM_THRESHOLD, 128 * 1024), ("malloc_trim", 0)]


def test_retained_heap_without_glibc_does_nothing(monkeypatch):
    monkeypatch.setattr(heap, "_libc", lambda: None)
    with heap.retained_heap():
        pass
    # and on this machine's C library (glibc on Linux) the real calls go through
    monkeypatch.undo()
    with heap.retained_heap():
        bytearray(8 << 20)
