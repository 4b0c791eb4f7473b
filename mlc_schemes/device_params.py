"""A compiled model's parameters placed in device tensors straight from the packed shards, without a second copy.

For each parameter of the library, in call order (`param_names`; `param_concat` names the packed tensors a fused
q/k/v or gate/up parameter is made of, concatenated along axis 0):

- **mapped** (CPU only): a parameter stored as one record, in the dtype the library wants, whose bytes start on a
  64-byte boundary of its shard (TVM's kernels assume that alignment) becomes a zero-copy view of the shard mapped
  into memory (a private copy-on-write mapping, handed to TVM through DLPack; the kernels only read parameters).
  Its pages belong to the page cache, as llama.cpp's memory-mapped GGUF: read from disk on first use, shared
  between processes, evictable, never a second copy.
- **copied**: everything else (fused concatenations, misaligned records, CUDA, float16 -> float32 widening in the
  exact float32 mode, the CPU kernels' row-interleaved packed linears) gets one device tensor of its final
  shape, and each source record is read from its shard straight into that tensor's slice (CPU: `readinto` its
  memory; other devices: through one host buffer the size of the record). No numpy concatenation, no
  intermediate array of the whole model (interleaved ones pass through windows of ~4 MiB of rows).

Sources are `weights_dir.TensorRecord`s (a packed dir on disk) or numpy arrays (random weights made in memory:
mapped means a view of the array then).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from mlc_schemes.weights_dir import TensorRecord

ALIGN = 64  # bytes; TVM allocates (and its generated code assumes) 64-byte aligned tensor data


@dataclass
class PlacedParams:
    """The device tensors (call order) and how they got there."""

    tensors: list = field(default_factory=list)
    mapped_bytes: int = 0
    copied_bytes: int = 0
    mapped: list[str] = field(default_factory=list)  # parameter names that are views of a mapped shard / array

    @property
    def total_bytes(self) -> int:
        return self.mapped_bytes + self.copied_bytes


def _map(rec: TensorRecord) -> np.ndarray:
    """Record `rec` as an array over a mapping of just its own pages (from the page below its offset): page faults
    then map in neighbouring pages of this tensor only (the kernel's fault-around stops at the mapping's end), not
    those of records that were copied. Mode "c" (private copy-on-write) so numpy exports it as writable: DLPack
    cannot signal read-only here."""
    return np.memmap(rec.path, dtype=np.uint8, mode="c", offset=rec.offset, shape=(rec.nbytes,)).view(
        rec.dtype).reshape(rec.shape)


def _read_into(rec: TensorRecord, dst: memoryview) -> None:
    """Read record `rec` from its shard into `dst` (exactly rec.nbytes bytes), no intermediate buffer."""
    fd = os.open(rec.path, os.O_RDONLY)
    try:
        done = 0
        while done < rec.nbytes:
            got = os.preadv(fd, [dst[done:]], rec.offset + done)
            if got <= 0:
                raise OSError(f"{rec.path}: unexpected end of file reading {rec.name}")
            done += got
    finally:
        os.close(fd)


def _interleaved(parts: list, shape: tuple, dtype: str, il: int, device):
    """One [N/IL, C, IL] tensor from sources [rows_i, C] concatenated along rows (sum rows_i = N, a multiple of
    IL; a block may span two sources: a fused q/k/v of 3 x 4096 rows in blocks of 96), interleaved through
    windows of whole blocks (about 4 MiB of rows each), so no copy of the whole concatenation is made."""
    import tvm

    from mlc_schemes.packing import interleave_rows

    if device.dlpack_device_type() != tvm.cpu().dlpack_device_type():
        raise ValueError("row-interleaved parameters are a CPU layout")
    dst = tvm.runtime.empty((shape[0] // il, shape[1], il), dtype, device)
    view = np.from_dlpack(dst)
    srcs = [_map(p) if isinstance(p, TensorRecord) else np.asarray(p) for p in parts]
    starts = np.cumsum([0] + [len(a) for a in srcs])[:-1]
    step = il * max(1, (4 << 20) // (il * shape[1] * np.dtype(dtype).itemsize))
    for r0 in range(0, shape[0], step):
        r1 = min(r0 + step, shape[0])
        rows = np.concatenate([a[max(r0 - a0, 0): max(min(r1 - a0, len(a)), 0)] for a, a0 in zip(srcs, starts)])
        view[r0 // il: r1 // il] = interleave_rows(rows, il)
    return dst


def place_params(names: list[str], concat: dict[str, list[str]], sources: dict, device, dtype: str,
                 zero_copy: bool = True, interleave: dict[str, int] | None = None) -> PlacedParams:
    """Device tensors for `names` from `sources` (name -> TensorRecord or numpy array).

    dtype: the library's compute dtype; float16 dense tensors are widened to float32 when it is "float32" (packed
    codes, scales and zeros never change). zero_copy=False copies everything (the reference the tests compare
    the mapped load against). interleave: parameter -> IL for the CPU kernels' row-interleaved layout (the
    library metadata's `param_interleave`): the sources' rows go to the [N/IL, C, IL] tensor through
    `packing.interleave_rows` (`_interleaved`; copied, CPU only).
    """
    import tvm
    import tvm_ffi

    cpu = device.dlpack_device_type() == tvm.cpu().dlpack_device_type()
    out = PlacedParams()
    staging: np.ndarray | None = None
    for name in names:
        parts = [sources[s] for s in concat.get(name, [name])]
        first = parts[0]
        stored = str(np.dtype(first.dtype))
        want = "float32" if (stored == "float16" and dtype == "float32"
                             and not name.endswith((".q_scale", ".q_zero"))) else stored
        shape = (sum(int(p.shape[0]) for p in parts), *(int(d) for d in first.shape[1:]))
        if il := (interleave or {}).get(name):
            out.tensors.append(_interleaved(parts, shape, stored, il, device))
            out.copied_bytes += int(np.prod(shape)) * np.dtype(stored).itemsize
            continue
        if zero_copy and cpu and len(parts) == 1 and want == stored:
            arr = _map(first) if isinstance(first, TensorRecord) else np.ascontiguousarray(first)
            if arr.ctypes.data % ALIGN == 0:
                out.tensors.append(tvm_ffi.from_dlpack(arr, require_alignment=ALIGN, require_contiguous=True))
                out.mapped_bytes += arr.nbytes
                out.mapped.append(name)
                continue
        dst = tvm.runtime.empty(shape, want, device)
        if cpu:
            flat = memoryview(np.from_dlpack(dst).reshape(-1).view(np.uint8))
        offset = 0
        for part in parts:
            nbytes = part.nbytes
            if want != stored:  # exact widening, float32 mode only (small dense tensors)
                host = (_map(part) if isinstance(part, TensorRecord) else np.asarray(part)).astype(want)
                dst._create_view(host.shape, want, offset).copyfrom(host)
                offset += host.nbytes
                continue
            if cpu and isinstance(part, TensorRecord):
                _read_into(part, flat[offset: offset + nbytes])
            elif cpu:
                flat[offset: offset + nbytes] = memoryview(np.ascontiguousarray(part).reshape(-1).view(np.uint8))
            else:
                if isinstance(part, TensorRecord):
                    if staging is None or staging.nbytes < nbytes:
                        staging = np.empty(nbytes, np.uint8)
                    host = staging[:nbytes]
                    _read_into(part, memoryview(host))
                    host = host.view(part.dtype).reshape(part.shape)
                else:
                    host = np.ascontiguousarray(part)
                dst._create_view(tuple(host.shape), stored, offset).copyfrom(host)
            offset += nbytes
        out.tensors.append(dst)
        out.copied_bytes += offset
    return out
