"""Safetensors checkpoints on disk, tensor by tensor: a lazy reader and a writer whose layout is planned up front.

Reader: `SafetensorsDir(dir)` opens `model.safetensors` or `model.safetensors.index.json` + its shards, checks that
every shard the index names exists, and reads one tensor at a time in its stored dtype (a file is mapped only while
one tensor is copied out of it, so resident memory follows the tensor, not the checkpoint).

Writer: `ShardedWriter(dir, specs)` plans the shards the way `save_pretrained` does (huggingface_hub's splitter,
`model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`, or one `model.safetensors`), writes each file's
safetensors header first (every name, dtype and shape is known before calibration starts) and reserves the space,
then writes each tensor's bytes into its slot whenever it is ready, in any order. Nothing is buffered: the memory cost
is the tensor being written. A full disk raises `UserError` (the caller writes into a temporary directory).

Safetensors layout (https://github.com/huggingface/safetensors): u64 little-endian header length N, N bytes of JSON
header `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}` padded with spaces to a
multiple of 8, then the data; offsets are relative to the end of the header and tile the data exactly.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import struct
from collections.abc import Iterable
from pathlib import Path

import torch

from omniquant.errors import UserError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
MAX_SHARD_BYTES = 2 * 1024**3

# safetensors dtype names <-> torch
DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
          "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
NAMES = {v: k for k, v in DTYPES.items()}


def _nbytes(dtype: torch.dtype, shape) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


class SafetensorsDir:
    """Lazy tensors of a safetensors checkpoint directory (`stem` "model": model.safetensors[.index.json])."""

    def __init__(self, directory: str | Path, stem: str = "model"):
        from safetensors import safe_open

        self.directory = Path(directory)
        index, single = self.directory / f"{stem}.safetensors.index.json", self.directory / f"{stem}.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise UserError(f"{index} is not a safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
        elif single.is_file():
            files, weight_map = [single.name], None
        else:
            other = sorted(p.name for p in self.directory.glob("*.bin"))
            hint = f" (it has {other[0]}: only safetensors checkpoints are read)" if other else ""
            raise UserError(f"no {single.name} or {index.name} in {self.directory}{hint}")
        if missing := [f for f in files if not (self.directory / f).is_file()]:
            raise UserError(f"{self.directory}: shard {missing[0]} is listed in {index.name} but missing "
                            f"({len(missing)} of {len(files)} shards missing; incomplete download?)")
        self.file_of: dict[str, str] = {}
        self._info: dict[str, tuple[str, list[int]]] = {}
        self._stored_name: dict[str, str] = {}  # name -> name in the file, where rename() changed it
        for f in files:
            try:
                with safe_open(self.directory / f, framework="pt") as h:
                    for name in h.keys():  # noqa: SIM118 (safe_open is not a dict)
                        s = h.get_slice(name)
                        self.file_of[name] = f
                        self._info[name] = (s.get_dtype(), list(s.get_shape()))
            except Exception as e:  # noqa: BLE001 (truncated or not a safetensors file)
                raise UserError(f"cannot read {self.directory / f}: {e}") from None
        if weight_map is not None and (absent := sorted(set(weight_map) - set(self.file_of))):
            raise UserError(f"{self.directory}: {absent[0]} is listed in {index.name} but not in its shard "
                            f"{weight_map[absent[0]]}")

    def names(self) -> list[str]:
        return list(self.file_of)

    def rename(self, new_of_stored: dict[str, str]) -> None:
        """Address tensors by other names (stored name -> new name; absent names keep theirs); `get` still reads
        the stored one. Used for transformers' load-time key renames (Gemma 3: `language_model.model.*`)."""
        self._stored_name = {new_of_stored.get(n, n): self._stored_name.get(n, n) for n in self.file_of}
        self.file_of = {new_of_stored.get(n, n): f for n, f in self.file_of.items()}
        self._info = {new_of_stored.get(n, n): i for n, i in self._info.items()}

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def shape(self, name: str) -> list[int]:
        return self._info[name][1]

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype; UserError for one torch cannot represent."""
        code = self._info[name][0]
        if code not in DTYPES:
            raise UserError(f"{name} in {self.directory} has dtype {code}, which this tool cannot read")
        return DTYPES[code]

    def nbytes(self, name: str) -> int:
        return _nbytes(self.dtype(name), self.shape(name))

    def get(self, name: str) -> torch.Tensor:
        """The tensor in its stored dtype (a fresh CPU tensor; the file is unmapped again)."""
        from safetensors import safe_open

        with safe_open(self.directory / self.file_of[name], framework="pt") as h:
            return h.get_tensor(self._stored_name.get(name, name))

    def by_file(self, names: Iterable[str] | None = None) -> list[tuple[str, list[str]]]:
        """(file, names in it) in file order: processing shard by shard keeps one shard's pages warm at a time."""
        out: dict[str, list[str]] = {}
        for n in self.names() if names is None else names:
            out.setdefault(self.file_of[n], []).append(n)
        return sorted(out.items())


def overwrite_tensor(path: Path, name: str, tensor: torch.Tensor) -> None:
    """Write `tensor` over the stored data of `name` in the safetensors file `path`, in place (same dtype and shape:
    the header and every other tensor stay as they are)."""
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        entry = json.loads(f.read(n)).get(name)
        if entry is None:
            raise KeyError(f"{name} is not in {path}")
        if entry["dtype"] != NAMES[tensor.dtype] or entry["shape"] != list(tensor.shape):
            raise ValueError(f"{name} in {path} is {entry['dtype']}{entry['shape']}, "
                             f"not {NAMES[tensor.dtype]}{list(tensor.shape)}")
        start, end = entry["data_offsets"]
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        assert len(data) == end - start
        f.seek(8 + n + start)
        f.write(data)


class _PlannedFile:
    """One safetensors file with its header written and its data area reserved; tensors are written into slots."""

    def __init__(self, path: Path, specs: list[tuple[str, torch.dtype, list[int]]], metadata: dict | None = None):
        # larger elements first, as safetensors' own writer does, so every tensor starts aligned to its element size
        order = sorted(range(len(specs)), key=lambda j: (-torch.empty((), dtype=specs[j][1]).element_size(), j))
        header, offset = {}, 0
        self.slots: dict[str, tuple[int, int, torch.dtype, list[int]]] = {}
        for j in order:
            name, dtype, shape = specs[j]
            n = _nbytes(dtype, shape)
            header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            self.slots[name] = (offset, n, dtype, list(shape))
            offset += n
        header["__metadata__"] = {"format": "pt", **(metadata or {})}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.path, self.base, self.size = path, 8 + len(blob), 8 + len(blob) + offset
        self.pending = set(self.slots)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.posix_fallocate(self.fd, 0, self.size)  # reserve the space now: a full disk fails here, not hours later
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise
            os.ftruncate(self.fd, self.size)  # filesystems without fallocate
        os.pwrite(self.fd, struct.pack("<Q", len(blob)) + blob, 0)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        offset, n, dtype, shape = self.slots[name]
        if tensor.dtype != dtype or list(tensor.shape) != shape:
            raise ValueError(f"{name}: planned {dtype}{shape}, got {tensor.dtype}{list(tensor.shape)}")
        data = memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        done = 0
        while done < n:  # pwrite may write less than asked
            done += os.pwrite(self.fd, data[done:], self.base + offset + done)
        self.pending.discard(name)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def free_bytes(directory: Path) -> int:
    return shutil.disk_usage(directory).free


def check_free_space(directory: Path, needed: int, what: str) -> None:
    free = free_bytes(directory)
    if needed > free:
        raise UserError(f"not enough disk space for {what} in {directory}: needs {needed / 1e9:.2f} GB, "
                        f"{free / 1e9:.2f} GB free")


class ShardedWriter:
    """Write `specs` (name -> (dtype, shape), in checkpoint order) as a safetensors checkpoint in `directory`.

    `stem` "model" gives save_pretrained's names; shards hold at most `max_shard_bytes` (a larger tensor gets a
    shard of its own). `write(name, tensor)` in any order; `close()` checks that every tensor was written and writes
    the index (sharded case). Use inside `omniquant.atomic.atomic_dir`: on error the directory is discarded.
    """

    def __init__(self, directory: Path, specs: dict[str, tuple[torch.dtype, list[int]]], stem: str = "model",
                 max_shard_bytes: int = MAX_SHARD_BYTES, metadata: dict | None = None):
        from huggingface_hub import split_state_dict_into_shards_factory

        self.directory = Path(directory)
        for name, (dtype, _) in specs.items():
            if dtype not in NAMES:
                raise UserError(f"cannot write {name}: dtype {dtype} has no safetensors name")
        self.total = sum(_nbytes(d, s) for d, s in specs.values())
        split = split_state_dict_into_shards_factory(
            dict(specs), get_storage_size=lambda spec: _nbytes(*spec),
            filename_pattern=stem + "{suffix}.safetensors", max_shard_size=max_shard_bytes)
        self.index_name = f"{stem}.safetensors.index.json" if split.is_sharded else None
        self.weight_map = dict(split.tensor_to_filename)
        check_free_space(self.directory, self.total, f"{stem} tensors")
        self.files: dict[str, _PlannedFile] = {}
        try:
            for fname, names in split.filename_to_tensors.items():
                self.files[fname] = _PlannedFile(self.directory / fname, [(n, *specs[n]) for n in names], metadata)
        except OSError as e:
            self.abort()
            raise _disk_error(e, self.directory) from None

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.weight_map:
            raise KeyError(f"{name} is not part of the planned checkpoint")
        try:
            self.files[self.weight_map[name]].write(name, tensor)
        except OSError as e:
            self.abort()
            raise _disk_error(e, self.directory) from None

    def pending(self) -> list[str]:
        return sorted(n for f in self.files.values() for n in f.pending)

    def abort(self) -> None:
        for f in self.files.values():
            f.close()

    def close(self) -> None:
        if missing := self.pending():
            self.abort()
            raise RuntimeError(f"internal error: {len(missing)} tensors were never written, e.g. {missing[0]}")
        for f in self.files.values():
            os.fsync(f.fd)
            f.close()
        if self.index_name:
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))}
            (self.directory / self.index_name).write_text(json.dumps(index, indent=2) + "\n")


def _disk_error(e: OSError, directory: Path) -> Exception:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(f"disk full while writing to {directory} ({e.strerror}); nothing was kept")
    return e
