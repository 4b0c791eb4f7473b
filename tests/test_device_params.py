"""Engine weight placement (`mlc_schemes.device_params`): each record read from its shard straight into its device
tensor (fused q/k/v concatenated in place), or mapped from the shard; values against numpy's concatenation of the
same records, resident memory against the bytes placed."""

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm")

from mlc_schemes.device_params import place_params
from mlc_schemes.weights_dir import (
    read_tensor_cache,
    tensor_records,
    write_tensor_cache,
)

ROWS = 512  # one layer's q_weight: 512 x 4096 uint32 = 8 MiB


def _write(tmp_path, layers: int = 3):
    """Packed-dir-like shards: per layer q/k/v q_weight (uint32; fused into qkv by the model), q_scale (float16,
    kept float16 in a float32 library) and a norm weight (float16 dense, widened in a float32 library)."""
    rng = np.random.default_rng(0)
    params, names, concat = [], [], {}
    for i in range(layers):
        parts = []
        for p, rows in (("q", ROWS), ("k", ROWS // 4), ("v", ROWS // 4)):
            name = f"l{i}.{p}_proj.q_weight"
            params.append((name, rng.integers(0, 2**32, (rows, 4096), dtype=np.uint32)))
            parts.append(name)
        concat[f"l{i}.qkv_proj.q_weight"] = parts
        params += [(f"l{i}.o_proj.q_scale", rng.standard_normal((ROWS, 32)).astype(np.float16)),
                   (f"l{i}.norm.weight", rng.standard_normal(4096).astype(np.float16))]
        names += [f"l{i}.qkv_proj.q_weight", f"l{i}.o_proj.q_scale", f"l{i}.norm.weight"]
    write_tensor_cache(iter(params), tmp_path, lambda: 1)
    return names, concat


def _reference(directory, names, concat, dtype):
    arrays, _ = read_tensor_cache(directory)
    out = {}
    for n in names:
        a = np.concatenate([arrays[s] for s in concat.get(n, [n])])
        out[n] = a.astype(np.float32) if dtype == "float32" and n.endswith(".weight") and a.dtype == np.float16 else a
    return out


_CHILD = """
import json, sys
from pathlib import Path
from mlc_schemes.engine import import_tvm_runtime
import_tvm_runtime()
import tvm
from mlc_schemes.device_params import place_params
from mlc_schemes.weights_dir import tensor_records

def mib(field):
    return int(next(ln for ln in open("/proc/self/status") if ln.startswith(field + ":")).split()[1]) / 1024

names, concat = json.loads(sys.argv[2])
records, _, _ = tensor_records(sys.argv[1])
Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current RSS
before = mib("VmRSS")
placed = place_params(names, concat, records, tvm.cpu(), "float16", zero_copy=False)
print(json.dumps({"grew": mib("VmHWM") - before, "placed": placed.total_bytes / 2**20, "mapped": placed.mapped_bytes}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the peak RSS")
def test_copy_load_holds_one_copy_of_the_weights(tmp_path):
    """Copied placement (fused concatenations included) raises the peak RSS by the placed bytes, not twice that
    (reading every shard into numpy, concatenating, then copying to TVM took about 2x). Measured in a fresh
    process: in this one, memory freed by earlier work is reused and hides the growth."""
    import json
    import os
    import subprocess
    import sys

    names, concat = _write(tmp_path)
    repo = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path), json.dumps([names, concat])], check=False,
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(repo)), timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["mapped"] == 0 and res["placed"] > 20
    assert res["placed"] * 0.9 <= res["grew"] <= res["placed"] * 1.15 + 4, res


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_mapped_load_equals_the_records(tmp_path, dtype):
    """Zero-copy placement maps the single-record parameters (bytes identical to the shard's), copies the fused
    ones (concatenated in place) and widens float16 dense weights only in a float32 library."""
    import tvm

    names, concat = _write(tmp_path, layers=2)
    records, _, _ = tensor_records(tmp_path)
    placed = place_params(names, concat, records, tvm.cpu(), dtype)
    widened = {n for n in names if n.endswith("norm.weight")} if dtype == "float32" else set()
    assert set(placed.mapped) == {n for n in names if n not in concat and n not in widened}
    ref = _reference(tmp_path, names, concat, dtype)
    for n, t in zip(names, placed.tensors):
        got = t.numpy()
        assert got.dtype == ref[n].dtype
        np.testing.assert_array_equal(got, ref[n])


@pytest.mark.parametrize("zero_copy", [True, False])
def test_interleaved_parameters_are_the_records_rows_interleaved(tmp_path, zero_copy):
    """A `param_interleave` parameter (CPU 3-bit g128 linears) is the concatenation of its records laid out by
    `packing.interleave_rows` (element [b, c, l] = row b * IL + l); always copied, never mapped. The fused q/k/v
    (512 + 128 + 128 rows) in blocks of 96: blocks span two records, as Llama-2-7B's 3 x 4096 rows do."""
    import tvm

    names, concat = _write(tmp_path, layers=1)
    records, _, _ = tensor_records(tmp_path)
    interleave = {"l0.qkv_proj.q_weight": 96, "l0.o_proj.q_scale": 16}
    placed = place_params(names, concat, records, tvm.cpu(), "float16", zero_copy=zero_copy, interleave=interleave)
    assert not set(placed.mapped) & set(interleave)
    ref = _reference(tmp_path, names, concat, "float16")
    for n, t in zip(names, placed.tensors):
        want = ref[n]
        if n in interleave:
            il = interleave[n]
            want = np.stack([want[b * il: (b + 1) * il].T for b in range(want.shape[0] // il)])
        np.testing.assert_array_equal(t.numpy(), want)
    assert placed.total_bytes == sum(ref[n].nbytes for n in names)
