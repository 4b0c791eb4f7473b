"""Decode benchmark on the real model (SmolLM2-135M): compiled TVM W4g128 / W3g128 / fp16 vs torch fp32 eager vs
llama.cpp (its own Q4_1 GGUF through llama-cpp-python), same threads, same prompt length and new tokens, for one or
two x86 instruction sets side by side.

    python -m bench.decode                 # native pair: our library for this CPU vs llama.cpp GGML_NATIVE=ON
    python -m bench.decode --isa avx2      # + the AVX2 pair: ours with mcpu x86-64-v3 vs llama.cpp built for
                                           #   AVX2/FMA/F16C/BMI2 with AVX-512 off (GGML_NATIVE=OFF)
    [--threads 2] [--prompt-len 128] [--gen-len 128] [--epochs 0] [--repeats 3] [--skip-llamacpp] [--no-native]
    [--llamacpp each|native]
    [--embedding-scheme w8a16g128asym|none] [--no-int8-dot] [--ppl-windows 4]

Pipeline per scheme (cached under --work): calibrate (RTN with --epochs 0, OmniQuant LWC otherwise) -> pack (the
tied embedding / lm_head with --embedding-scheme, default 8-bit like the GGUF's Q8_0 token_embd) -> compile for llvm
(float16 compute) once per instruction set (`--isa`: native = this machine's mcpu, avx2 = x86-64-v3, avx512 =
x86-64-v4, or an LLVM CPU name), W4 a second time with `--int8-dot` (int8 activations in the 4-bit decode GEMVs,
as llama.cpp's Q4 dots; its perplexity through decode steps beside the exact W4's is printed after timing); fp16 baseline = the HF weights packed unquantized (native only). Each engine runs in
its own subprocess (thread count pinned, RSS per engine). llama-cpp-python is built from source once per
instruction set into build/bench/venvs/llamacpp-<isa> (a few minutes each; `LLAMACPP_CMAKE` holds the flags) and
reports the ISA it was built for (its system_info, kept in the JSON). An instruction set this CPU lacks (AVX-512
here on a Zen 3) is refused: its code cannot run here.
Speed is the measured quantity; token ids are the same seeded random prompt for every engine, decoding is greedy.
Decode tok/s is wall time per token after the prefill (sampling and the Python loop included) for every engine.
The engines take turns for --repeats rounds and the median is reported (the JSON keeps every run, each with the
1-minute load average at its start, plus the CPU model and its vector flags).
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
LLAMACPP_VENVS = REPO / "build/bench/venvs"
LLAMACPP_PIN = "llama-cpp-python==0.3.36"
_X86 = "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_BMI2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
# llama.cpp's CMake flags per --isa (the same levels as our mcpu: x86-64-v3 / -v4).
LLAMACPP_CMAKE = {
    "native": "-DGGML_NATIVE=ON",
    "avx2": _X86 + " -DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF"
                   " -DGGML_AVX512_BF16=OFF",
    "avx512": _X86 + " -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON",
}
# /proc/cpuinfo flags an instruction set needs (checked before its code runs here).
ISA_FLAGS = {"avx2": {"avx2", "fma", "f16c", "bmi2"}, "avx512": {"avx512f", "avx512bw", "avx512dq", "avx512vl"}}
BITS = (4, 3)  # code widths of the quantized libraries (g128 asymmetric), --bits
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
                      "peak_rss_mib": round(peak_rss_mib(), 1),
                      "system_info": llama_cpp.llama_print_system_info().decode().strip()}))
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
                 embedding_scheme: str | None = "w8a16g128asym", isa: str = "native",
                 dense: bool = True, int8_dot: bool = True, bits: tuple[int, ...] = BITS
                 ) -> dict[str, tuple[Path, Path, bool]]:
    """-> {label: (packed dir, library, int8 dot)} for each code width of `bits` at g128 (W4 also with `compile
    --int8-dot` when `int8_dot`; fp16 with `dense`) compiled for `isa`, built once and cached in `work`."""
    from mlc_schemes import pack_checkpoint
    from mlc_schemes.compile import (
        compile_packed,
        cpu_mcpu,
        read_library_meta_if_fits,
        read_packed_model,
    )
    from mlc_schemes.dense_pack import pack_dense_fp16
    from omniquant.calibrate import calibrate_checkpoint

    out, gs = {}, 128
    for b in bits:
        scheme, fq = f"w{b}a16g{gs}asym", work / f"fq-w{b}g{gs}-e{epochs}"
        if not fq.exists():
            # RTN (epochs 0) needs no calibration data: one short sample keeps the block pass cheap.
            calibrate_checkpoint(hf_dir, fq, wbits=b, group_size=gs, epochs=epochs, lwc=epochs > 0,
                                 nsamples=16 if epochs else 1, seqlen=512 if epochs else 64, calib_data=calib_data)
        emb = f"-emb-{embedding_scheme}" if embedding_scheme else ""
        packed = work / f"packed-{scheme}-e{epochs}{emb}"
        if not packed.exists():
            pack_checkpoint(fq, scheme, packed, embedding_scheme=embedding_scheme)
        label = f"tvm {scheme}" + (f" + {embedding_scheme.split('a16')[0]} embedding" if embedding_scheme else "")
        out[label] = (packed, work / f"lib-{scheme}-e{epochs}{emb}-{isa}.so", False)
        if int8_dot and b == 4:
            out[label + ", int8 dot"] = (packed, work / f"lib-{scheme}-e{epochs}{emb}-{isa}-int8dot.so", True)
    if dense:
        dense_dir = work / "packed-fp16"
        if not dense_dir.exists():
            pack_dense_fp16(hf_dir, dense_dir)
        out["tvm fp16"] = (dense_dir, work / f"lib-fp16-{isa}.so", False)
    mcpu = cpu_mcpu(isa)
    for packed, lib, i8 in out.values():
        meta = read_library_meta_if_fits(lib, read_packed_model(packed), int8_dot=i8)
        if not meta or (meta.get("cpu_isa") or {}).get("mcpu") != mcpu:
            print(f"compiling {packed.name} -> {lib.name} (mcpu {mcpu})", file=sys.stderr, flush=True)
            compile_packed(packed, "llvm", lib, dtype="float16", isa=isa, int8_dot=i8)
    return out


def llamacpp_venv(isa: str) -> Path:
    return LLAMACPP_VENVS / f"llamacpp-{isa}"


def ensure_llamacpp(isa: str = "native") -> Path:
    """The python of a venv holding llama-cpp-python built from source with `LLAMACPP_CMAKE[isa]` (built on first
    use; a marker file records the pin and flags, so other flags rebuild it)."""
    venv = llamacpp_venv(isa)
    py, marker = venv / "bin" / "python", venv / ".bench-built"
    want = f"{LLAMACPP_PIN} {LLAMACPP_CMAKE[isa]}"
    ok = py.is_file() and marker.is_file() and marker.read_text().strip() == want and \
        subprocess.run([str(py), "-c", "import llama_cpp"], check=False, capture_output=True).returncode == 0
    if not ok:
        print(f"building {LLAMACPP_PIN} for {isa} into {venv} (a few minutes): CMAKE_ARGS={LLAMACPP_CMAKE[isa]}",
              file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-cache-dir", "--force-reinstall", LLAMACPP_PIN,
                        "numpy"], check=True, env=dict(os.environ, CMAKE_ARGS=LLAMACPP_CMAKE[isa]))
        marker.write_text(want)
    return py


def cpu_flags() -> set[str]:
    """This CPU's flags from /proc/cpuinfo (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def check_isa_runs_here(isa: str) -> None:
    from omniquant.errors import UserError

    if isa == "native":
        return
    missing = ISA_FLAGS.get(isa, set()) - cpu_flags()
    if isa not in LLAMACPP_CMAKE:
        raise UserError(f"--isa {isa!r}: choose native, avx2 or avx512 (llama.cpp is built per instruction set)")
    if missing:
        raise UserError(f"--isa {isa}: this CPU lacks {', '.join(sorted(missing))}, so code built for {isa} cannot "
                        "run here (compile-only: `omniquant compile --isa ...`)")


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=REPO / "build/models/smollm2-135m-instruct")
    ap.add_argument("--work", type=Path, default=REPO / "build/bench/decode")
    ap.add_argument("--isa", default="native",
                    help="instruction set of the second pair (ours + llama.cpp): avx2 or avx512; native = this CPU")
    ap.add_argument("--no-native", action="store_true", help="with --isa: skip the native pair")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=0, help="0 = RTN (speed does not depend on the calibration)")
    ap.add_argument("--bits", default=",".join(map(str, BITS)),
                    help="code widths of the quantized libraries, g128 asymmetric (default: %(default)s; 2 adds W2)")
    ap.add_argument("--embedding-scheme", default="w8a16g128asym",
                    help="scheme of the tied embedding / lm_head in the quantized libraries ('none': float16)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds over all engines; the median is reported")
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--llamacpp", choices=("each", "native"), default="each",
                    help="each: llama.cpp built for every --isa; native: its native build only (on a CPU without "
                         "AVX-512 that is AVX2 code, as its system_info line in the JSON shows)")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--no-int8-dot", action="store_true", help="skip the W4 library compiled with --int8-dot")
    ap.add_argument("--ppl-windows", type=int, default=4,
                    help="perplexity of the W4 libraries (exact and int8 dot) through decode steps on this many "
                         "256-token windows of the evaluation text, after timing (0: skip)")
    ap.add_argument("--skip-fp16", action="store_true", help="skip the fp16 dense TVM library")
    ap.add_argument("--json", type=Path, default=None, help="default build/bench/decode-<isas>.json")
    args = ap.parse_args()

    from bench.machine import cpu_model
    from mlc_schemes.compile import cpu_mcpu, host_cpu
    from omniquant.paths import CALIB_BOOKS, EVAL_BOOKS, austen_dir
    from omniquant.real_model import find_gguf, prepare_smollm2

    isas = ([] if args.no_native or args.isa == "native" else ["native"]) + [args.isa]
    isas = ["native"] + [i for i in isas if i != "native"] if "native" in isas else isas
    for isa in isas:
        check_isa_runs_here(isa)
    hf_dir = args.model if args.model.is_dir() else prepare_smollm2(args.model)
    args.work.mkdir(parents=True, exist_ok=True)
    emb = None if args.embedding_scheme in ("none", "") else args.embedding_scheme
    env = _env(args.threads)
    n = [str(args.threads), str(args.prompt_len), str(args.gen_len)]
    engines = []  # (name, isa, command, JSON file written by the command or None = last JSON line of its stdout)
    for isa in isas:
        libs = prepare_libs(hf_dir, args.work, args.epochs, str(austen_dir() / CALIB_BOOKS[0]), emb, isa,
                            dense=isa == "native" and not args.skip_fp16, int8_dot=not args.no_int8_dot,
                            bits=tuple(int(b) for b in args.bits.split(",") if b))
        if isa == isas[0]:
            w4_libs = {label: (packed, lib) for label, (packed, lib, _) in libs.items() if "w4a16" in label}
        for label, (packed, lib, _i8) in libs.items():
            out = args.work / f"eval-{lib.stem}.json"
            engines.append((f"{label} (f16 compute) [{isa}]", isa,
                            [sys.executable, "-m", "omniquant", "chat", "--model", str(packed), "--lib", str(lib),
                             "--evaluate", "--eval-prompt-len", str(args.prompt_len), "--eval-gen-len",
                             str(args.gen_len), "--json", str(out)], out))
        if not args.skip_llamacpp and (args.llamacpp == "each" or isa == "native"):
            engines.append((f"llama.cpp Q4_1 (GGUF) [{isa}]", isa,
                            [str(ensure_llamacpp(isa)), "-c", LLAMACPP_SCRIPT, str(find_gguf()), *n], None))
    if not args.skip_torch:
        engines.append(("torch fp32 eager", None, [sys.executable, "-c", TORCH_SCRIPT, str(hf_dir), *n], None))

    keep = METRICS + ("decode_tok_per_s_internal", "rss_split")
    runs: dict[str, list[dict]] = {name: [] for name, *_ in engines}
    info: dict[str, str] = {}
    # Engines take turns, `repeats` rounds: a slow spell of a shared machine hits all of them, and the median of
    # each is reported.
    for rep in range(args.repeats):
        for name, _isa, cmd, out in engines:
            load = os.getloadavg()[0]
            r = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
            if r.returncode != 0:
                print(f"{name} failed (exit {r.returncode}; -11 = segfault):\n{r.stderr[-3000:]}", file=sys.stderr)
                continue
            res = json.loads(out.read_text()) if out is not None else _last_json(r.stdout)
            if "system_info" in res:
                info[name] = res["system_info"]
            runs[name].append({k: res[k] for k in keep if k in res} | {"load_1m": round(load, 2)})
            print(json.dumps({"engine": name, "round": rep, **runs[name][-1]}), flush=True)
    rows = [{"engine": name, "isa": isa, "mcpu": (cpu_mcpu(isa) if isa and not name.startswith("llama") else None),
             "llamacpp_cmake": LLAMACPP_CMAKE[isa] if name.startswith("llama") else None,
             "llamacpp_system_info": info.get(name),
             **{k: _median(r.get(k) for r in runs[name]) for k in METRICS + ("load_1m",)}, "runs": runs[name]}
            for name, isa, *_ in engines if runs[name]]

    quality = {}
    if args.ppl_windows and w4_libs:
        # What int8 activations cost: the same windows scored one token at a time through the decode kernels.
        from transformers import AutoTokenizer

        from mlc_schemes.engine import tvm_perplexity
        from omniquant.data import load_tokens

        tokens = load_tokens(AutoTokenizer.from_pretrained(hf_dir), str(austen_dir() / EVAL_BOOKS[0]), "eval")
        for label, (packed, lib) in w4_libs.items():
            quality[label] = tvm_perplexity(packed, lib, tokens, 256, args.ppl_windows, steps="decode")
            print(f"perplexity through decode steps ({args.ppl_windows} x 256 tokens of {EVAL_BOOKS[0]}), "
                  f"{label} [{isas[0]}]: {quality[label]:.4f}", flush=True)
    load = os.getloadavg()[0]
    flags = sorted(f for f in cpu_flags() if f.startswith(("avx", "fma", "f16c", "bmi", "sse4", "amx")))
    print(f"\n{args.prompt_len}-token prompt + {args.gen_len} new tokens, {args.threads} threads, median of "
          f"{args.repeats} rounds, load average {load:.1f} on {os.cpu_count()} CPUs ({cpu_model()}, LLVM cpu "
          f"{host_cpu()}; {' '.join(flags)})")
    print(f"{'engine':58s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'peak RSS MiB':>13s} {'load':>5s}")
    for r in rows:
        print(f"{r['engine']:58s} {r['prefill_tok_per_s'] or 0:14.1f} {r['decode_tok_per_s'] or 0:13.1f} "
              f"{r['peak_rss_mib'] or 0:13.1f} {r['load_1m'] or 0:5.1f}")
    path = args.json or REPO / f"build/bench/decode-{'-'.join(isas)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"threads": args.threads, "prompt_len": args.prompt_len, "gen_len": args.gen_len,
                                "repeats": args.repeats, "isas": isas,
                                "ppl_decode_steps": {"text": EVAL_BOOKS[0], "seqlen": 256, "windows": args.ppl_windows,
                                                     "isa": isas[0], "ppl": quality} if quality else None,
                                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                "embedding_scheme": emb, "cpu_model": cpu_model(), "llvm_host_cpu": host_cpu(),
                                "cpu_flags": flags, "load_average_1m": load, "cpu": os.uname().machine,
                                "cpus": os.cpu_count(), "rows": rows}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
