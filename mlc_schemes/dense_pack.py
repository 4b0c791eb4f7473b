"""Unquantized (float16) weights dir in the packed layout of docs/formats.md §2, for the fp16 baseline library.

Same files as `omniquant pack` writes (`tensor-cache.json` + shards, `mlc-chat-config.json`, tokenizer) with
`quantization: "none"` and every tensor float16 under its HF name.
"""

from __future__ import annotations

import json
from pathlib import Path

from omniquant.errors import UserError


def pack_dense_fp16(hf_dir: str | Path, output_dir: str | Path) -> Path:
    """Write `hf_dir`'s weights as float16 into the new dir `output_dir` (atomic); returns `output_dir`."""
    import numpy as np
    from safetensors.numpy import load_file

    from mlc_schemes.chat_config import (
        TOKENIZER_FILES,
        copy_tokenizer,
        model_config_from_hf,
    )
    from mlc_schemes.weights_dir import write_tensor_cache
    from omniquant.atomic import atomic_dir

    hf_dir, output_dir = Path(hf_dir), Path(output_dir)
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files or not (hf_dir / "config.json").is_file():
        raise UserError(f"{hf_dir} is not an HF checkpoint with safetensors weights")
    from mlc_schemes.pack import source_view

    hf_config, deployed_name = source_view(json.loads((hf_dir / "config.json").read_text()))
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        tensors |= {d: t for n, t in load_file(f).items() if (d := deployed_name(n)) is not None}
    if hf_config.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)
    mc = model_config_from_hf(hf_config)
    context = int(mc.get("max_position_embeddings") or 2048)
    tok_files = [f for f in TOKENIZER_FILES if (hf_dir / f).is_file()]
    gen = json.loads((hf_dir / "generation_config.json").read_text()) if (hf_dir / "generation_config.json").is_file() else {}
    chat = {"version": "0.1.0", "model_type": mc.get("model_type"), "quantization": "none", "quantization_config": {},
            "model_config": mc, "vocab_size": mc.get("vocab_size"), "context_window_size": context,
            "prefill_chunk_size": min(context, 2048), "tokenizer_files": tok_files,
            "bos_token_id": gen.get("bos_token_id", hf_config.get("bos_token_id")),
            "eos_token_id": gen.get("eos_token_id", hf_config.get("eos_token_id")),
            "pad_token_id": gen.get("pad_token_id", hf_config.get("pad_token_id"))}
    n_params = sum(a.size for a in tensors.values())
    if output_dir.exists():
        raise UserError(f"output {output_dir} already exists; choose a new path or remove it")
    with atomic_dir(output_dir) as tmp:
        write_tensor_cache(((k, v.astype(np.float16)) for k, v in sorted(tensors.items())), tmp, lambda: n_params)
        (tmp / "mlc-chat-config.json").write_text(json.dumps(chat, indent=1))
        copy_tokenizer(hf_dir, tmp, tok_files)
    return output_dir
