"""The deployed models in `tvm.relax.frontend.nn`, one file per architecture, MLC-LLM style (the model and its
parameter mapping side by side), and the registry by HF `model_type` that pack, compile and the CLI dispatch on.

    llama.py    llama, mistral, qwen2          qwen3.py   qwen3          gemma3.py  gemma3_text, gemma3 (its text model)

Shared: base.py (config fields, parameter builder, norms, KV cache, exported functions), linear.py (quantized and
dense linears), kernels.py (CPU GEMV / GEMM), attention_cpu.py (CPU attention + RoPE for the paged KV cache).
Each architecture module offers `MODEL_TYPES`, `Config.from_chat_config(chat)`, `Model(cfg, scheme, quantized,
dtype, backend, target, ...)` and `source_view(hf_config) -> (config, tensor name -> deployed name or None)`.
Looking an architecture up does not import TVM until the module is needed.
"""

from __future__ import annotations

import importlib

from omniquant.errors import UserError

# model_type -> module (in mlc_schemes.model)
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "qwen3",
                 "gemma3_text": "gemma3", "gemma3": "gemma3"}


def supported_model_types() -> list[str]:
    return sorted(ARCHITECTURES)


def get_architecture(model_type: str | None, stage: str):
    """The module of `model_type`'s TVM model; UserError naming the `stage` (pack, compile) and listing the
    supported model types otherwise."""
    if model_type not in ARCHITECTURES:
        raise UserError(f"{stage}: architecture {model_type!r} has no TVM model; supported model types: "
                        f"{', '.join(supported_model_types())}")
    return importlib.import_module(f"mlc_schemes.model.{ARCHITECTURES[model_type]}")
