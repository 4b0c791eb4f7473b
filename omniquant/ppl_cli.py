"""Perplexity on local text or a named dataset (non-overlapping windows, GPTQ/OmniQuant convention); prints and writes JSON."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from omniquant.errors import UserError
from omniquant.hub import add_model_arguments, resolve_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, "HF or fake-quant checkpoint dir (torch), or packed weights dir (tvm)")
    p.add_argument("--data", default="wikitext2", help="text file, folder, comma list, or wikitext2/c4/ptb")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--engine", choices=("torch", "tvm"), default="torch")
    p.add_argument("--lib", default=None, help="compiled model library (engine tvm)")
    p.add_argument("--device", default=None, metavar="KIND[:N]",
                   help="engine tvm: cpu, cuda:N or vulkan:N (default: the library's target, index 0)")
    p.add_argument("--steps", choices=("prefill", "decode"), default="prefill",
                   help="engine tvm: score each window in one prefill (default) or one token at a time through the "
                        "decode kernels a chat runs (e.g. a library compiled with --int8-dot; seqlen times slower)")
    p.add_argument("--json", default=None, help="write the result here as JSON")


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoTokenizer

    from omniquant.data import load_tokens
    from omniquant.ppl import config_window_bos, perplexity, window_bos, windows

    if args.engine == "torch":
        model_dir = resolve_model(args.model, args.revision)
    else:
        model_dir = Path(args.model)
        if not model_dir.is_dir():
            raise UserError(f"--engine tvm: packed weights dir {model_dir} does not exist (make one: omniquant pack)")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokens = load_tokens(tokenizer, args.data, split="eval")
    if tokens.numel() < args.seqlen:
        raise UserError(f"--data has {tokens.numel()} tokens, fewer than one window of --seqlen {args.seqlen}")
    t0 = time.time()
    if args.engine == "torch":
        from omniquant.load import load_quantized

        model = load_quantized(model_dir)
        bos = config_window_bos(model.config)
        ppl = perplexity(model, tokens, args.seqlen, args.max_windows)
    else:
        if not args.lib:
            raise UserError("--engine tvm needs --lib (a library from `omniquant compile`)")
        from mlc_schemes.engine import (
            import_tvm_runtime,
            read_library_meta,
            tvm_perplexity,
        )

        if read_library_meta(args.lib)["target"] == "llvm":
            import_tvm_runtime()  # a CPU library needs only TVM's runtime
        chat = json.loads((model_dir / "mlc-chat-config.json").read_text())
        bos = window_bos(chat["model_config"].get("model_type"), chat.get("bos_token_id"))
        ppl = tvm_perplexity(model_dir, args.lib, tokens, args.seqlen, args.max_windows, device=args.device,
                             steps=args.steps)
    n_windows = windows(tokens, args.seqlen, args.max_windows, bos).shape[0]
    result = {"model": str(model_dir), "engine": args.engine, "data": args.data, "seqlen": args.seqlen,
              "windows": n_windows, "bos_first": bos is not None, "ppl": ppl,
              "steps": args.steps if args.engine == "tvm" else None, "seconds": round(time.time() - t0, 2),
              "torch_threads": torch.get_num_threads()}
    print(f"perplexity {ppl:.4f}  ({n_windows} windows x {args.seqlen} tokens{', BOS first' if bos is not None else ''}"
          f", engine {args.engine})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0
