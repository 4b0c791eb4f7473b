"""CUDA check + decode bench of compiled libraries on a GPU machine (runs with the TVM runtime only).

1. Tiny model: greedy tokens of the CUDA libraries (float32 and float16 compute) vs the CPU (llvm) tokens stored
   in `<tiny>/ref.json` by the compile machine.
2. `--random-weights --preset llama2-7b` decode for each given library: prefill / decode tok/s, device memory, and
   the fraction of the memory-bandwidth roofline (bytes read per decode token / measured copy bandwidth).
Prints a table and writes JSON.  Usage: python bench/tvm_gpu_check.py --tiny DIR --lib7b W4.so W3.so F16.so --out F
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def copy_bandwidth_gbs() -> float | None:
    """Device-to-device copy bandwidth (read + write bytes / s), via torch if present."""
    try:
        import torch
    except ImportError:
        return None
    a = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / 10
    bw = 2 * a.numel() / dt / 1e9
    del a, b
    torch.cuda.empty_cache()
    return bw


def tiny_check(tiny: Path) -> dict:
    from mlc_schemes.engine import Engine

    ref = json.loads((tiny / "ref.json").read_text())
    ids = ref["prompt_ids"]
    out = {}
    for name, lib, key in (("cuda_fp32", "cuda32.so", "cpu32"), ("cuda_fp16", "cuda16.so", "cpu16")):
        eng = Engine(tiny / "packed", tiny / lib)
        toks = eng.generate_ids(ids, len(ref[key]), stop_on_eos=False)
        eng.reset()
        first = eng.prefill(ids)
        cpu_first = np.array(ref[key + "_logits_first"])
        out[name] = {"tokens_equal_cpu": toks == ref[key],
                     "agree_prefix": next((i for i, (a, b) in enumerate(zip(toks, ref[key])) if a != b), len(toks)),
                     "n": len(toks), "max_abs_logit_diff_first": float(np.abs(first - cpu_first).max()),
                     "logit_scale": float(np.abs(cpu_first).max())}
    return out


def bench_7b(lib: Path, scheme: str, prompt_len: int, gen_len: int, bw: float | None) -> dict:
    from mlc_schemes.chat_cli import _evaluate
    from mlc_schemes.engine import Engine
    from mlc_schemes.random_model import random_packed_model

    pm, params = random_packed_model("llama2-7b", scheme, context=prompt_len + gen_len + 16)
    mc = pm.chat["model_config"]
    weight_bytes = sum(a.nbytes for n, a in params.items() if n != "model.embed_tokens.weight")
    weight_bytes += mc["hidden_size"] * 2  # one embedding row
    kv_pos = prompt_len + gen_len / 2
    kv_bytes = 2 * mc["num_hidden_layers"] * mc["num_key_value_heads"] * mc["head_dim"] * kv_pos * 2
    eng = Engine(pm, lib, params=params)
    del params
    res = _evaluate(eng, prompt_len, gen_len, 0)
    res["bytes_per_decode_token_gb"] = round((weight_bytes + kv_bytes) / 1e9, 3)
    if bw:
        roof = bw * 1e9 / (weight_bytes + kv_bytes)
        res["copy_bandwidth_gbs"] = round(bw, 1)
        res["roofline_tok_per_s"] = round(roof, 1)
        res["roofline_fraction"] = round(res["decode_tok_per_s"] / roof, 3)
    res["scheme"] = scheme
    del eng
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", type=Path)
    ap.add_argument("--lib7b", nargs="*", default=[], help="lib paths; scheme read from <lib>.json")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    result: dict = {}
    if args.tiny:
        result["tiny"] = tiny_check(args.tiny)
        print(json.dumps(result["tiny"], indent=1), flush=True)
    bw = copy_bandwidth_gbs() if args.lib7b else None
    rows = []
    for lib in args.lib7b:
        meta = json.loads(Path(lib + ".json").read_text())
        rows.append(bench_7b(Path(lib), meta["quantization"], args.prompt_len, args.gen_len, bw))
        print(json.dumps(rows[-1]), flush=True)
    result["llama2_7b_random"] = rows
    if rows:
        print(f"{'scheme':16s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'roofline':>9s} {'cuda MiB':>9s}")
        for r in rows:
            print(f"{r['scheme']:16s} {r['prefill_tok_per_s']:14.1f} {r['decode_tok_per_s']:13.1f} "
                  f"{r.get('roofline_fraction', float('nan')):9.3f} {r.get('cuda_used_mib')!s:>9s}")
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
