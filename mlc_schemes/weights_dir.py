"""MLC/TVM tensor cache on disk: `tensor-cache.json` + `params_shard_N.bin`, written by TVM, read back verified.

`tensor-cache.json` is `{metadata: {ParamSize, ParamBytes, BitsPerParam}, records: [shard...]}`, each shard
`{dataPath, format: "raw-shard", nbytes, md5sum, records: [{name, shape, dtype, format, nbytes, byteOffset}]}`.
Writing goes through TVM's own `tvm.contrib.tvmjs.dump_tensor_cache` (shards of at most 32 MB; a single tensor
larger than half the cap gets a shard of its own, so an embedding of more than 32 MB makes a larger shard, as in
MLC-LLM). Reading is plain numpy, so the loader needs no TVM.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from collections.abc import Callable, Iterable, Iterator
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


def _cache_records(directory: Path) -> tuple[list[dict], dict]:
    index = directory / TENSOR_CACHE
    if not index.is_file():
        raise UserError(f"{directory} is not a packed weights directory (no {TENSOR_CACHE})")
    try:
        cache = json.loads(index.read_text())
        return cache["records"], cache.get("metadata", {})
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{index} is corrupt: {e}") from None


def iter_tensor_cache(directory: str | Path, verify: bool = True) -> Iterator[dict[str, np.ndarray]]:
    """The tensors of `directory/tensor-cache.json` one shard at a time: {name: numpy array (read-only view of
    that shard's bytes)}. With `verify`, each shard's size and md5 must match its record (UserError otherwise)."""
    directory = Path(directory)
    shards, _ = _cache_records(directory)
    for shard in shards:
        path = directory / shard["dataPath"]
        if not path.is_file():
            raise UserError(f"missing weight shard {path}")
        data = path.read_bytes()
        if len(data) != shard["nbytes"]:
            raise UserError(f"weight shard {path.name} has {len(data)} bytes, the index says {shard['nbytes']}")
        if verify and hashlib.md5(data).hexdigest() != shard.get("md5sum"):
            raise UserError(f"md5 mismatch in weight shard {path.name}: the file is corrupt")
        params: dict[str, np.ndarray] = {}
        for rec in shard["records"]:
            if rec["dtype"] not in _NUMPY_DTYPES or rec.get("format", "raw") != "raw":
                raise UserError(f"unsupported record {rec['name']}: dtype {rec['dtype']} format {rec.get('format')}")
            start, nbytes = rec["byteOffset"], rec["nbytes"]
            if start + nbytes > len(data):
                raise UserError(f"record {rec['name']} runs past the end of {path.name}")
            arr = np.frombuffer(data, dtype=rec["dtype"], count=nbytes // np.dtype(rec["dtype"]).itemsize,
                                offset=start)
            params[rec["name"]] = arr.reshape(rec["shape"])
        yield params


def read_tensor_cache(directory: str | Path, verify: bool = True) -> tuple[dict[str, np.ndarray], dict]:
    """Read `directory/tensor-cache.json` and its shards -> (name -> numpy array, metadata).

    With `verify`, each shard's size and md5 must match its record; a mismatch raises UserError.
    """
    params: dict[str, np.ndarray] = {}
    for shard in iter_tensor_cache(directory, verify):
        params.update(shard)
    return params, _cache_records(Path(directory))[1]


def shard_files(directory: str | Path) -> list[Path]:
    """The shard files named by `directory/tensor-cache.json`, in order."""
    directory = Path(directory)
    cache = json.loads((directory / TENSOR_CACHE).read_text())
    return [directory / s["dataPath"] for s in cache["records"]]
