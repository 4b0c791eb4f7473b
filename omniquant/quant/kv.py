"""Quantized q/k/v heads (the KV cache and the query) through a registered transformers attention function.

HF attention modules apply RoPE and then call `ALL_ATTENTION_FUNCTIONS[config._attn_implementation](module, q, k, v,
mask, ...)` with q [b, n_heads, L, d], k/v [b, n_kv_heads, L, d] — the exact tensors a KV cache stores. Registering
one function under `ATTN_NAME` lets us quantize them for every architecture without touching modeling code:

    q, k, v <- per-token-per-head dynamic asymmetric fake-quant at kv_bits (over head_dim; see quant/act.py)
    out     =  SDPA(q, k, v)            (softmax output stays full precision, as in the reference)

Modules without a `KV_QUANT_ATTR` quantizer (blocks not yet calibrated) run plain SDPA, so switching the model's
attention implementation is safe to do once for the whole model.
"""

from __future__ import annotations

from torch import nn

ATTN_NAME = "omniquant_kvq"
KV_QUANT_ATTR = "omniquant_kv_quantizer"


def _kvq_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q = getattr(module, KV_QUANT_ATTR, None)
    if q is not None:
        query, key, value = q(query), q(key), q(value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register() -> None:
    """Register `ATTN_NAME` (attention = quantize + SDPA, mask = the SDPA mask); idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, _kvq_attention)
    if ATTN_NAME not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def enable(model: nn.Module) -> str:
    """Switch `model` to the quantizing attention; returns the previous implementation name (to restore on export)."""
    register()
    prev = model.config._attn_implementation
    model.config._attn_implementation = ATTN_NAME
    return prev


def attach(attn_module: nn.Module, quantizer: nn.Module) -> None:
    setattr(attn_module, KV_QUANT_ATTR, quantizer)
