"""Llama-family decoder in `tvm.relax.frontend.nn` (Llama 2/3, Mistral, Qwen2), reading a packed weights dir.

Parameter mapping: the HF names (`model.norm.weight`, `model.layers.0.mlp.down_proj.q_weight`, ...), except that
q/k/v and gate/up run as one linear each (`self_attn.qkv_proj`, `mlp.gate_up_proj`, MLC's names) whose parameters
the engine concatenates from the packed HF-named tensors at load (`param_concat`); the checkpoint needs no
renaming (`source_view`). Per layer:

    h = x + o_proj(attn(rope(q_proj(rms(x))), rope(k_proj(.)), v_proj(.)))        GQA, KV heads repeated
    out = h + down_proj(silu(gate_proj(rms(h))) * up_proj(rms(h)))               SwiGLU

RoPE (config theta; "default" or "llama3" scaling) is applied inside the paged KV cache
(`relax.frontend.nn.llm.kv_cache.TIRPagedKVCache`, RopeMode.NORMAL), as in MLC-LLM. Sliding windows: Mistral's
`sliding_window` makes every layer local, Qwen2's `layer_types` the layers it names (see model/base.py).
Exported functions: model/base.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import te
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache

from mlc_schemes.model.base import (
    DecoderConfig,
    DecoderForCausalLM,
    ParamBuilder,
    RMSNorm,
    attention_scale,
    rope_settings,
    sliding_from_layer_types,
)
from mlc_schemes.model.kernels import LOG2E, exp2_poly

MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass
class LlamaConfig(DecoderConfig):
    attention_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_chat_config(cls, chat: dict) -> LlamaConfig:
        mc = chat["model_config"]
        model_type = mc.get("model_type", chat.get("model_type"))
        theta, _ = rope_settings(mc.get("rope_parameters"))
        theta = mc.get("rope_theta") or theta or 10000.0
        _, scaling = rope_settings(mc.get("rope_scaling"))
        sliding = sliding_from_layer_types(mc)
        if sliding is None:  # Mistral: one window for every layer (null: none)
            sliding = [model_type == "mistral"] * mc["num_hidden_layers"]
        return cls(
            **DecoderConfig.common_fields(chat, sliding, mc.get("sliding_window")),
            rope_theta=float(theta),
            rope_scaling=scaling,
            # Qwen2 always has q/k/v biases; Llama only with attention_bias.
            attention_bias=model_type == "qwen2" or bool(mc.get("attention_bias", False)),
            mlp_bias=bool(mc.get("mlp_bias", False)),
        )


def source_view(hf_config: dict):
    """(config, tensor name map) of the checkpoint as this model reads it: as it is."""
    return hf_config, lambda name: name


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int, b: ParamBuilder):
        p = f"model.layers.{layer}.self_attn."
        h, d = cfg.hidden_size, cfg.head_dim
        self.layer, self.cfg = layer, cfg
        self.sm_scale = attention_scale(d)
        names = [p + "q_proj", p + "k_proj", p + "v_proj"]
        ns = [cfg.num_attention_heads * d, cfg.num_key_value_heads * d, cfg.num_key_value_heads * d]
        self.qkv_proj = b.fused_linear(p + "qkv_proj", names, h, ns, cfg.attention_bias)
        if self.qkv_proj is None:
            self.q_proj, self.k_proj, self.v_proj = (b.linear(nm, h, n, cfg.attention_bias) for nm, n in zip(names, ns))
        # HF: o_proj has a bias with attention_bias, except in Qwen2 (biases on q/k/v only)
        self.o_proj = b.linear(p + "o_proj", cfg.num_attention_heads * d, h,
                               cfg.attention_bias and cfg.model_type != "qwen2")

    def _qkv(self, x: nn.Tensor, kv: PagedKVCache) -> nn.Tensor:
        """x [b, s, H] -> qkv [b, s, n_q + 2 n_kv, d] as the KV cache takes it (architectures insert q/k norms)."""
        cfg = self.cfg
        bsz, seq, _ = x.shape
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x)
        else:
            qkv = op.concat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        return op.reshape(qkv, (bsz, seq, cfg.num_attention_heads + 2 * cfg.num_key_value_heads, cfg.head_dim))

    def forward(self, x: nn.Tensor, kv: PagedKVCache) -> nn.Tensor:
        cfg = self.cfg
        bsz, seq, _ = x.shape
        out = kv.attention_with_fused_qkv(self.layer, self._qkv(x, kv), cfg.num_attention_heads,
                                          sm_scale=self.sm_scale)
        return self.o_proj(op.reshape(out, (bsz, seq, cfg.num_attention_heads * cfg.head_dim)))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int, b: ParamBuilder):
        p = f"model.layers.{layer}.mlp."
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.intermediate = i
        names = [p + "gate_proj", p + "up_proj"]
        self.gate_up_proj = b.fused_linear(p + "gate_up_proj", names, h, [i, i], cfg.mlp_bias)
        if self.gate_up_proj is None:
            self.gate_proj, self.up_proj = (b.linear(nm, h, i, cfg.mlp_bias) for nm in names)
        self.down_proj = b.linear(p + "down_proj", i, h, cfg.mlp_bias)

    @staticmethod
    def act(gate: nn.Tensor) -> nn.Tensor:
        """The gate activation (SwiGLU: silu), for the unfused path."""
        return op.silu(gate)

    @staticmethod
    def act_f32(g):
        """The gate activation on one float32 TE value, for the fused kernel: silu(g) = g / (1 + exp(-g))."""
        return g / (1.0 + exp2_poly(g * -LOG2E))  # exp(-g) without a libm call per element

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        if self.gate_up_proj is None:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        i, act = self.intermediate, self.act_f32

        def act_mul(gu: te.Tensor):  # [..., 2I] -> act(gate) * up, one elementwise kernel
            *lead, _ = gu.shape

            def f(*idx):
                g = gu[(*idx[:-1], idx[-1])].astype("float32")
                return (act(g) * gu[(*idx[:-1], idx[-1] + i)].astype("float32")).astype(gu.dtype)

            return te.compute((*lead, i), f, name="act_mul")

        return self.down_proj(op.tensor_expr_op(act_mul, "act_mul", [self.gate_up_proj(x)]))


class DecoderLayer(nn.Module):
    attention_cls, mlp_cls = Attention, MLP

    def __init__(self, cfg: LlamaConfig, layer: int, b: ParamBuilder, dtype: str):
        self.self_attn = self.attention_cls(cfg, layer, b)
        self.mlp = self.mlp_cls(cfg, layer, b)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, x: nn.Tensor, kv: PagedKVCache) -> nn.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    layer_cls = DecoderLayer

    def __init__(self, cfg: LlamaConfig, b: ParamBuilder, dtype: str):
        self.embed_tokens = b.embedding(cfg.vocab_size, cfg.hidden_size, tied=cfg.tie_word_embeddings)
        self.layers = nn.ModuleList([self.layer_cls(cfg, i, b, dtype) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, x: nn.Tensor, kv: PagedKVCache) -> nn.Tensor:
        for layer in self.layers:
            x = layer(x, kv)
        return self.norm(x)


class LlamaForCausalLM(DecoderForCausalLM):
    """The whole model. `dtype` is the activation / dense-weight dtype ("float16" deployment, "float32" exact)."""

    model_cls = LlamaModel

    def __init__(self, cfg: LlamaConfig, scheme, quantized: set[str], dtype: str, backend: str, target,
                 embed_scheme=None, quantized_embed: set[str] = frozenset()):
        b = ParamBuilder(scheme, quantized, dtype, backend, embed_scheme, quantized_embed)
        self.model = self.model_cls(cfg, b, dtype)
        self._init_head(cfg, b, dtype, backend, target)


Config, Model = LlamaConfig, LlamaForCausalLM
