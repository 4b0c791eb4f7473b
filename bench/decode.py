"""Decode benchmark on the real model (SmolLM2-135M): compiled TVM W4g128 / W3g128 / fp16 vs torch fp32 eager vs
llama.cpp (its own Q4_1 GGUF through llama-cpp-python), same threads, same prompt length and new tokens.

    python -m bench.decode [--threads 2] [--prompt-len 128] [--gen-len 128] [--epochs 0] [--skip-llamacpp]
                           [--embedding-scheme w8a16g128asym|none]

Pipeline per scheme (cached under --work): calibrate (RTN with --epochs 0, OmniQuant LWC otherwise) -> pack (the
tied embedding / lm_head with --embedding-scheme, default 8-bit like the GGUF's Q8_0 token_embd) -> compile for llvm
(host CPU, float16 compute); fp16 baseline = the HF weights packed unquantized. Each engine runs in
its own subprocess (thread count pinned, RSS per engine). llama-cpp-python is built from source into
build/bench/venvs/llamacpp with CMAKE_ARGS=-DGGML_NATIVE=ON (a few minutes, once). Prints a table, writes JSON.
Speed is the measured quantity; token ids are the same seeded random prompt for every engine, decoding is greedy.
Decode tok/s is wall time per token after the prefill (sampling and the Python loop included) for every engine.
The engines take turns for --repeats rounds and the median is reported (the JSON keeps every run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LLAMACPP_VENV = REPO / "build/bench/venvs/llamacpp"
LLAMACPP_PIN = "llama-cpp-python==0.3.36"
SCHEMES = {"w4a16g128asym": (4, 128), "w3a16g128asym": (3, 128)}
METRICS = ("prefill_tok_per_s", "decode_tok_per_s", "peak_rss_mib")

TORCH_SCRIPT = textwrap.dedent("""
    import json, sys, time, numpy as np, torch
    from transformers import AutoModelForCausalLM
    from mlc_schemes.engine import peak_rss_mib
    model_dir, threads, plen, glen = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor(np.random.default_rng(0).integers(0, model.config.vocab_size, plen))[None]
    def run():
        with torch.no_grad():
            t0 = time.perf_counter(); out = model(ids, use_cache=True); t1 = time.perf_counter()
            past, tok = out.past_key_values, out.logits[0, -1].argmax().view(1, 1)
            for _ in range(glen - 1):
                out = model(tok, past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, out.logits[0, -1].argmax().view(1, 1)
            t2 = time.perf_counter()
        return plen / (t1 - t0), (glen - 1) / (t2 - t1)
    run()  # warm-up
    p, d = run()
    print(json.dumps({"prefill_tok_per_s": round(p, 2), "decode_tok_per_s": round(d, 2),
                      "peak_rss_mib": round(peak_rss_mib(), 1)}))
""")

LLAMACPP_SCRIPT = textwrap.dedent("""
    import json, sys, time, numpy as np
    import llama_cpp
    from llama_cpp import Llama
    from mlc_schemes.engine import peak_rss_mib  # numpy only (PYTHONPATH = this repository)
    gguf, threads, plen, glen = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    # verbose=False segfaulted in 0.3.36 on an earlier machine (its stdout/stderr suppression); logs go to stderr.
    llm = Llama(model_path=gguf, n_threads=threads, n_threads_batch=threads, n_ctx=plen + glen + 16, verbose=True)
    ids = np.random.default_rng(0).integers(0, llm.n_vocab(), plen).tolist()
    # Greedy, EOS suppressed so every run makes glen tokens.
    kw = dict(temperature=0.0, top_k=1, logit_bias={llm.token_eos(): -1e9})
    def timed(n):
        llm.reset()
        llama_cpp.llama_perf_context_reset(llm.ctx)
        t0 = time.perf_counter(); llm.create_completion(ids, max_tokens=n, **kw); return time.perf_counter() - t0
    timed(4)  # warm-up
    t_first = min(timed(1) for _ in range(2))  # prefill + first token
    t_all = timed(glen)
    perf = llama_cpp.llama_perf_context(llm.ctx)  # llama.cpp's own timer of the last run's decode steps
    print(json.dumps({"prefill_tok_per_s": round(plen / t_first, 2),
                      "decode_tok_per_s": round((glen - 1) / (t_all - t_first), 2),
                      "decode_tok_per_s_internal": round(perf.n_eval / perf.t_eval_ms * 1000, 2),
                      "peak_rss_mib": round(peak_rss_mib(), 1)}))
""")


def _last_json(out: str) -> dict:
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no JSON result in output:\n{out[-2000:]}")


def _env(threads: int) -> dict:
    env = dict(os.environ, TVM_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


def prepare_libs(hf_dir: Path, work: Path, epochs: int, calib_data: str,
                 embedding_scheme: str | None = "w8a16g128asym") -> dict[str, tuple[Path, Path]]:
    """-> {label: (packed dir, library)} for W4g128, W3g128 and fp16, built once and cached in `work`."""
    from mlc_schemes import pack_checkpoint
    from mlc_schemes.compile import compile_packed, read_library_meta_if_fits, read_packed_model
    from mlc_schemes.dense_pack import pack_dense_fp16
    from omniquant.calibrate import calibrate_checkpoint

    out = {}
    for scheme, (bits, gs) in SCHEMES.items():
        fq = work / f"fq-w{bits}g{gs}-e{epochs}"
        if not fq.exists():
            # RTN (epochs 0) needs no calibration data: one short sample keeps the block pass cheap.
            calibrate_checkpoint(hf_dir, fq, wbits=bits, group_size=gs, epochs=epochs, lwc=epochs > 0,
                                 nsamples=16 if epochs else 1, seqlen=512 if epochs else 64, calib_data=calib_data)
        emb = f"-emb-{embedding_scheme}" if embedding_scheme else ""
        packed = work / f"packed-{scheme}-e{epochs}{emb}"
        if not packed.exists():
            pack_checkpoint(fq, scheme, packed, embedding_scheme=embedding_scheme)
        label = f"tvm {scheme}" + (f" + {embedding_scheme.split('a16')[0]} embedding" if embedding_scheme else "")
        out[label] = (packed, work / f"lib-{scheme}-e{epochs}{emb}.so")
    dense = work / "packed-fp16"
    if not dense.exists():
        pack_dense_fp16(hf_dir, dense)
    out["tvm fp16"] = (dense, work / "lib-fp16.so")
    for packed, lib in out.values():
        if not read_library_meta_if_fits(lib, read_packed_model(packed)):
            print(f"compiling {packed.name} -> {lib.name}", file=sys.stderr, flush=True)
            compile_packed(packed, "llvm", lib, dtype="float16")
    return out


def ensure_llamacpp() -> Path:
    py = LLAMACPP_VENV / "bin" / "python"
    ok = py.is_file() and subprocess.run([str(py), "-c", "import llama_cpp"], capture_output=True).returncode == 0
    if not ok:
        print(f"building {LLAMACPP_PIN} into {LLAMACPP_VENV} (a few minutes)", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(LLAMACPP_VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", LLAMACPP_PIN, "numpy"], check=True,
                       env=dict(os.environ, CMAKE_ARGS="-DGGML_NATIVE=ON"))
    return py


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=REPO / "build/models/smollm2-135m-instruct")
    ap.add_argument("--work", type=Path, default=REPO / "build/bench/decode")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=0, help="0 = RTN (speed does not depend on the calibration)")
    ap.add_argument("--embedding-scheme", default="w8a16g128asym",
                    help="scheme of the tied embedding / lm_head in the quantized libraries ('none': float16)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds over all engines; the median is reported")
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--json", type=Path, default=REPO / "build/bench/decode.json")
    args = ap.parse_args()

    from bench.machine import cpu_model
    from omniquant.paths import CALIB_BOOKS, austen_dir
    from omniquant.real_model import find_gguf, prepare_smollm2

    hf_dir = args.model if args.model.is_dir() else prepare_smollm2(args.model)
    args.work.mkdir(parents=True, exist_ok=True)
    emb = None if args.embedding_scheme in ("none", "") else args.embedding_scheme
    libs = prepare_libs(hf_dir, args.work, args.epochs, str(austen_dir() / CALIB_BOOKS[0]), emb)
    env = _env(args.threads)
    n = [str(args.threads), str(args.prompt_len), str(args.gen_len)]
    engines = []  # (name, command, JSON file written by the command or None = last JSON line of its stdout)
    for label, (packed, lib) in libs.items():
        out = args.work / f"eval-{lib.stem}.json"
        engines.append((label + " (f16 compute)", [sys.executable, "-m", "omniquant", "chat", "--model", str(packed),
                                                   "--lib", str(lib), "--evaluate", "--eval-prompt-len",
                                                   str(args.prompt_len), "--eval-gen-len", str(args.gen_len),
                                                   "--json", str(out)], out))
    if not args.skip_torch:
        engines.append(("torch fp32 eager", [sys.executable, "-c", TORCH_SCRIPT, str(hf_dir), *n], None))
    if not args.skip_llamacpp:
        engines.append(("llama.cpp Q4_1 (GGUF)", [str(ensure_llamacpp()), "-c", LLAMACPP_SCRIPT, str(find_gguf()), *n],
                        None))

    runs: dict[str, list[dict]] = {name: [] for name, _, _ in engines}
    # Engines take turns, `repeats` rounds: a slow spell of a shared machine hits all of them, and the median of
    # each is reported.
    for rep in range(args.repeats):
        for name, cmd, out in engines:
            r = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if r.returncode != 0:
                print(f"{name} failed (exit {r.returncode}; -11 = segfault):\n{r.stderr[-3000:]}", file=sys.stderr)
                continue
            res = json.loads(out.read_text()) if out is not None else _last_json(r.stdout)
            runs[name].append({k: res.get(k) for k in METRICS + ("decode_tok_per_s_internal",) if k in res})
            print(json.dumps({"engine": name, "round": rep, **runs[name][-1]}), flush=True)
    rows = [{"engine": name, **{k: statistics.median(r[k] for r in rs) for k in METRICS}, "runs": rs}
            for name, rs in runs.items() if rs]

    load = os.getloadavg()[0]
    print(f"\n{args.prompt_len}-token prompt + {args.gen_len} new tokens, {args.threads} threads, median of "
          f"{args.repeats} rounds, load average {load:.1f} on {os.cpu_count()} CPUs ({cpu_model()})")
    print(f"{'engine':44s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'peak RSS MiB':>13s}")
    for r in rows:
        print(f"{r['engine']:44s} {r['prefill_tok_per_s'] or 0:14.1f} {r['decode_tok_per_s'] or 0:13.1f} "
              f"{r['peak_rss_mib'] or 0:13.1f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"threads": args.threads, "prompt_len": args.prompt_len, "gen_len": args.gen_len,
                                     "repeats": args.repeats, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                     "embedding_scheme": emb, "cpu_model": cpu_model(),
                                     "load_average_1m": load, "cpu": os.uname().machine, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
