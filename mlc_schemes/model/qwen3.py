"""Qwen3 decoder in `tvm.relax.frontend.nn`: the Llama block (model/llama.py) plus a per-head RMSNorm on q and on
k before RoPE. Per layer:

    q, k, v = split(qkv_proj(rms(x)));  q = rms_head(q) * q_norm,  k = rms_head(k) * k_norm     (over head_dim)
    h = x + o_proj(attn(rope(q), rope(k), v));  out = h + down_proj(silu(gate) * up)

The q/k norms run as one kernel on the fused qkv tensor (`qk_head_norm`); RoPE stays in the KV cache (one theta
for every layer). No q/k/v bias unless `attention_bias`; tied embeddings at small sizes; `layer_types` may make
layers local (`use_sliding_window`, `max_window_layers`).

Parameter mapping: HF names, q/k/v and gate/up fused as in Llama, plus `self_attn.q_norm.weight` /
`self_attn.k_norm.weight` [head_dim]; no renaming (`source_view`).
"""

from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache

from mlc_schemes.model import llama
from mlc_schemes.model.base import RMSNorm, qk_head_norm

MODEL_TYPES = ("qwen3",)
source_view = llama.source_view


class Qwen3Attention(llama.Attention):
    def __init__(self, cfg: llama.LlamaConfig, layer: int, b):
        super().__init__(cfg, layer, b)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, b.dtype)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, b.dtype)

    def _qkv(self, x: nn.Tensor, kv: PagedKVCache) -> nn.Tensor:
        cfg = self.cfg
        return qk_head_norm(super()._qkv(x, kv), self.q_norm.weight, self.k_norm.weight, cfg.num_attention_heads,
                            cfg.num_key_value_heads, cfg.rms_norm_eps, offset=0.0)


class Qwen3DecoderLayer(llama.DecoderLayer):
    attention_cls = Qwen3Attention


class Qwen3Model(llama.LlamaModel):
    layer_cls = Qwen3DecoderLayer


class Qwen3ForCausalLM(llama.LlamaForCausalLM):
    model_cls = Qwen3Model


Config, Model = llama.LlamaConfig, Qwen3ForCausalLM

