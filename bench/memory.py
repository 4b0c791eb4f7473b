"""Memory benchmark: a Llama-2-7B-shaped model (random float16 weights) through the whole chain, stage by stage.

    python -m bench.memory [--layers 16,32] [--stages write,calibrate,pack,compile,chat,decode,paper]
                           [--work build/bench/memory] [--keep] [--repeats 3] [--threads 2]

Stages (each a separate process; its peak RSS is its own VmHWM, read at exit):
  write      random-weight checkpoint of Llama-2-7B's shapes, float16 N(0, 0.02) (a tiled block of 4M random values),
             one safetensors shard per layer (+ one for the embedding / final norm / lm_head), written shard by
             shard; the 16-layer cut links the first 16 shards
  calibrate  `omniquant calibrate` RTN (--epochs 0 --no-lwc), W4 g128
  pack       `omniquant pack` of the RTN checkpoint, w4a16g128asym + 8-bit embedding / lm_head
  compile    `omniquant compile --target llvm` (float16 compute)
  chat       `omniquant chat --evaluate` (128-token prompt, 128 new tokens)
  lwc        `omniquant calibrate` with LWC, 1 epoch of 2 x 128-token windows (the block-wise loop and training)
  decode     the compiled model (as compiled, and with `compile --int8-dot`: int8 activations in the 4-bit decode
             GEMVs, as llama.cpp's Q4 dots) vs llama.cpp (llama-cpp-python, built as in bench/decode.py) on GGUFs of the same
             shapes with random Q4_0 and Q4_1 linears (Q8_0 embedding / output, like our 8-bit embedding), 2 threads
             each, engines taking turns for --repeats rounds (median), under the timing lock /tmp/omq-timing.lock
  paper      the same memory figures computed on paper for 7B, 13B and 70B (CPU RAM and GPU memory)

Memory and sizes are the measured quantities of write..chat: run those under `nice -n 15` on a shared machine. The
decode stage times engines: run it at normal priority (it takes the timing lock itself, waiting for other timing
runs). Finished stages are not rerun (their results are kept in the JSON); --redo STAGE reruns one. Big intermediates are
deleted when no later stage needs them (the RTN checkpoint after packing, the LWC one after it is measured, GGUFs
after decoding) unless --keep, so the disk holds the source plus one fake-quant checkpoint at a time. Writes bench/results/memory-llama2-7b-<L>L.json and prints a table.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench/results"
STAGES = ("write", "calibrate", "pack", "compile", "chat", "lwc", "decode", "paper")
TIMING_LOCK = "/tmp/omq-timing.lock"
SCHEME, EMBED_SCHEME = "w4a16g128asym", "w8a16g128asym"
GIB = 1024**3

SHAPES = {  # Llama-2 family: hidden, intermediate, layers, heads, kv heads, vocab
    "7b": (4096, 11008, 32, 32, 32, 32000),
    "13b": (5120, 13824, 40, 40, 40, 32000),
    "70b": (8192, 28672, 80, 64, 8, 32000),
}

# Runs a module's CLI in this process and writes its peak RSS (VmHWM, kB) to $BENCH_VMHWM at exit.
WRAPPER = textwrap.dedent("""
    import atexit, os, runpy, sys
    def _report():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                open(os.environ["BENCH_VMHWM"], "w").write(line.split()[1])
    atexit.register(_report)
    module, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
""")

WRITE_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    from safetensors.torch import save_file
    pool, layers = Path(sys.argv[1]), int(sys.argv[2])
    h, i, n_layers, heads, kv, vocab = json.loads(sys.argv[3])
    d = h // heads
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(1 << 22, generator=g) * 0.02).half()
    def rnd(*shape):  # a tiled random block at a random offset: values only need to be plausible, and fast
        n = torch.Size(shape).numel()
        start = int(torch.randint(0, 1 << 22, (1,), generator=g))
        return base.roll(-start).repeat(n // (1 << 22) + 1)[:n].reshape(shape)
    shapes = {"self_attn.q_proj": (heads * d, h), "self_attn.k_proj": (kv * d, h), "self_attn.v_proj": (kv * d, h),
              "self_attn.o_proj": (h, heads * d), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h),
              "mlp.down_proj": (h, i)}
    pool.mkdir(parents=True, exist_ok=True)
    if not (pool / "embed.safetensors").exists():
        save_file({"model.embed_tokens.weight": rnd(vocab, h), "model.norm.weight": torch.ones(h).half(),
                   "lm_head.weight": rnd(vocab, h)}, str(pool / ".embed.tmp"), {"format": "pt"})
        (pool / ".embed.tmp").rename(pool / "embed.safetensors")
    for layer in range(layers):
        f = pool / f"layer-{layer:03d}.safetensors"
        if f.exists():
            continue
        p = f"model.layers.{layer}."
        t = {p + n + ".weight": rnd(*s) for n, s in shapes.items()}
        t[p + "input_layernorm.weight"] = torch.ones(h).half()
        t[p + "post_attention_layernorm.weight"] = torch.ones(h).half()
        save_file(t, str(pool / ".layer.tmp"), {"format": "pt"})
        (pool / ".layer.tmp").rename(f)
        del t
        print(f"wrote {f.name}", flush=True)
""")


def _vmhwm_run(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Run `python -c WRAPPER module args...`; returns {peak_rss_gib, wall_s, load_average_1m}; output to `log`."""
    hwm = log.with_suffix(".vmhwm")
    hwm.unlink(missing_ok=True)
    full = [sys.executable, "-c", WRAPPER, *cmd]
    env = {**os.environ, "BENCH_VMHWM": str(hwm), "PYTHONPATH": str(REPO), **(env or {})}
    t0 = time.time()
    with open(log, "w") as out:
        rc = subprocess.run(full, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, check=False).returncode
    wall = time.time() - t0
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed (exit {rc}); see {log}:\n{log.read_text()[-3000:]}")
    return {"peak_rss_gib": round(int(hwm.read_text()) * 1024 / GIB, 3), "wall_s": round(wall, 1),
            "load_average_1m": round(os.getloadavg()[0], 2)}


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _tokenizer(path: Path) -> None:
    code = ("import sys; from omniquant.tiny import _train_tokenizer; "
            "_train_tokenizer(32000).save_pretrained(sys.argv[1])")
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, env={**os.environ, "PYTHONPATH": str(REPO)})


class Bench:
    def __init__(self, args, layers: int):
        self.args, self.layers = args, layers
        self.work = args.work
        self.tag = f"llama2-7b-{layers}L"
        self.src = self.work / f"src-{layers}L"
        self.fq_rtn, self.fq_lwc = self.work / f"fq-rtn-{layers}L", self.work / f"fq-lwc-{layers}L"
        self.packed = self.work / f"packed-{layers}L"
        self.lib = self.work / f"lib-{layers}L.so"
        self.json = RESULTS / f"memory-{self.tag}.json"
        self.res = json.loads(self.json.read_text()) if self.json.exists() else {"stages": {}}
        self.res.update({"model": f"Llama-2-7B shapes, {layers} of 32 layers, random float16 weights",
                         "layers": layers})

    def save(self) -> None:
        from bench.machine import cpu_model

        self.res["machine"] = {"cpu": cpu_model(), "cores": os.cpu_count(), "arch": os.uname().machine}
        RESULTS.mkdir(parents=True, exist_ok=True)
        self.json.write_text(json.dumps(self.res, indent=1) + "\n")

    def done(self, stage: str) -> bool:
        return stage in self.res["stages"] and stage not in self.args.redo

    def log(self, name: str) -> Path:
        d = self.work / "logs"
        d.mkdir(parents=True, exist_ok=True)
        return d / f"{self.tag}-{name}.log"

    # ---- stages ------------------------------------------------------------------------------------------------
    def write(self) -> None:
        h, i, _, heads, kv, vocab = SHAPES["7b"]
        pool = self.work / "shards"
        t0 = time.time()
        subprocess.run([sys.executable, "-c", WRITE_SCRIPT, str(pool), str(self.layers),
                        json.dumps(SHAPES["7b"])], check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        if not self.src.exists():
            tmp = self.work / f".src-{self.layers}L.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            from transformers import LlamaConfig

            LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=self.layers, num_attention_heads=heads,
                        num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=4096, rms_norm_eps=1e-5,
                        rope_theta=10000.0, tie_word_embeddings=False, dtype="float16",
                        bos_token_id=0, eos_token_id=1).save_pretrained(tmp)
            files = ["embed.safetensors"] + [f"layer-{k:03d}.safetensors" for k in range(self.layers)]
            weight_map = {}
            from safetensors import safe_open

            for f in files:
                (tmp / f).symlink_to(pool / f)
                with safe_open(tmp / f, "pt") as s:
                    weight_map.update(dict.fromkeys(s.keys(), f))
            (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
            _tokenizer(tmp)
            tmp.rename(self.src)
        self.res["stages"]["write"] = {"checkpoint_bytes": dir_bytes(self.work / "shards") if self.layers == 32 else
                                       sum((self.src / f).stat().st_size for f in os.listdir(self.src)
                                           if f.endswith(".safetensors")),
                                       "wall_s": round(time.time() - t0, 1)}

    def _calibrate(self, path: Path, extra: list[str], name: str) -> dict:
        from omniquant.paths import CALIB_BOOKS, austen_dir

        shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(path.with_name(path.name + ".state"), ignore_errors=True)
        r = _vmhwm_run(["omniquant", "calibrate", "--model", str(self.src), "--output", str(path), "--wbits", "4",
                        "--group-size", "128", "--calib-data", str(austen_dir() / CALIB_BOOKS[0]), *extra],
                       self.log(name))
        r["output_bytes"] = dir_bytes(path)
        r["checkpoint_bytes"] = self.res["stages"]["write"]["checkpoint_bytes"]
        return r

    def calibrate(self) -> None:
        self.res["stages"]["calibrate"] = self._calibrate(self.fq_rtn, ["--epochs", "0", "--no-lwc"], "calibrate-rtn")

    def lwc(self) -> None:
        self.res["stages"]["lwc"] = self._calibrate(
            self.fq_lwc, ["--epochs", "1", "--nsamples", "2", "--seqlen", "128", "--lwc-lr", "5e-2"], "calibrate-lwc")
        if not self.args.keep:
            shutil.rmtree(self.fq_lwc)

    def pack(self) -> None:
        shutil.rmtree(self.packed, ignore_errors=True)
        r = _vmhwm_run(["omniquant", "pack", "--input", str(self.fq_rtn), "--scheme", SCHEME, "--output",
                        str(self.packed), "--embedding-scheme", EMBED_SCHEME], self.log("pack"))
        r["output_bytes"] = dir_bytes(self.packed)
        r["input_bytes"] = dir_bytes(self.fq_rtn)
        self.res["stages"]["pack"] = r
        if not self.args.keep:
            shutil.rmtree(self.fq_rtn)

    def compile(self) -> None:
        self.lib.unlink(missing_ok=True)
        r = _vmhwm_run(["omniquant", "compile", "--model", str(self.packed), "--target", "llvm", "--output",
                        str(self.lib)], self.log("compile"))
        r["output_bytes"] = self.lib.stat().st_size
        self.res["stages"]["compile"] = r

    def _chat_cmd(self, out: Path, lib: Path | None = None) -> list[str]:
        return ["omniquant", "chat", "--model", str(self.packed), "--lib", str(lib or self.lib), "--evaluate",
                "--eval-prompt-len", "128", "--eval-gen-len", "128", "--json", str(out)]

    def chat(self) -> None:
        out = self.work / f"chat-{self.layers}L.json"
        env = {"TVM_NUM_THREADS": str(self.args.threads), "OMP_NUM_THREADS": str(self.args.threads)}
        r = _vmhwm_run(self._chat_cmd(out), self.log("chat"), env=env)
        r["evaluate"] = json.loads(out.read_text())
        r["packed_bytes"] = dir_bytes(self.packed)
        self.res["stages"]["chat"] = r

    def decode(self) -> None:
        from bench.decode import LLAMACPP_SCRIPT, ensure_llamacpp

        py = ensure_llamacpp()
        ggufs = {}
        for qtype in ("Q4_0", "Q4_1"):
            path = self.work / f"llama2-7b-{self.layers}L-{qtype}.gguf"
            if not path.exists():
                subprocess.run([sys.executable, "-m", "bench.gguf_random", "--output", str(path),
                                "--qtype", qtype, "--layers", str(self.layers)], check=True, cwd=REPO,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
            ggufs[qtype] = path
        t = str(self.args.threads)
        env = {**os.environ, "TVM_NUM_THREADS": t, "OMP_NUM_THREADS": t, "PYTHONPATH": str(REPO)}
        # both of our libraries, rebuilt when the model code changed since they were compiled (seconds each)
        from mlc_schemes.compile import read_library_meta_if_fits, read_packed_model

        pm = read_packed_model(self.packed)
        int8_lib = self.work / f"lib-{self.layers}L-int8dot.so"
        for lib, extra in ((self.lib, []), (int8_lib, ["--int8-dot"])):
            if not read_library_meta_if_fits(lib, pm, int8_dot=bool(extra)):
                subprocess.run([sys.executable, "-m", "omniquant", "compile", "--model", str(self.packed), "--target",
                                "llvm", "--output", str(lib), *extra], check=True, cwd=REPO, env=env)
        ours_json, int8_json = (self.work / f"decode-ours{x}-{self.layers}L.json" for x in ("", "-int8dot"))
        engines = {f"ours {SCHEME} + 8-bit embedding (TVM, f16 compute)":
                   ([sys.executable, "-m", *self._chat_cmd(ours_json)], ours_json),
                   f"ours {SCHEME} + 8-bit embedding, int8 dot (compile --int8-dot)":
                   ([sys.executable, "-m", *self._chat_cmd(int8_json, int8_lib)], int8_json)}
        for qtype, path in ggufs.items():
            engines[f"llama.cpp {qtype} (Q8_0 embedding / output)"] = (
                [str(py), "-c", LLAMACPP_SCRIPT, str(path), t, "128", "128"], None)
        runs: dict[str, list[dict]] = {k: [] for k in engines}
        with open(TIMING_LOCK, "w") as lock:
            print(f"waiting for {TIMING_LOCK}", file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
            load_before = os.getloadavg()
            for rep in range(self.args.repeats):
                for name, (cmd, out) in engines.items():
                    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=False)
                    if r.returncode != 0:
                        raise RuntimeError(f"{name} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
                    if out is not None:
                        res = json.loads(out.read_text())
                    else:
                        res = json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("{")][-1])
                    runs[name].append({k: res.get(k) for k in ("prefill_tok_per_s", "decode_tok_per_s",
                                                                "decode_tok_per_s_internal", "peak_rss_mib")
                                       if k in res})
                    print(json.dumps({"engine": name, "round": rep, **runs[name][-1]}), flush=True)
            load_after = os.getloadavg()
        rows = [{"engine": k, **{m: statistics.median(x[m] for x in v)
                                 for m in ("prefill_tok_per_s", "decode_tok_per_s", "peak_rss_mib")}, "runs": v}
                for k, v in runs.items()]
        self.res["stages"]["decode"] = {"threads": self.args.threads, "prompt_len": 128, "gen_len": 128,
                                        "repeats": self.args.repeats, "rows": rows,
                                        "load_average_before": load_before, "load_average_after": load_after,
                                        "gguf_bytes": {q: p.stat().st_size for q, p in ggufs.items()},
                                        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        if not self.args.keep:
            for p in ggufs.values():
                p.unlink()

    def paper(self) -> None:
        self.res["stages"]["paper"] = paper_figures(self.res)


def paper_figures(res: dict | None = None) -> dict:
    """Memory of each stage for Llama-2 7B / 13B / 70B from the shapes (bytes -> GiB), the bench's setting (2 x 128
    tokens) and the paper's (128 x 2048). Components, for hidden H, intermediate I, block parameters P, vocab V:

      calibrate (CPU)  base + 4P (block in float32) + 2P (its float16 copy while it is upcast) + streams
                       (2 x n·T·H·4 in RAM when they fit in half of it, else on disk: 0) + one window's autograd
                       tensors  T·(14H + 4I)·4 + attention scores  heads·T²·4 (eager/SDPA math on CPU); capture
                       holds the float16 embedding V·H·2 before any block is loaded
      calibrate (GPU)  4P + the streams if they fit (else in host RAM) + activations (bf16 autocast: half of the above)
      pack             base + the largest stored tensor (2·I·H) + float64 recovery of 1024 rows (4 x 1024·I·8) + 32 MB
      chat             runtime + packed weights (4.25 bits per linear weight + 8-bit embedding / lm_head) + KV cache
                       at a full 4096-token context (2 · layers · context · kv_heads · head_dim · 2 bytes; reserved
                       up front, resident only as far as the context has filled it)

    `base` is the measured Python + torch + transformers resident size; `runtime` the TVM runtime-only engine's
    (the `runtime` entry of `chat --evaluate`'s RSS split: 90 MiB on this machine).
    """
    base, runtime = 0.45 * GIB, 0.09 * GIB
    out = {"setting_bench": "2 x 128-token windows", "setting_paper": "128 x 2048-token windows", "models": {}}
    for model, (h, i, layers, heads, kv, vocab) in SHAPES.items():
        d = h // heads
        p = 2 * h * h + 2 * h * kv * d + 3 * h * i  # q, o: H x H; k, v: kv·d x H; gate, up, down: I x H
        row = {"block_params": int(p), "fp16_checkpoint_gib": round((layers * p + 2 * vocab * h) * 2 / GIB, 2)}
        for setting, (n, t) in {"bench": (2, 128), "paper": (128, 2048)}.items():
            streams = 2 * n * t * h * 4
            act = t * (14 * h + 4 * i) * 4 + heads * t * t * 4
            block = 6 * p
            cpu_streams = streams if streams <= 12 * GIB else 0
            row[f"calibrate_cpu_gib_{setting}"] = round((base + max(block + act, 0) + cpu_streams) / GIB, 2)
            row[f"calibrate_streams_gib_{setting}"] = round(streams / GIB, 2)
            row[f"calibrate_gpu_gib_{setting}"] = round((4 * p + streams + act / 2) / GIB, 2)
        linear_bytes = layers * p * 4.25 / 8
        embed_bytes = 2 * vocab * h * (8.25 / 8)
        kv_cache = 2 * layers * 4096 * kv * d * 2
        row["packed_gib"] = round((linear_bytes + embed_bytes) / GIB, 2)
        row["pack_gib"] = round((base + 2 * i * h + 4 * 1024 * i * 8 + 32 * 2**20) / GIB, 2)
        row["chat_gib"] = round((runtime + linear_bytes + embed_bytes + kv_cache) / GIB, 2)
        out["models"][model] = row
    return out


def table(res: dict) -> str:
    st = res["stages"]
    ck = st.get("write", {}).get("checkpoint_bytes")
    lines = [f"{res['model']}; checkpoint {ck / 1e9:.2f} GB" if ck else res["model"],
             f"{'stage':28s} {'peak RSS GiB':>12s} {'wall s':>8s} {'output GB':>10s} {'x checkpoint':>12s} {'load':>5s}"]

    def row(name, r, out=None):
        out = r.get("output_bytes") if out is None else out
        ratio = f"{out / ck:.2f}" if (out and ck) else ""
        lines.append(f"{name:28s} {r['peak_rss_gib']:12.2f} {r['wall_s']:8.0f} "
                     f"{(out or 0) / 1e9:10.2f} {ratio:>12s} {r.get('load_average_1m', 0):5.1f}")

    if "calibrate" in st:
        row("calibrate RTN", st["calibrate"])
    if "lwc" in st:
        row("calibrate LWC (1 epoch)", st["lwc"])
    for name in ("pack", "compile"):
        if name in st:
            row(name, st[name])
    if "chat" in st:
        c = st["chat"]
        row("chat --evaluate", c, out=0)
        e = c["evaluate"]
        lines.append(f"  chat: packed {c['packed_bytes'] / GIB:.2f} GiB, peak RSS / packed "
                     f"{c['peak_rss_gib'] * GIB / c['packed_bytes']:.2f}x, prefill {e.get('prefill_tok_per_s')} tok/s, "
                     f"decode {e.get('decode_tok_per_s')} tok/s")
    if "decode" in st:
        d = st["decode"]
        lines.append(f"decode, {d['threads']} threads, 128 + 128 tokens, median of {d['repeats']} rounds, load "
                     f"{d['load_average_before'][0]:.1f} -> {d['load_average_after'][0]:.1f}:")
        for r in d["rows"]:
            lines.append(f"  {r['engine']:52s} prefill {r['prefill_tok_per_s']:7.1f}  decode "
                         f"{r['decode_tok_per_s']:6.2f} tok/s  peak RSS {r['peak_rss_mib']:7.0f} MiB")
    if "paper" in st:
        lines.append("on paper (GiB): model | fp16 ckpt | calibrate CPU bench / paper (streams) | GPU paper | pack | "
                     "packed | chat")
        for m, r in st["paper"]["models"].items():
            lines.append(f"  {m:4s} | {r['fp16_checkpoint_gib']:6.1f} | {r['calibrate_cpu_gib_bench']:5.2f} / "
                         f"{r['calibrate_cpu_gib_paper']:5.2f} ({r['calibrate_streams_gib_paper']:.0f}) | "
                         f"{r['calibrate_gpu_gib_paper']:5.1f} | {r['pack_gib']:4.2f} | {r['packed_gib']:5.2f} | "
                         f"{r['chat_gib']:5.2f}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="16,32", help="comma-separated layer counts (of 32)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    ap.add_argument("--redo", default="", help="stages (or lwc / rtn) to rerun although they have results")
    ap.add_argument("--work", type=Path, default=REPO / "build/bench/memory")
    ap.add_argument("--keep", action="store_true", help="keep intermediate checkpoints and GGUFs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    args.redo = set(filter(None, args.redo.split(",")))
    stages = [s for s in args.stages.split(",") if s]
    if bad := [s for s in stages if s not in STAGES]:
        ap.error(f"unknown stage {bad[0]}; choose from {', '.join(STAGES)}")
    args.work.mkdir(parents=True, exist_ok=True)
    for layers in [int(x) for x in args.layers.split(",")]:
        b = Bench(args, layers)
        for stage in STAGES:
            if stage in stages and not b.done(stage):
                print(f"[{b.tag}] {stage}", file=sys.stderr, flush=True)
                getattr(b, stage)()
                b.save()
        print(table(b.res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
