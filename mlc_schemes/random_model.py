"""Random packed weights with a real model's shapes (`--random-weights --preset llama2-7b`), held in memory.

Speed and memory of a compiled model depend only on shapes and scheme, so a 7B model can be measured without
downloading it. `write_random_packed_dir` writes the same weights as a packed weights dir, one tensor at a time, so
that the engine's load from disk (and its resident memory) can be measured like a real model's. Codes are random words (one tiled random block) (3-bit words keep their 2 pad bits zero), scales 1e-3, zeros at
mid-range, dense tensors N(0, 0.02), norms 1: activations stay finite in float16.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from omniquant.errors import UserError

PRESETS: dict[str, dict] = {
    "llama2-7b": {
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128, "vocab_size": 32000,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False},
    "llama3-8b": {
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False},
    "smollm2-135m": {
        "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": True},
}
NO_QUANT = ("none", "q0f16")


def _linears(cfg: dict) -> dict[str, list[int]]:
    h, i, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    out = {}
    for layer in range(cfg["num_hidden_layers"]):
        a, m = f"model.layers.{layer}.self_attn.", f"model.layers.{layer}.mlp."
        out |= {a + "q_proj": [cfg["num_attention_heads"] * d, h], a + "k_proj": [cfg["num_key_value_heads"] * d, h],
                a + "v_proj": [cfg["num_key_value_heads"] * d, h], a + "o_proj": [h, cfg["num_attention_heads"] * d],
                m + "gate_proj": [i, h], m + "up_proj": [i, h], m + "down_proj": [h, i]}
    return out


def _packed_specs(name: str, n: int, k: int, scheme) -> list[tuple[str, tuple[int, ...], str, str]]:
    """Specs of one [n, k] weight: float16 `weight` (scheme None) or q_weight / q_scale (/ q_zero)."""
    if scheme is None:
        return [(name + ".weight", (n, k), "float16", "dense")]
    g = scheme.num_groups(k)
    out = [(name + ".q_weight", (n, scheme.num_words(k)), "uint32", "codes"),
           (name + ".q_scale", (n, g), "float16", "scale")]
    if scheme.stores_zero:
        out.append((name + ".q_zero", (n, g), "float16", "zero"))
    return out


def _specs(cfg: dict, scheme, linears, embed_scheme=None) -> list[tuple[str, tuple[int, ...], str, str]]:
    """(name, shape, dtype, kind) of every tensor; kind in dense / ones / codes / scale / zero."""
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    out = _packed_specs("model.embed_tokens", v, h, embed_scheme)
    for name, (n, k) in linears.items():
        out += _packed_specs(name, n, k, scheme)
    for layer in range(cfg["num_hidden_layers"]):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out.append((f"model.layers.{layer}.{norm}.weight", (h,), "float16", "ones"))
    out.append(("model.norm.weight", (h,), "float16", "ones"))
    if not cfg["tie_word_embeddings"]:
        out += _packed_specs("lm_head", v, h, embed_scheme)
    return out


def _tensors(specs, scheme, embed, seed: int):
    """Yield (name, array) for every spec, one at a time."""
    rng = np.random.default_rng(seed)
    # Values do not matter for speed: tile one random block instead of drawing billions of numbers.
    base_f16 = (rng.standard_normal(1 << 20, dtype=np.float32) * 0.02).astype(np.float16)
    base_u32 = rng.integers(0, 2**32, 1 << 20, dtype=np.uint32)
    for name, shape, _dtype, kind in specs:
        sch = embed if name.startswith(("model.embed_tokens.", "lm_head.")) else scheme
        if kind == "dense":
            yield name, np.resize(base_f16, shape)
        elif kind == "ones":
            yield name, np.ones(shape, np.float16)
        elif kind == "codes":  # keep the pad bits of 3-bit words zero
            yield name, np.resize(base_u32, shape) & np.uint32((1 << (sch.bits * sch.elems_per_word)) - 1)
        elif kind == "scale":
            yield name, np.full(shape, 1e-3, np.float16)
        else:
            yield name, np.full(shape, 2 ** (sch.bits - 1), np.float16)


def random_packed_model(preset: str, scheme_name: str, seed: int = 0, context: int = 2048, materialize: bool = True,
                        embedding_scheme: str | None = None):
    """-> (PackedModel, params {name: numpy} or None) for `preset` with `scheme_name` ("none" = fp16 dense) and
    the embedding / lm_head with `embedding_scheme` (None = fp16).

    `materialize=False` gives the records only (enough to compile; a 7B fp16 model is 13.5 GB of arrays).
    """
    from mlc_schemes.compile import PackedModel

    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = dict(PRESETS[preset])
    linears = _linears(cfg)
    from mlc_schemes.schemes import get_scheme

    scheme = get_scheme(scheme_name) if scheme_name not in NO_QUANT else None
    embed = get_scheme(embedding_scheme) if embedding_scheme else None
    specs = _specs(cfg, scheme, linears, embed)
    params = dict(_tensors(specs, scheme, embed, seed)) if materialize else None
    context = min(context, cfg["max_position_embeddings"])
    qcfg = (scheme.to_json() | {"quantized_linears": linears}) if scheme else {}
    emb_names = {"model.embed_tokens": [cfg["vocab_size"], cfg["hidden_size"]]}
    if not cfg["tie_word_embeddings"]:
        emb_names["lm_head"] = [cfg["vocab_size"], cfg["hidden_size"]]
    if embed is not None:
        qcfg["embedding_quantization"] = embed.to_json() | {"quantized_tensors": emb_names}
    chat = {"model_type": cfg["model_type"], "quantization": scheme.name if scheme else "none",
            "quantization_config": qcfg, "model_config": cfg, "vocab_size": cfg["vocab_size"],
            "context_window_size": context, "prefill_chunk_size": context, "eos_token_id": None}
    records = {name: (shape, dtype) for name, shape, dtype, _ in specs}
    pm = PackedModel(Path(f"<random {preset}>"), chat, scheme, set(linears) if scheme else set(), records,
                     embed, set(emb_names) if embed else frozenset())
    return pm, params


def write_random_packed_dir(preset: str, scheme_name: str, out: str | Path, seed: int = 0, context: int = 2048,
                            embedding_scheme: str | None = None):
    """Write `random_packed_model`'s weights to `out` as a packed weights dir (tensor cache + mlc-chat-config.json,
    no tokenizer), one tensor at a time (memory stays at one shard), into a temporary sibling renamed at the end.
    Returns the PackedModel read back from `out`."""
    import json
    import shutil

    from mlc_schemes.compile import read_packed_model
    from mlc_schemes.schemes import get_scheme
    from mlc_schemes.weights_dir import CHAT_CONFIG, write_tensor_cache

    out = Path(out)
    if out.exists():
        raise UserError(f"{out} exists; remove it or choose another --weights-dir")
    pm, _ = random_packed_model(preset, scheme_name, seed, context, materialize=False,
                                embedding_scheme=embedding_scheme)
    scheme = get_scheme(scheme_name) if scheme_name not in NO_QUANT else None
    embed = get_scheme(embedding_scheme) if embedding_scheme else None
    cfg = pm.chat["model_config"]
    specs = _specs(cfg, scheme, _linears(cfg), embed)
    tmp = out.with_name(f".{out.name}.tmp-{__import__('os').getpid()}")
    tmp.mkdir(parents=True)
    try:
        # parameter count of the unquantized model: linears, embedding (+ untied lm_head), norms
        h, v = cfg["hidden_size"], cfg["vocab_size"]
        logical = sum(n * k for n, k in _linears(cfg).values()) + v * h * (1 if cfg["tie_word_embeddings"] else 2) \
            + h * (2 * cfg["num_hidden_layers"] + 1)
        write_tensor_cache(_tensors(specs, scheme, embed, seed), tmp, lambda: logical)
        (tmp / CHAT_CONFIG).write_text(json.dumps(pm.chat, indent=1))
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return read_packed_model(out)
