"""Where a decoded token's time goes in a compiled CPU model: per-kernel time from the Relax VM's instrument hook.

    python -m bench.profile_decode --model PACKED_DIR --lib LIB.so [--prompt-len 128] [--tokens 32] [--top 15]
                                   [--clock wall|cpu]

Prefills a seeded random prompt, times `--tokens` decode steps plainly (ms/token), then again with an instrument
callback around every VM call and prints the summed time per kernel per token. The callback itself costs about a
microsecond per call, so the instrumented total exceeds the plain one; compare kernels within one printout.
`--clock cpu` times this thread's CPU time instead of wall time: with TVM_NUM_THREADS=1 (the kernels then run on
the calling thread) it counts only the time the kernels computed, which a loaded, time-sliced machine inflates far
less than wall time. Loads TVM's runtime only, as a deployed engine does.
"""

from __future__ import annotations

import argparse
import collections
import time

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="packed weights dir")
    ap.add_argument("--lib", required=True, help="llvm model library compiled for it")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = ap.parse_args()

    from mlc_schemes.engine import Engine, import_tvm_runtime

    import_tvm_runtime()
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    eng = Engine(args.model, args.lib, verify=False)
    ids = np.random.default_rng(0).integers(0, eng.vocab, args.prompt_len + args.tokens)
    eng.prefill(ids[: args.prompt_len])
    for t in ids[:8]:  # warm-up
        eng.decode(int(t))
    t0 = clock()
    for t in ids[: args.tokens]:
        eng.decode(int(t))
    plain = (clock() - t0) / args.tokens
    print(f"decode {plain * 1e3:.2f} ms/token ({1 / plain:.1f} tok/s), context {args.prompt_len + 8}+")

    seconds, calls, start = collections.defaultdict(float), collections.Counter(), {}

    def instrument(func, name, before, ret, *fargs):
        if before:
            start["t"] = clock()
        else:
            seconds[name] += clock() - start["t"]
            calls[name] += 1
        return 0

    eng.vm.set_instrument(instrument)
    for t in ids[args.prompt_len: args.prompt_len + args.tokens]:
        eng.decode(int(t))
    n = args.tokens
    print(f"instrumented total {sum(seconds.values()) / n * 1e3:.2f} ms/token")
    for name, s in sorted(seconds.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"{s / n * 1e3:8.3f} ms {calls[name] // n:5d} calls  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
