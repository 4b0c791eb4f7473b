"""Activation streams of the block loop: float32 [n, L, H] hidden states of the n calibration windows.

A stream lives on the calibration device (a plain tensor: the fastest), in CPU memory while the device is a GPU,
or in a file (when it would not fit in memory): 128 windows x 2048 tokens of a 70B model (H = 8192) are 8 GiB per
stream. Every form is read and written by window slices `s[j:k]` (a tensor on the calibration device), which is all
the block loop and `block_train.train_block` do; values round-trip exactly, so where a stream lives never changes
a result.

Placement `auto`: on the device if all live streams take at most a third of its free memory (CUDA) or half of the
available RAM (CPU); else in CPU memory if they take at most half of the available RAM; else in files.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

PLACEMENTS = ("auto", "memory", "disk")


class HostStream:
    """A stream in CPU memory (`path` None) or in a file, served as tensors on `device`."""

    def __init__(self, shape: tuple[int, int, int], device: torch.device, path: Path | None = None):
        self.shape = torch.Size(shape)
        self.device = torch.device(device)
        self._window = shape[1] * shape[2] * 4  # bytes of one float32 window
        self.path = path
        if path is None:
            self._data = torch.empty(shape, dtype=torch.float32)
            self._fd = None
        else:
            self._data = None
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            os.ftruncate(self._fd, shape[0] * self._window)

    def _range(self, sl: slice) -> range:
        if not isinstance(sl, slice):
            raise TypeError("a stream is indexed by window slices")
        return range(*sl.indices(self.shape[0]))

    def __getitem__(self, sl: slice) -> torch.Tensor:
        r = self._range(sl)
        if self._fd is None:
            return self._data[sl].to(self.device)
        out = torch.empty((len(r), *self.shape[1:]), dtype=torch.float32)
        buf = out.view(torch.uint8).numpy().reshape(-1)
        for i, j in enumerate(r):
            view, done = buf[i * self._window:(i + 1) * self._window], 0
            while done < self._window:
                got = os.preadv(self._fd, [view[done:]], j * self._window + done)
                if got <= 0:
                    raise OSError(f"short read from stream file {self.path}")
                done += got
        return out.to(self.device)

    def __setitem__(self, sl: slice, value: torch.Tensor) -> None:
        r = self._range(sl)
        value = value.detach().to("cpu", torch.float32).contiguous()
        if self._fd is None:
            self._data[sl] = value
            return
        buf = value.view(torch.uint8).numpy().reshape(-1)
        for i, j in enumerate(r):
            view, done = buf[i * self._window:(i + 1) * self._window], 0
            while done < self._window:
                done += os.pwrite(self._fd, view[done:], j * self._window + done)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            if self.path is not None:
                Path(self.path).unlink(missing_ok=True)
        self._data = None


def memory_budget(device: torch.device) -> tuple[int, int]:
    """(free bytes on the device, available CPU RAM in bytes)."""
    import psutil

    ram = psutil.virtual_memory().available
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, ram
    return ram, ram


class StreamFactory:
    """Makes the loop's streams of one shape where `placement` (auto / memory / disk) says; files go to `scratch`."""

    def __init__(self, shape: tuple[int, int, int], device: torch.device, placement: str = "auto",
                 scratch: Path | None = None, count: int = 3):
        if placement not in PLACEMENTS:
            raise ValueError(f"stream placement must be one of {PLACEMENTS}, got {placement!r}")
        self.shape, self.device, self.scratch = tuple(shape), torch.device(device), scratch
        need = count * shape[0] * shape[1] * shape[2] * 4
        if placement == "auto":
            dev_free, ram = memory_budget(self.device)
            share = 3 if self.device.type == "cuda" else 2
            if need * share <= dev_free:
                placement = "device"
            elif need * 2 <= ram:
                placement = "memory"
            else:
                placement = "disk"
        elif placement == "memory" and self.device.type == "cpu":
            placement = "device"
        if placement == "disk" and scratch is None:
            raise ValueError("disk streams need a scratch directory")
        self.placement = placement
        self._made = 0
        self._open: list[HostStream] = []

    def new(self):
        """An uninitialised stream."""
        if self.placement == "device":
            return torch.empty(self.shape, dtype=torch.float32, device=self.device)
        path = None
        if self.placement == "disk":
            Path(self.scratch).mkdir(parents=True, exist_ok=True)
            path = Path(self.scratch) / f"stream-{self._made}.f32"  # reused (truncated) by a resumed run
            self._made += 1
        s = HostStream(self.shape, self.device, path)
        self._open.append(s)
        return s

    def copy(self, src):
        """A new stream with the values of `src` (window by window)."""
        dst = self.new()
        for j in range(self.shape[0]):
            dst[j:j + 1] = src[j:j + 1]
        return dst

    def close(self) -> None:
        for s in self._open:
            s.close()
        self._open.clear()
