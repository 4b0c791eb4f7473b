"""Microbenchmark of the CPU matmul kernels at decode shape (M = 1), or at prefill shape with --m.

    python -m bench.gemv [--shapes smollm2|llama2-7b] [--bits 4,3,8] [--int8-dot] [--isa native|avx2|avx512|CPU]
                         [--schedule avx2|avx512|sse] [--layout deployed|plain] [--m 1] [--threads 1]
                         [--kernels path/to/kernels.py]

Shapes (N x K) of the model's linears as the deployed model runs them (fused q/k/v and gate/up): SmolLM2-135M
(1728x576 qkv, 3072x576 gate_up, 576x1536 down, 576x576 o, 49152x576 tied lm_head) or Llama-2-7B. Each quantized
linear runs asymmetric g128 at every `--bits` (8 = the 8-bit embedding scheme, used for the lm_head), plus fp16
dense. float16 activations, as in the deployed model. `--isa` picks the target (LLVM mcpu), `--schedule` the
vector width / register tiles the kernels are built for (default: the target's ISA), so an AVX-512 schedule can be
run on an AVX2 machine (LLVM splits its vectors) for an A/B of the schedule alone.

Per call it prints the mean over `reps` calls of the wall time (median of `rounds`) and of the process CPU time
(lowest of `rounds`; all threads, spinning workers count), and the weight bytes streamed per wall second. On a shared machine the
CPU time with `--threads 1` is the figure to compare (a time-sliced process loses wall time, not CPU time).
`--kernels` loads another copy of `mlc_schemes/model/kernels.py` (e.g. the previous version) for A/B runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import inspect
import json
import os
import statistics
import sys
import time

import numpy as np

SHAPES = {
    "smollm2": [(1728, 576), (3072, 576), (576, 1536), (576, 576), (49152, 576)],
    "llama2-7b": [(12288, 4096), (22016, 4096), (4096, 11008), (4096, 4096), (32000, 4096)],
}


def _load_kernels(path):
    if path is None:
        from mlc_schemes.model import kernels
        return kernels
    spec = importlib.util.spec_from_file_location("kernels_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


def _weights(rng, n, k, bits):
    """Random packed q_weight / q_scale / q_zero (asymmetric, group 128) of an [n, k] linear."""
    epw = 32 // bits
    g = -(-k // 128)
    words = rng.integers(0, 2**32, (n, -(-k // epw)), dtype=np.uint32)
    if 32 % bits:  # 3-bit words keep their 2 pad bits zero
        words &= np.uint32((1 << (bits * epw)) - 1)
    return [words, (rng.random((n, g)) * 0.01).astype(np.float16), np.full((n, g), 2 ** (bits - 1), np.float16)]


def _time(fn, args, reps, rounds):
    for _ in range(5):
        fn(*args)
    wall, cpu = [], []
    for _ in range(rounds):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(reps):
            fn(*args)
        wall.append((time.perf_counter() - t0) / reps * 1e6)
        cpu.append((time.process_time() - c0) / reps * 1e6)
    return statistics.median(wall), min(cpu)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", default=None)
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="smollm2")
    ap.add_argument("--bits", default="4,3,8", help="comma list of code widths (quantized g128 asymmetric)")
    ap.add_argument("--dense", action=argparse.BooleanOptionalAction, default=True, help="also fp16 dense")
    ap.add_argument("--isa", default="native", help="target: native, avx2, avx512 or an LLVM CPU name")
    ap.add_argument("--schedule", default=None, help="kernel schedule ISA (avx512, avx2, sse); default: the target's")
    ap.add_argument("--m", type=int, default=1, help="input rows (1 = decode GEMV)")
    ap.add_argument("--int8-dot", action="store_true",
                    help="also the int8-activation 4-bit GEMV (`compile --int8-dot`), as kind q4i8")
    ap.add_argument("--layout", choices=["deployed", "plain"], default="deployed",
                    help="packed layout: as the CPU engine loads it (rows interleaved, kernels.interleave_for), or "
                         "MLC's plain [N, words] (3-bit g128: windowed GEMV)")
    ap.add_argument("--threads", type=int, default=None, help="TVM_NUM_THREADS (default: as set, else all cores)")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", default=None, help="run only shapes whose 'NxK' contains this")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        os.environ["TVM_NUM_THREADS"] = str(args.threads)
    import tvm

    from mlc_schemes.compile import make_target
    from mlc_schemes.model.isa import BY_NAME, isa_of_target, use_isa
    from mlc_schemes.packing import interleave_rows

    kern = _load_kernels(args.kernels)
    target, dev = make_target("llvm", isa=args.isa), tvm.cpu()
    sched = BY_NAME[args.schedule] if args.schedule else isa_of_target(target)
    isa_kw = {"isa": sched} if "isa" in inspect.signature(kern.cpu_matmul_nt).parameters else {}
    rng = np.random.default_rng(0)
    kinds = [int(b) for b in args.bits.split(",") if b] + (["i8"] if args.int8_dot else []) + \
        (["dense"] if args.dense else [])
    res = {}
    print(f"target mcpu {target.attrs['mcpu']}, schedule {sched.name} ({sched.lanes} lanes), M = {args.m}, "
          f"threads {os.environ.get('TVM_NUM_THREADS', 'all')}")
    print(f"{'kernel':24s} {'wall us':>10s} {'cpu us':>10s} {'GB/s':>7s}")
    # kernels that emit target-only instructions (gemv_lookup) check the target, not the schedule
    with use_isa(isa_of_target(target)):
        for n, k in SHAPES[args.shapes]:
            if args.only and args.only not in f"{n}x{k}":
                continue
            for kind in kinds:
                if kind == "dense":
                    f = kern.cpu_matmul_nt(n, k, "float16", "float16", None, w_dtype="float16", **isa_kw)
                    ws = [rng.standard_normal((n, k)).astype(np.float16)]
                elif kind == "i8":
                    f = kern.cpu_matmul_nt(n, k, "float16", "float16", kern.QuantSpec(4, 128, None), int8_dot=True,
                                           **isa_kw)
                    ws = _weights(rng, n, k, 4)
                else:
                    spec = kern.QuantSpec(kind, 128, None)
                    ws = _weights(rng, n, k, kind)
                    if args.layout == "deployed" and hasattr(kern, "interleave_for"):
                        spec = dataclasses.replace(spec, interleave=kern.interleave_for(spec, n, k, sched))
                    if getattr(spec, "interleave", 0):  # the row-interleaved layout the engine loads
                        ws = [interleave_rows(w, spec.interleave) for w in ws]
                    f = kern.cpu_matmul_nt(n, k, "float16", "float16", spec, **isa_kw)
                ex = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=target)
                a = [tvm.runtime.tensor(np.ascontiguousarray(v), dev)
                     for v in [rng.standard_normal((args.m, k)).astype(np.float16), *ws]]
                y = tvm.runtime.empty((args.m, n), "float16", dev)
                wall, cpu = _time(ex["main"], [*a, y], args.reps, args.rounds)
                nbytes = sum(w.nbytes for w in ws)
                key = f"{ {'dense': 'f16', 'i8': 'q4i8'}.get(kind, f'q{kind}')} {n}x{k}"
                res[key] = {"wall_us": round(wall, 1), "cpu_us": round(cpu, 1), "gb_per_s": round(nbytes / wall / 1e3, 2)}
                print(f"{key:24s} {wall:10.1f} {cpu:10.1f} {nbytes / wall / 1e3:7.2f}", flush=True)
    out = {"load_1m": os.getloadavg()[0], "mcpu": str(target.attrs["mcpu"]), "schedule": sched.name, "m": args.m,
           "layout": args.layout, "threads": os.environ.get("TVM_NUM_THREADS"), "results": res}
    print(f"load average {out['load_1m']:.1f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
