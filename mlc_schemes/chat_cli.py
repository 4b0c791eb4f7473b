"""Chat with a compiled model, or measure it: prefill / decode tok/s and peak memory (`--evaluate`).

Interactive commands: `/stats` (speed of the last reply), `/reset` (forget the conversation), `/exit`. Turns are
rendered with the tokenizer's chat template (`Conversation`); the KV cache keeps what the turns have in common.
`--random-weights --preset llama2-7b --scheme w4a16g128asym --target cuda` compiles and measures a model of a real
model's shapes with random weights (nothing downloaded); with `--weights-dir DIR` (llvm) the random weights are
written to DIR as a packed weights dir and measured from there in a fresh process, as a real model would be (the
same load path, the same resident memory). Numbers use the compiled library's compute dtype. `--evaluate` reports
peak RSS and, on CPU, its split: runtime (interpreter + TVM runtime + library), weights, KV cache, activations.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from omniquant.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="packed weights dir (with its tokenizer)")
    p.add_argument("--lib", help="model library from `omniquant compile` (with --random-weights: reuse/keep it)")
    p.add_argument("--device", default=None, metavar="KIND[:N]",
                   help="device to run on: cpu, cuda:N or vulkan:N (default: the library's target, index 0)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass when temperature > 0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", help="answer this one prompt and exit (non-interactive)")
    p.add_argument("--system", default=None, help="system message at the start of the conversation (chat template)")
    p.add_argument("--evaluate", action="store_true", help="measure prefill/decode speed and peak memory, then exit")
    p.add_argument("--eval-prompt-len", type=int, default=128)
    p.add_argument("--eval-gen-len", type=int, default=256)
    p.add_argument("--json", help="write the --evaluate numbers here")
    p.add_argument("--random-weights", action="store_true", help="random weights of --preset's shapes (implies --evaluate)")
    p.add_argument("--preset", default="llama2-7b", help="llama2-7b, llama3-8b or smollm2-135m (with --random-weights)")
    p.add_argument("--scheme", default="w4a16g128asym", help="scheme for --random-weights ('none' = fp16 dense)")
    p.add_argument("--embedding-scheme", default=None, metavar="NAME",
                   help="with --random-weights: quantize the embedding / lm_head too (e.g. w8a16g128asym)")
    p.add_argument("--weights-dir", default=None, metavar="DIR",
                   help="with --random-weights (llvm): write the random packed weights here (kept; reused when it "
                        "holds them) and evaluate from the dir in a fresh process")
    p.add_argument("--target", default="llvm", help="target for --random-weights: llvm or cuda")
    p.add_argument("--isa", default="native", help="with --random-weights (llvm): native, avx2, avx512 or a CPU name")
    p.add_argument("--int8-dot", action="store_true",
                   help="with --random-weights (llvm, x86): compile with int8 activations in the 4-bit decode GEMVs")
    p.add_argument("--cuda-arch", default="sm_80")
    p.add_argument("--dtype", choices=("float16", "float32"), default=None, help="compute dtype (--random-weights)")


def _evaluate(engine, prompt_len: int, gen_len: int, seed: int) -> dict:
    import numpy as np

    if prompt_len + gen_len > engine.context:
        raise UserError(f"--eval-prompt-len {prompt_len} + --eval-gen-len {gen_len} exceed the context window "
                        f"{engine.context}")
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, engine.vocab, prompt_len)
    # Warm-up (first calls load/compile kernels, allocate pages); then a measured run on a fresh cache.
    engine.reset()
    engine.generate_ids(ids[: min(16, prompt_len)], 4, stop_on_eos=False)
    engine.reset()
    engine.reset_stats()
    t0 = time.perf_counter()
    engine.generate_ids(ids, gen_len, stop_on_eos=False)
    wall = time.perf_counter() - t0
    st = engine.stats.as_dict()
    # generate_ids decodes gen_len - 1 steps (the first new token comes from the prefill logits). Decode speed is
    # wall time after the prefill, so the per-token sampling and Python loop count, as in bench/decode.py's peers.
    return {"target": engine.meta["target"], "dtype": engine.dtype, "quantization": engine.meta["quantization"],
            "prompt_len": prompt_len, "gen_len": gen_len, "prefill_tok_per_s": st["prefill_tok_per_s"],
            "decode_tok_per_s": round((gen_len - 1) / (wall - st["prefill_seconds"]), 2),
            "decode_kernel_tok_per_s": st["decode_tok_per_s"], **engine.memory_report()}


def _interactive(engine, args) -> int:
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    conv = Conversation(engine.tokenizer, args.system)
    print("chat: /stats, /reset, /exit", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print()
            return 0
        cmd = line.strip()
        if cmd == "/exit":
            return 0
        if cmd == "/reset":
            engine.reset()
            conv = Conversation(engine.tokenizer, args.system)
            print("(conversation reset)")
            continue
        if cmd == "/stats":
            print(json.dumps(engine.stats.as_dict() | engine.memory_report()))
            continue
        if not cmd:
            continue
        _reply(engine, conv, line, args)


class Conversation:
    """The messages of a chat, rendered with the tokenizer's own chat template (the packed dir carries the model's
    tokenizer files, template included: BOS, turn markers, generation prompt as the model was trained).

    Each turn renders the whole conversation and `sync` feeds the engine only what its KV cache lacks: the longest
    common prefix of the rendering and the cached tokens is kept, anything after it is rolled back (e.g. a reply
    that re-tokenizes differently, or the end-of-turn token the template adds). A tokenizer without a template
    continues the raw text (special tokens, e.g. BOS, only at the start)."""

    def __init__(self, tokenizer, system: str | None = None):
        self.tok = tokenizer
        self.templated = bool(getattr(tokenizer, "chat_template", None))
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []

    def prompt_ids(self, text: str, cached: list[int]) -> list[int]:
        """Token ids of the whole conversation with the user's `text` appended, ready for the reply."""
        self.messages.append({"role": "user", "content": text})
        if self.templated:
            return list(self.tok.apply_chat_template(self.messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=False))
        return cached + self.tok(text, add_special_tokens=not cached)["input_ids"]

    def add_reply(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text})

    @staticmethod
    def sync(engine, ids: list[int]) -> list[int]:
        """Roll the engine back to the common prefix of its tokens and `ids`; returns the ids still to prefill
        (at least one, so the reply has fresh logits)."""
        common = 0
        for a, b in zip(engine.tokens, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)
        engine.rollback(engine.seq_len - common)
        return ids[common:]


def _reply(engine, conv: Conversation, text: str, args) -> None:
    tok = conv.tok
    ids = Conversation.sync(engine, conv.prompt_ids(text, engine.tokens))
    engine.reset_stats()
    new: list[int] = []
    printed = 0

    def on_token(t):
        nonlocal printed
        new.append(t)
        s = tok.decode(new, skip_special_tokens=True)
        sys.stdout.write(s[printed:])
        sys.stdout.flush()
        printed = len(s)

    engine.generate_ids(ids, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                        on_token=on_token)
    print()
    conv.add_reply(tok.decode(new, skip_special_tokens=True))


def _random_weights_dir(args) -> int:
    """--random-weights --weights-dir: write (or reuse) the packed dir, compile, then `chat --evaluate` it in a
    child process that loads only TVM's runtime, so its RSS is that of a deployed model."""
    import subprocess

    from mlc_schemes.compile import (
        compile_packed,
        read_library_meta_if_fits,
        read_packed_model,
    )
    from mlc_schemes.random_model import write_random_packed_dir

    out = Path(args.weights_dir)
    context = args.eval_prompt_len + args.eval_gen_len + 16
    if (out / "tensor-cache.json").is_file():
        pm = read_packed_model(out)
        print(f"reusing the packed weights in {out}", file=sys.stderr)
    else:
        print(f"writing random {args.preset} ({args.scheme}) weights to {out}", file=sys.stderr)
        pm = write_random_packed_dir(args.preset, args.scheme, out, seed=args.seed, context=context,
                                     embedding_scheme=args.embedding_scheme)
    i8 = "-int8dot" if args.int8_dot else ""
    lib = Path(args.lib) if args.lib else out / f"lib-{args.target}-{args.isa}{i8}.so"
    if not read_library_meta_if_fits(lib, pm, int8_dot=args.int8_dot):
        print(f"compiling {out} for {args.target} ({args.isa}) -> {lib}", file=sys.stderr)
        compile_packed(pm, args.target, lib, arch=args.cuda_arch, dtype=args.dtype, isa=args.isa,
                       int8_dot=args.int8_dot)
    cmd = [sys.executable, "-m", "omniquant", "chat", "--model", str(out), "--lib", str(lib), "--evaluate",
           "--eval-prompt-len", str(args.eval_prompt_len), "--eval-gen-len", str(args.eval_gen_len),
           "--seed", str(args.seed)] + (["--json", args.json] if args.json else [])
    return subprocess.run(cmd, check=False).returncode


def run(args: argparse.Namespace) -> int:
    from mlc_schemes.engine import Engine, import_tvm_runtime

    if args.random_weights and args.weights_dir:
        if args.target != "llvm":
            raise UserError("--weights-dir measures the CPU load path: use it with --target llvm")
        return _random_weights_dir(args)
    if args.random_weights:
        from mlc_schemes.compile import compile_packed, read_library_meta_if_fits
        from mlc_schemes.random_model import random_packed_model

        pm, params = random_packed_model(args.preset, args.scheme, seed=args.seed,
                                         context=args.eval_prompt_len + args.eval_gen_len + 16,
                                         embedding_scheme=args.embedding_scheme)
        emb = f"-emb-{args.embedding_scheme}" if args.embedding_scheme else ""
        lib = Path(args.lib) if args.lib else Path(tempfile.mkdtemp(prefix="omq-rand-")) / (
            f"{args.preset}-{args.scheme}{emb}-{args.target}{'-int8dot' if args.int8_dot else ''}.so")
        if not read_library_meta_if_fits(lib, pm, int8_dot=args.int8_dot):
            print(f"compiling {args.preset} ({args.scheme}) for {args.target} -> {lib}", file=sys.stderr)
            compile_packed(pm, args.target, lib, arch=args.cuda_arch, dtype=args.dtype, isa=args.isa,
                           int8_dot=args.int8_dot)
        engine = Engine(pm, lib, params=params, device=args.device)
        args.evaluate = True
    else:
        if not args.model or not args.lib:
            raise UserError("--model and --lib are required (or use --random-weights)")
        if not Path(args.model).is_dir():
            raise UserError(f"weights dir {args.model} does not exist")
        from mlc_schemes.engine import read_library_meta

        if read_library_meta(args.lib)["target"] == "llvm":
            import_tvm_runtime()  # a CPU library needs only TVM's runtime (far less resident memory)
        engine = Engine(args.model, args.lib, device=args.device)
    if args.evaluate:
        res = _evaluate(engine, args.eval_prompt_len, args.eval_gen_len, args.seed)
        res["threads"] = os.environ.get("TVM_NUM_THREADS", str(os.cpu_count()))
        split = res.get("rss_split_mib")
        print(f"prefill {res['prefill_tok_per_s']} tok/s, decode {res['decode_tok_per_s']} tok/s, "
              f"peak RSS {res['peak_rss_mib']} MiB" + (f", cuda used {res.get('cuda_used_mib')} MiB"
                                                        if res["target"] == "cuda" else "")
              + (" (" + ", ".join(f"{k} {v}" for k, v in split.items()) + f"; weights mapped from the shards "
                 f"{res['weights_mapped_mib']} MiB)" if split else "")
              + (f", vulkan {res.get('vulkan_device')}: used {res.get('vulkan_used_mib')} of "
                 f"{res.get('vulkan_total_mib')} MiB" if res["target"] == "vulkan" else ""))
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2))
        return 0
    if args.prompt is not None:
        _reply(engine, Conversation(engine.tokenizer, args.system), args.prompt, args)
        return 0
    return _interactive(engine, args)
