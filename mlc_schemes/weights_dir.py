"""MLC/TVM tensor cache on disk: `tensor-cache.json` + `params_shard_N.bin`, written by TVM, read back verified.

`tensor-cache.json` is `{metadata: {ParamSize, ParamBytes, BitsPerParam}, records: [shard...]}`, each shard
`{dataPath, format: "raw-shard", nbytes, md5sum, records: [{name, shape, dtype, format, nbytes, byteOffset}]}`.
Writing goes through TVM's own `tvm.contrib.tvmjs.dump_tensor_cache` (shards of at most 32 MB; a single tensor
larger than half the cap gets a shard of its own, so an embedding of more than 32 MB makes a larger shard, as in
MLC-LLM). Reading is plain numpy, so the loader needs no TVM: `tensor_records` parses and checks the index (where
each tensor lies in which shard), `verify_shards` streams the md5 of each shard, `read_tensor_cache` reads it all
into numpy; the engine places records straight into device tensors (`mlc_schemes.device_params`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from omniquant.errors import UserError

TENSOR_CACHE = "tensor-cache.json"
CHAT_CONFIG = "mlc-chat-config.json"
SHARD_CAP_MB = 32
_NUMPY_DTYPES = {"float16", "float32", "uint32", "int32", "int8", "uint8", "int64"}


def write_tensor_cache(params: Iterable[tuple[str, np.ndarray]], directory: Path,
                       logical_params_fn: Callable[[], int]) -> dict:
    """Dump `(name, array)` pairs (float16 / uint32 / ...) into `directory`; returns the metadata written.

    `logical_params_fn()` (called after the last pair) gives the parameter count of the unquantized model, as
    MLC-LLM counts it: BitsPerParam = ParamBytes * 8 / that count. ParamSize is the number of stored tensors.
    """
    from tvm.contrib import tvmjs  # heavy import, only when writing

    stats = {"count": 0, "bytes": 0}

    def counted() -> Iterator[tuple[str, np.ndarray]]:
        for name, arr in params:
            arr = np.ascontiguousarray(arr)
            stats["count"] += 1
            stats["bytes"] += arr.nbytes
            yield name, arr

    def metadata() -> dict:
        return {
            "ParamSize": stats["count"],
            "ParamBytes": stats["bytes"],
            "BitsPerParam": stats["bytes"] * 8.0 / max(logical_params_fn(), 1),
        }

    # dump_tensor_cache prints progress lines of its own; the caller shows a tqdm bar instead.
    with contextlib.redirect_stdout(io.StringIO()):
        tvmjs.dump_tensor_cache(counted(), str(directory), encode_format="raw", meta_data=metadata,
                                shard_cap_mb=SHARD_CAP_MB, show_progress=False)
    return json.loads((directory / TENSOR_CACHE).read_text())["metadata"]


@dataclass(frozen=True)
class TensorRecord:
    """Where one tensor lies: `nbytes` raw bytes at `offset` of shard file `path`."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    path: Path
    offset: int
    nbytes: int


def tensor_records(directory: str | Path) -> tuple[dict[str, TensorRecord], dict, list[dict]]:
    """Parse and check `directory/tensor-cache.json` -> (name -> TensorRecord, metadata, shard entries).

    Checks (without reading the shards): every shard exists with the size the index gives, every record lies
    inside its shard with a supported dtype and raw format; anything else raises UserError.
    """
    directory = Path(directory)
    index = directory / TENSOR_CACHE
    if not index.is_file():
        raise UserError(f"{directory} is not a packed weights directory (no {TENSOR_CACHE})")
    try:
        cache = json.loads(index.read_text())
        shards = cache["records"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{index} is corrupt: {e}") from None
    records: dict[str, TensorRecord] = {}
    for shard in shards:
        path = directory / shard["dataPath"]
        if not path.is_file():
            raise UserError(f"missing weight shard {path}")
        size = path.stat().st_size
        if size != shard["nbytes"]:
            raise UserError(f"weight shard {path.name} has {size} bytes, the index says {shard['nbytes']}")
        for rec in shard["records"]:
            if rec["dtype"] not in _NUMPY_DTYPES or rec.get("format", "raw") != "raw":
                raise UserError(f"unsupported record {rec['name']}: dtype {rec['dtype']} format {rec.get('format')}")
            start, nbytes = rec["byteOffset"], rec["nbytes"]
            if start + nbytes > size or nbytes != np.dtype(rec["dtype"]).itemsize * int(np.prod(rec["shape"])):
                raise UserError(f"record {rec['name']} runs past the end of {path.name} or does not fit its shape")
            records[rec["name"]] = TensorRecord(rec["name"], tuple(rec["shape"]), rec["dtype"], path, start, nbytes)
    return records, cache.get("metadata", {}), shards


def verify_shards(directory: str | Path, shards: list[dict], chunk: int = 16 << 20) -> None:
    """md5 of each shard against its index entry, read in `chunk`-byte pieces (page cache, not process memory)."""
    for shard in shards:
        path = Path(directory) / shard["dataPath"]
        h = hashlib.md5()
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
        if h.hexdigest() != shard.get("md5sum"):
            raise UserError(f"md5 mismatch in weight shard {path.name}: the file is corrupt")


def iter_tensor_cache(directory: str | Path, verify: bool = True) -> Iterator[dict[str, np.ndarray]]:
    """The tensors of `directory/tensor-cache.json` one shard at a time: {name: numpy array (read-only view of
    that shard's bytes)}. With `verify`, each shard's md5 must match its record (UserError otherwise)."""
    _, _, shards = tensor_records(directory)
    for shard in shards:
        path = Path(directory) / shard["dataPath"]
        data = path.read_bytes()
        if verify and hashlib.md5(data).hexdigest() != shard.get("md5sum"):
            raise UserError(f"md5 mismatch in weight shard {path.name}: the file is corrupt")
        yield {r["name"]: np.frombuffer(data, dtype=r["dtype"], count=r["nbytes"] // np.dtype(r["dtype"]).itemsize,
                                        offset=r["byteOffset"]).reshape(r["shape"]) for r in shard["records"]}


def read_tensor_cache(directory: str | Path, verify: bool = True) -> tuple[dict[str, np.ndarray], dict]:
    """Read `directory/tensor-cache.json` and its shards -> (name -> numpy array, metadata).

    With `verify`, each shard's md5 must match its record; a mismatch raises UserError.
    """
    records, metadata, shards = tensor_records(directory)
    if verify:
        verify_shards(directory, shards)
    data = {path: path.read_bytes() for path in {r.path for r in records.values()}}
    params = {name: np.frombuffer(data[r.path], dtype=r.dtype, count=r.nbytes // np.dtype(r.dtype).itemsize,
                                  offset=r.offset).reshape(r.shape) for name, r in records.items()}
    return params, metadata


def shard_files(directory: str | Path) -> list[Path]:
    """The shard files named by `directory/tensor-cache.json`, in order."""
    directory = Path(directory)
    cache = json.loads((directory / TENSOR_CACHE).read_text())
    return [directory / s["dataPath"] for s in cache["records"]]
