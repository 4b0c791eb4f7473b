"""Gemma 3 text decoder in `tvm.relax.frontend.nn` (`gemma3_text`; the language model of the multimodal `gemma3`).

    x = embed(ids) * sqrt(H)                          (the scale in the model dtype, as HF)
    per layer:  n = norm(x);  q, k, v = split(qkv_proj(n));  q = rope(norm_head(q)), k = rope(norm_head(k))
                x = x + post_attention_norm(o_proj(attn(q, k, v)))        scale query_pre_attn_scalar^-1/2, GQA
                x = x + post_feedforward_norm(down(gelu_tanh(gate(m)) * up(m))),  m = pre_feedforward_norm(x)
    logits = norm(x) @ embed^T   (tied), then cap * tanh(logits / cap) when final_logit_softcapping is set

Every norm is an RMSNorm scaling by (1 + w), computed in float32. head_dim is independent of hidden / heads.
Local (sliding-window) layers and global ones alternate (`layer_types`, or the older `sliding_window_pattern`),
each kind with its own RoPE base (`rope_parameters[...]["rope_theta"]`, or `rope_local_base_freq` / `rope_theta`)
and scaling ("default" or "linear"), so RoPE runs in the model, fused with the q/k norms (`qk_head_norm`, KV
cache in RopeMode.NONE); local layers attend through the KV cache's per-layer sliding window (model/base.py).

Parameter mapping: HF names of Gemma3ForCausalLM, q/k/v and gate/up fused as in Llama. A multimodal `gemma3`
checkpoint is read through `source_view`: its text config, `model.language_model.*` -> `model.*`, the vision tower
and projector dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tvm import tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode

from mlc_schemes.model import llama
from mlc_schemes.model.base import (
    DecoderConfig,
    DecoderForCausalLM,
    HeadRope,
    ParamBuilder,
    RMSNorm,
    attention_scale,
    qk_head_norm,
    sliding_from_layer_types,
)

MODEL_TYPES = ("gemma3_text", "gemma3")
GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh")
# the text model's tensors: module names (`model.language_model.*`, as the calibration sidecar names them) and the
# names transformers writes to disk (`language_model.model.*`, the Hub layout) -> Gemma3ForCausalLM's names
_TEXT_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                  ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head."))


def _head_rope(params: dict | None, theta_default: float, where: str) -> HeadRope:
    params = dict(params or {})
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear"):
        raise ValueError(f"Gemma 3 RoPE scaling {kind!r} ({where} layers) is not supported (supported: default, linear)")
    scale = 1.0 / float(params["factor"]) if kind == "linear" else 1.0
    return HeadRope(float(params.get("rope_theta") or theta_default), scale)


@dataclass
class Gemma3Config(llama.LlamaConfig):
    query_pre_attn_scalar: float = 256.0
    rope_local: HeadRope = field(default_factory=lambda: HeadRope(10000.0))
    rope_global: HeadRope = field(default_factory=lambda: HeadRope(1_000_000.0))

    @classmethod
    def from_chat_config(cls, chat: dict) -> Gemma3Config:
        mc = chat["model_config"]
        n = mc["num_hidden_layers"]
        for key, why in (("attn_logit_softcapping", "attention logit soft-capping"),
                         ("use_bidirectional_attention", "bidirectional attention")):
            if mc.get(key):
                raise ValueError(f"Gemma 3 with {why} ({key}={mc[key]}) is not supported by the TVM model")
        if mc.get("hidden_activation", "gelu_pytorch_tanh") not in GELU_TANH:
            raise ValueError(f"Gemma 3 hidden_activation {mc['hidden_activation']!r} is not supported "
                             f"(supported: {', '.join(GELU_TANH)})")
        sliding = sliding_from_layer_types(mc)
        if sliding is None:  # configs before `layer_types`: every pattern-th layer is global
            pattern = int(mc.get("sliding_window_pattern") or mc.get("_sliding_window_pattern") or 6)
            sliding = [bool((i + 1) % pattern) for i in range(n)]
        rope = mc.get("rope_parameters") or {}
        if "sliding_attention" in rope or "full_attention" in rope:  # transformers 5: one dict per layer type
            local = _head_rope(rope.get("sliding_attention"), 10000.0, "local")
            glob = _head_rope(rope.get("full_attention"), 1_000_000.0, "global")
        else:
            local = HeadRope(float(mc.get("rope_local_base_freq") or 10000.0))
            glob = _head_rope({**(mc.get("rope_scaling") or {}), "rope_theta": mc.get("rope_theta")}, 1_000_000.0,
                              "global")
        return cls(
            **DecoderConfig.common_fields(chat, sliding, mc.get("sliding_window")),
            rope_theta=glob.theta,  # unused by the KV cache (RopeMode.NONE)
            attention_bias=bool(mc.get("attention_bias", False)),
            query_pre_attn_scalar=float(mc.get("query_pre_attn_scalar") or mc.get("head_dim") or 256),
            rope_local=local,
            rope_global=glob,
            final_logit_softcapping=mc.get("final_logit_softcapping"),
        )


def source_view(hf_config: dict):
    """(config, tensor name map) of the checkpoint as this model reads it. `gemma3_text`: as it is. `gemma3`
    (multimodal): the text config, `model.language_model.X` (or on disk `language_model.model.X`) -> `model.X`,
    the lm_head kept, everything else (vision tower, projector) mapped to None (not deployed). Gemma3ForConditionalGeneration applies no final
    logit soft-capping, so the text config's is dropped to keep the deployed model equal to the checkpoint's."""
    if hf_config.get("model_type") != "gemma3":
        return hf_config, lambda name: name
    text = dict(hf_config.get("text_config") or {})
    text["model_type"] = "gemma3_text"
    text["final_logit_softcapping"] = None
    for key in ("tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
        if text.get(key) is None and hf_config.get(key) is not None:
            text[key] = hf_config[key]

    def rename(name: str) -> str | None:
        for prefix, deployed in _TEXT_PREFIXES:
            if name.startswith(prefix):
                return deployed + name[len(prefix):]
        return None

    return text, rename


def _norm(cfg: Gemma3Config, dtype: str, width: int | None = None) -> RMSNorm:
    return RMSNorm(width or cfg.hidden_size, cfg.rms_norm_eps, dtype, offset=1.0)


class Gemma3Attention(llama.Attention):
    def __init__(self, cfg: Gemma3Config, layer: int, b: ParamBuilder):
        super().__init__(cfg, layer, b)
        self.sm_scale = attention_scale(cfg.head_dim, cfg.query_pre_attn_scalar)
        self.q_norm = _norm(cfg, b.dtype, cfg.head_dim)
        self.k_norm = _norm(cfg, b.dtype, cfg.head_dim)
        self.rope = cfg.rope_local if cfg.local_layers[layer] else cfg.rope_global

    def _qkv(self, x: nn.Tensor, kv: PagedKVCache) -> nn.Tensor:
        cfg = self.cfg
        bsz, seq, _ = x.shape
        positions = kv.get_query_positions(bsz * seq)
        return qk_head_norm(super()._qkv(x, kv), self.q_norm.weight, self.k_norm.weight, cfg.num_attention_heads,
                            cfg.num_key_value_heads, cfg.rms_norm_eps, offset=1.0, positions=positions,
                            rope=self.rope)


class Gemma3MLP(llama.MLP):
    @staticmethod
    def act(gate: nn.Tensor) -> nn.Tensor:
        return op.gelu(gate, approximate="tanh")

    @staticmethod
    def act_f32(g):
        """gelu_tanh(g) = g/2 (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))."""
        return 0.5 * g * (1.0 + tirx.tanh(math.sqrt(2.0 / math.pi) * (g + 0.044715 * g * g * g)))


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, cfg: Gemma3Config, layer: int, b: ParamBuilder, dtype: str):
        self.self_attn = Gemma3Attention(cfg, layer, b)
        self.mlp = Gemma3MLP(cfg, layer, b)
        self.input_layernorm = _norm(cfg, dtype)
        self.post_attention_layernorm = _norm(cfg, dtype)
        self.pre_feedforward_layernorm = _norm(cfg, dtype)
        self.post_feedforward_layernorm = _norm(cfg, dtype)

    def forward(self, x: nn.Tensor, kv: PagedKVCache) -> nn.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), kv))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3TextModel(llama.LlamaModel):
    layer_cls = Gemma3DecoderLayer

    def __init__(self, cfg: Gemma3Config, b: ParamBuilder, dtype: str):
        super().__init__(cfg, b, dtype)
        self.norm = _norm(cfg, dtype)


class Gemma3ForCausalLM(DecoderForCausalLM):
    """The whole model (module docstring). RoPE runs in the model, per layer kind (KV cache RopeMode.NONE)."""

    rope_mode = RopeMode.NONE

    def __init__(self, cfg: Gemma3Config, scheme, quantized: set[str], dtype: str, backend: str, target,
                 embed_scheme=None, quantized_embed: set[str] = frozenset()):
        b = ParamBuilder(scheme, quantized, dtype, backend, embed_scheme, quantized_embed)
        self.model = Gemma3TextModel(cfg, b, dtype)
        self._init_head(cfg, b, dtype, backend, target)

    def embed(self, input_ids: nn.Tensor) -> nn.Tensor:
        # HF multiplies by sqrt(H) cast to the weights' dtype (float16 rounds it), then in that dtype
        return self.model.embed_tokens(input_ids) * math.sqrt(self.cfg.hidden_size)


Config, Model = Gemma3Config, Gemma3ForCausalLM
