"""`mlc-chat-config.json` for a packed model, with MLC-LLM's field names, from the HF config and tokenizer.

Beyond MLC's fields, `quantization_config` holds the scheme's fields plus `quantized_linears`
(HF module name -> [out_features N, in_features K], the true K that the word padding hides) and the calibration's
`quant_config.json` under `calibration`, and `embedding_quantization` (the embedding / lm_head scheme's fields plus
`quantized_tensors`: name -> [V, H]) when those are quantized; `model_config` is the HF config with these derived fields always present:
head_dim, num_key_value_heads, rope_theta, rope_scaling (None for plain RoPE), attention_bias.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mlc_schemes.schemes import QuantScheme

CHAT_CONFIG_VERSION = "0.1.0"
# Files that make up an HF tokenizer (whichever exist are copied next to the weights, as MLC does).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json", "chat_template.jinja",
)
# Keys of `PretrainedConfig.to_dict()` that say nothing about the network.
_NOISE_KEYS = {
    "transformers_version", "_name_or_path", "id2label", "label2id", "return_dict", "output_hidden_states",
    "output_attentions", "problem_type", "chunk_size_feed_forward", "dtype", "torch_dtype", "use_cache",
}
DERIVED_KEYS = ("head_dim", "num_key_value_heads", "rope_theta", "rope_scaling", "attention_bias")


def model_config_from_hf(hf_config: dict) -> dict:
    """HF `config.json` dict -> `model_config`: the network fields plus the derived ones in DERIVED_KEYS."""
    cfg = {k: v for k, v in hf_config.items() if k not in _NOISE_KEYS}
    heads = cfg.get("num_attention_heads")
    if cfg.get("head_dim") is None and heads:
        cfg["head_dim"] = cfg["hidden_size"] // heads
    if cfg.get("num_key_value_heads") is None and heads:
        cfg["num_key_value_heads"] = heads
    # transformers 5 keeps RoPE settings in `rope_parameters`; MLC-style consumers read rope_theta/rope_scaling.
    rope = cfg.get("rope_parameters") or {}
    if cfg.get("rope_theta") is None:
        cfg["rope_theta"] = rope.get("rope_theta", 10000.0)
    if "rope_scaling" not in cfg:
        cfg["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
    cfg.setdefault("attention_bias", bool(cfg.get("enable_bias", False)) if cfg.get("model_type") == "opt" else False)
    return cfg


def hf_config_from_model_config(model_config: dict) -> dict:
    """Inverse of `model_config_from_hf` for rebuilding the HF model: drops the derived keys HF did not have."""
    cfg = dict(model_config)
    for key in cfg.pop("_derived_keys", []):
        cfg.pop(key, None)
    return cfg


def _first_id(value):
    return value[0] if isinstance(value, list) and value else value


def _conv_template(tokenizer_dir: Path) -> str:
    """MLC conversation template name: "chatml" for an `<|im_start|>` chat template (Qwen), "gemma3_instruction"
    for a `<start_of_turn>` one, else plain "LM". (`omniquant chat` renders the tokenizer's template itself.)"""
    text = ""
    for name in ("chat_template.jinja", "tokenizer_config.json"):
        if (tokenizer_dir / name).is_file():
            text += (tokenizer_dir / name).read_text(encoding="utf-8", errors="replace")
    if "<|im_start|>" in text:
        return "chatml"
    return "gemma3_instruction" if "<start_of_turn>" in text else "LM"


def build_chat_config(hf_config: dict, scheme: QuantScheme, quantized_linears: dict[str, list[int]],
                      source_dir: Path | None, calibration: dict | None = None,
                      embedding: tuple[QuantScheme, dict] | None = None) -> dict:
    """The `mlc-chat-config.json` dict for a packed model whose HF checkpoint (generation config, tokenizer)
    lies in `source_dir` (None: no tokenizer files, default sampling)."""
    model_config = model_config_from_hf(hf_config)
    model_config["_derived_keys"] = [k for k in DERIVED_KEYS if k not in hf_config]
    gen_path = source_dir / "generation_config.json" if source_dir is not None else None
    gen = json.loads(gen_path.read_text()) if gen_path is not None and gen_path.is_file() else {}
    context = int(model_config.get("max_position_embeddings") or 2048)
    tokenizer_files = [f for f in TOKENIZER_FILES if source_dir is not None and (source_dir / f).is_file()]
    qconfig = scheme.to_json() | {"quantized_linears": quantized_linears}
    if calibration is not None:
        qconfig["calibration"] = calibration
    if embedding is not None:
        qconfig["embedding_quantization"] = embedding[0].to_json() | {"quantized_tensors": embedding[1]}
    return {
        "version": CHAT_CONFIG_VERSION,
        "model_type": model_config.get("model_type"),
        "quantization": scheme.name,
        "quantization_config": qconfig,
        "model_config": model_config,
        "vocab_size": model_config.get("vocab_size"),
        "context_window_size": context,
        "sliding_window_size": model_config.get("sliding_window") or -1,
        "prefill_chunk_size": min(context, 2048),
        "attention_sink_size": -1,
        "tensor_parallel_shards": 1,
        "pipeline_parallel_stages": 1,
        "temperature": float(gen.get("temperature", 1.0)),
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "repetition_penalty": float(gen.get("repetition_penalty", 1.0)),
        "top_p": float(gen.get("top_p", 1.0)),
        "tokenizer_files": tokenizer_files,
        "tokenizer_info": {"token_postproc_method": "byte_level", "prepend_space_in_encode": False,
                           "strip_space_in_decode": False},
        "conv_template": _conv_template(source_dir) if source_dir is not None else "LM",
        "pad_token_id": _first_id(gen.get("pad_token_id", hf_config.get("pad_token_id"))),
        "bos_token_id": _first_id(gen.get("bos_token_id", hf_config.get("bos_token_id"))),
        "eos_token_id": gen.get("eos_token_id", hf_config.get("eos_token_id")),
        "model_task": "chat",
    }


def copy_tokenizer(source_dir: Path, dest_dir: Path, files: list[str]) -> None:
    for name in files:
        shutil.copy2(source_dir / name, dest_dir / name)
