"""Microbenchmark of the CPU matmul kernels at decode shape (M = 1) for SmolLM2-135M's linears.

    python -m bench.gemv [--kernels path/to/kernels.py] [--reps 200] [--rounds 5]

Shapes (N x K): 1536x576 (gate/up), 576x1536 (down), 576x576 (q/o), 49152x576 (tied lm_head, fp16 dense), each as
W4g128 asymmetric and as fp16 dense; float16 activations, as in the deployed model. Prints the median over
`rounds` of the mean per call over `reps` calls, in microseconds, and the 1-minute load average.
`--kernels` loads another copy of `mlc_schemes/model/kernels.py` (e.g. the previous version) for A/B runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time

import numpy as np

SHAPES = [(1536, 576), (576, 1536), (576, 576), (49152, 576)]


def _load_kernels(path):
    if path is None:
        from mlc_schemes.model import kernels
        return kernels
    spec = importlib.util.spec_from_file_location("kernels_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


def main() -> int:
    import tvm

    from mlc_schemes.compile import make_target

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", default=None)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--bits", type=int, default=4)
    args = ap.parse_args()
    kern = _load_kernels(args.kernels)
    target, dev = make_target("llvm"), tvm.cpu()
    rng = np.random.default_rng(0)
    res = {}
    for n, k in SHAPES:
        for kind in ("quant", "dense"):
            if kind == "quant" and n > 10000:
                continue
            epw = 32 // args.bits
            if kind == "quant":
                spec = kern.QuantSpec(args.bits, 128, None)
                f = kern.cpu_matmul_nt(n, k, "float16", "float16", spec)
                g = -(-k // 128)
                ws = [rng.integers(0, 2**32, (n, -(-k // epw)), dtype=np.uint32),
                      (rng.random((n, g)) * 0.01).astype(np.float16), np.full((n, g), 8, np.float16)]
            else:
                f = kern.cpu_matmul_nt(n, k, "float16", "float16", None, w_dtype="float16")
                ws = [rng.standard_normal((n, k)).astype(np.float16)]
            ex = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=target)
            a = [tvm.runtime.tensor(np.ascontiguousarray(v), dev)
                 for v in [rng.standard_normal((1, k)).astype(np.float16), *ws]]
            y = tvm.runtime.empty((1, n), "float16", dev)
            fn = ex["main"]
            for _ in range(10):
                fn(*a, y)
            times = []
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                for _ in range(args.reps):
                    fn(*a, y)
                times.append((time.perf_counter() - t0) / args.reps * 1e6)
            key = f"{kind} {n}x{k}"
            res[key] = round(statistics.median(times), 1)
            print(f"{key:22s} {res[key]:9.1f} us", flush=True)
    print(json.dumps({"load_1m": os.getloadavg()[0], "us_per_call": res}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
