"""Llama-family decoder in `tvm.relax.frontend.nn` (Llama 2/3, Mistral, Qwen2), reading a packed weights dir.

Parameter names are the HF ones (`model.norm.weight`, `model.layers.0.mlp.down_proj.q_weight`, ...), except that
q/k/v and gate/up run as one linear each (`self_attn.qkv_proj`, `mlp.gate_up_proj`, MLC's names) whose parameters
the engine concatenates from the packed HF-named tensors at load (`param_concat`). Per layer:

    h = x + o_proj(attn(rope(q_proj(rms(x))), rope(k_proj(.)), v_proj(.)))        GQA, KV heads repeated
    out = h + down_proj(silu(gate_proj(rms(h))) * up_proj(rms(h)))               SwiGLU

RoPE (config theta; "default" or "llama3" scaling) is applied inside the paged KV cache
(`relax.frontend.nn.llm.kv_cache.TIRPagedKVCache`, RopeMode.NORMAL), as in MLC-LLM. Exported functions, MLC style:
`embed(input_ids[s]) -> [s, H]`, `prefill(embed[1, s, H], kv) -> (logits[1, 1, V] f32, kv)` (last position),
`prefill_logits(...) -> (logits[1, s, V] f32, kv)` (every position; for perplexity),
`decode(embed[1, 1, H], kv) -> (logits[1, 1, V] f32, kv)`, and `create_paged_kv_cache(...)`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

from tvm import relax as rx
from tvm import te
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op, spec
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache

from mlc_schemes.model.attention_cpu import patched_cpu_attention
from mlc_schemes.model.kernels import LOG2E, exp2_poly
from mlc_schemes.model.linear import DenseLinear, QuantEmbedding, QuantLinear, matmul_nt

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass
class LlamaConfig:
    """The network fields the model needs, read from `mlc-chat-config.json` (`model_config` = HF config)."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict = field(default_factory=dict)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    context_window_size: int = 2048
    prefill_chunk_size: int = 2048

    @classmethod
    def from_chat_config(cls, chat: dict) -> LlamaConfig:
        mc = chat["model_config"]
        model_type = mc.get("model_type", chat.get("model_type"))
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not supported by the TVM model; "
                             f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        rope = mc.get("rope_parameters") or {}
        theta = mc.get("rope_theta") or rope.get("rope_theta") or 10000.0
        scaling = dict(mc.get("rope_scaling") or {})
        if scaling.get("rope_type", scaling.get("type", "default")) == "default":
            scaling = {}
        elif scaling.get("rope_type") != "llama3":
            raise ValueError(f"RoPE scaling {scaling.get('rope_type') or scaling.get('type')!r} is not supported "
                             "(supported: default, llama3)")
        heads = mc["num_attention_heads"]
        context = int(chat.get("context_window_size") or mc.get("max_position_embeddings") or 2048)
        return cls(
            model_type=model_type,
            hidden_size=mc["hidden_size"],
            intermediate_size=mc["intermediate_size"],
            num_hidden_layers=mc["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=mc.get("num_key_value_heads") or heads,
            head_dim=mc.get("head_dim") or mc["hidden_size"] // heads,
            vocab_size=mc["vocab_size"],
            rms_norm_eps=float(mc.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            tie_word_embeddings=bool(mc.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases; Llama only with attention_bias.
            attention_bias=model_type == "qwen2" or bool(mc.get("attention_bias", False)),
            mlp_bias=bool(mc.get("mlp_bias", False)),
            context_window_size=context,
            prefill_chunk_size=int(chat.get("prefill_chunk_size") or min(context, 2048)),
        )


class _Builder:
    """Makes each linear quantized or dense according to the packed dir's `quantized_linears`, and the embedding /
    lm_head according to its `embedding_quantization` (`embed_scheme`, `quantized_embed` names)."""

    def __init__(self, scheme, quantized: set[str], dtype: str, backend: str, embed_scheme=None,
                 quantized_embed: set[str] = frozenset()):
        self.scheme, self.quantized, self.dtype, self.backend = scheme, quantized, dtype, backend
        self.embed_scheme, self.quantized_embed = embed_scheme, quantized_embed
        self.concat: dict[str, list[str]] = {}

    def linear(self, name: str, k: int, n: int, bias: bool):
        if name in self.quantized:
            return QuantLinear(k, n, self.scheme, bias=bias, dtype=self.dtype, backend=self.backend)
        if name in self.quantized_embed:  # an untied lm_head
            return QuantLinear(k, n, self.embed_scheme, bias=bias, dtype=self.dtype, backend=self.backend)
        return DenseLinear(k, n, bias=bias, dtype=self.dtype, backend=self.backend)

    def fused_linear(self, fused: str, names: list[str], k: int, ns: list[int], bias: bool):
        """One linear computing the linears `names` (same input, outputs concatenated along N), named `fused`; or
        None when they are not all quantized or all dense. The engine builds its parameters at load by
        concatenating the sources' (`concat`: fused param -> source params), as MLC's converter does."""
        kinds = {name in self.quantized for name in names}
        if len(kinds) != 1 or any(name in self.quantized_embed for name in names):
            return None
        lin = self.linear(names[0], k, sum(ns), bias)
        for sfx, _ in lin.named_parameters():  # q_weight, q_scale (, q_zero) or weight (, bias)
            self.concat[f"{fused}.{sfx}"] = [f"{name}.{sfx}" for name in names]
        return lin

    def embedding(self, vocab: int, hidden: int):
        if "model.embed_tokens" in self.quantized_embed:
            return QuantEmbedding(vocab, hidden, self.embed_scheme, dtype=self.dtype)
        return nn.Embedding(vocab, hidden, dtype=self.dtype)


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float, dtype: str):
        self.weight = nn.Parameter((hidden,), dtype)
        self.eps = eps

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return op.rms_norm(x, self.weight, axes=-1, epsilon=self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int, b: _Builder):
        p = f"model.layers.{layer}.self_attn."
        h, d = cfg.hidden_size, cfg.head_dim
        self.layer, self.cfg = layer, cfg
        names = [p + "q_proj", p + "k_proj", p + "v_proj"]
        ns = [cfg.num_attention_heads * d, cfg.num_key_value_heads * d, cfg.num_key_value_heads * d]
        self.qkv_proj = b.fused_linear(p + "qkv_proj", names, h, ns, cfg.attention_bias)
        if self.qkv_proj is None:
            self.q_proj, self.k_proj, self.v_proj = (b.linear(nm, h, n, cfg.attention_bias) for nm, n in zip(names, ns))
        self.o_proj = b.linear(p + "o_proj", cfg.num_attention_heads * d, h, False)

    def forward(self, x: nn.Tensor, kv: PagedKVCache) -> nn.Tensor:
        cfg = self.cfg
        bsz, seq, _ = x.shape
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x)
        else:
            qkv = op.concat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        qkv = op.reshape(qkv, (bsz, seq, cfg.num_attention_heads + 2 * cfg.num_key_value_heads, cfg.head_dim))
        out = kv.attention_with_fused_qkv(self.layer, qkv, cfg.num_attention_heads,
                                          sm_scale=1.0 / math.sqrt(cfg.head_dim))
        return self.o_proj(op.reshape(out, (bsz, seq, cfg.num_attention_heads * cfg.head_dim)))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int, b: _Builder):
        p = f"model.layers.{layer}.mlp."
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.intermediate = i
        names = [p + "gate_proj", p + "up_proj"]
        self.gate_up_proj = b.fused_linear(p + "gate_up_proj", names, h, [i, i], cfg.mlp_bias)
        if self.gate_up_proj is None:
            self.gate_proj, self.up_proj = (b.linear(nm, h, i, cfg.mlp_bias) for nm in names)
        self.down_proj = b.linear(p + "down_proj", i, h, cfg.mlp_bias)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        if self.gate_up_proj is None:
            return self.down_proj(op.silu(self.gate_proj(x)) * self.up_proj(x))
        i = self.intermediate

        def silu_mul(gu: te.Tensor):  # [..., 2I] -> silu(gate) * up, one elementwise kernel
            *lead, _ = gu.shape

            def f(*idx):
                g = gu[(*idx[:-1], idx[-1])].astype("float32")
                e = exp2_poly(g * -LOG2E)  # exp(-g) without a libm call per element
                return (g / (1.0 + e) * gu[(*idx[:-1], idx[-1] + i)].astype("float32")).astype(gu.dtype)

            return te.compute((*lead, i), f, name="silu_mul")

        return self.down_proj(op.tensor_expr_op(silu_mul, "silu_mul", [self.gate_up_proj(x)]))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int, b: _Builder, dtype: str):
        self.self_attn = Attention(cfg, layer, b)
        self.mlp = MLP(cfg, layer, b)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, x: nn.Tensor, kv: PagedKVCache) -> nn.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig, b: _Builder, dtype: str):
        self.embed_tokens = b.embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg, i, b, dtype) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, x: nn.Tensor, kv: PagedKVCache) -> nn.Tensor:
        for layer in self.layers:
            x = layer(x, kv)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """The whole model. `dtype` is the activation / dense-weight dtype ("float16" deployment, "float32" exact)."""

    def __init__(self, cfg: LlamaConfig, scheme, quantized: set[str], dtype: str, backend: str, target,
                 embed_scheme=None, quantized_embed: set[str] = frozenset()):
        b = _Builder(scheme, quantized, dtype, backend, embed_scheme, quantized_embed)
        self.cfg, self.dtype, self.backend, self.target = cfg, dtype, backend, target
        self.model = LlamaModel(cfg, b, dtype)
        self.param_concat = b.concat  # fused parameter -> packed tensors concatenated along axis 0 at load
        if not cfg.tie_word_embeddings:
            self.lm_head = b.linear("lm_head", cfg.hidden_size, cfg.vocab_size, False)
        else:
            self.lm_head = None  # tied: logits reuse the embedding table (same parameter, no copy)

    def _logits(self, h: nn.Tensor) -> nn.Tensor:
        if self.lm_head is not None:
            logits = self.lm_head(h)
        elif isinstance(emb := self.model.embed_tokens, QuantEmbedding):
            logits = matmul_nt(h, emb.weights(), self.cfg.vocab_size, emb.spec, self.dtype, self.backend)
        else:
            logits = matmul_nt(h, [emb.weight], self.cfg.vocab_size, None, self.dtype, self.backend)
        return logits.astype("float32") if logits.dtype != "float32" else logits

    def embed(self, input_ids: nn.Tensor) -> nn.Tensor:
        return self.model.embed_tokens(input_ids)

    def prefill(self, input_embed: nn.Tensor, paged_kv_cache: PagedKVCache):
        h = self.model(input_embed, paged_kv_cache)

        def last(x: te.Tensor):
            b, s, d = x.shape
            return te.compute((b, 1, d), lambda i, _, j: x[i, s - 1, j], name="last_token")

        h = op.tensor_expr_op(last, "last_token", args=[h])
        return self._logits(h), paged_kv_cache

    def prefill_logits(self, input_embed: nn.Tensor, paged_kv_cache: PagedKVCache):
        return self._logits(self.model(input_embed, paged_kv_cache)), paged_kv_cache

    def decode(self, input_embed: nn.Tensor, paged_kv_cache: PagedKVCache):
        return self._logits(self.model(input_embed, paged_kv_cache)), paged_kv_cache

    def create_paged_kv_cache(self, max_batch_size, max_total_seq_len, prefill_chunk_size, page_size,
                              support_sliding_window) -> PagedKVCache:
        cfg = self.cfg
        # CPU: our attention kernels instead of TVM's serial reference ones (mlc_schemes.model.attention_cpu)
        with patched_cpu_attention() if self.backend == "cpu" else contextlib.nullcontext():
            return self._paged_kv_cache(max_batch_size, max_total_seq_len, prefill_chunk_size, page_size,
                                        support_sliding_window)

    def _paged_kv_cache(self, max_batch_size, max_total_seq_len, prefill_chunk_size, page_size,
                        support_sliding_window) -> PagedKVCache:
        cfg = self.cfg
        return TIRPagedKVCache(
            attn_kind="mha",
            max_batch_size=max_batch_size,
            max_total_seq_len=max_total_seq_len,
            prefill_chunk_size=prefill_chunk_size,
            page_size=page_size,
            support_sliding_window=support_sliding_window,
            layer_partition=rx.ShapeExpr([0, cfg.num_hidden_layers]),
            num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_key_value_heads,
            qk_head_dim=cfg.head_dim,
            v_head_dim=cfg.head_dim,
            mla_original_qk_head_dim=0,
            mla_original_v_head_dim=0,
            rope_mode=RopeMode.NORMAL,
            rope_scale=1,
            rope_theta=cfg.rope_theta,
            rope_scaling=cfg.rope_scaling,
            rope_ext_factors=rx.prim_value(0),
            rotary_dim=cfg.head_dim,
            enable_disaggregation=False,
            dtype=self.dtype,
            target=self.target,
        )

    def get_default_spec(self):
        h, dt = self.cfg.hidden_size, self.dtype
        packed = {"param_mode": "packed", "effect_mode": "none"}
        kv = spec.Object(object_type=PagedKVCache)
        return {
            "embed": {"input_ids": spec.Tensor(["seq_len"], "int32"), "$": packed},
            "prefill": {"input_embed": spec.Tensor([1, "seq_len", h], dt), "paged_kv_cache": kv, "$": packed},
            "prefill_logits": {"input_embed": spec.Tensor([1, "seq_len", h], dt), "paged_kv_cache": kv, "$": packed},
            "decode": {"input_embed": spec.Tensor([1, 1, h], dt), "paged_kv_cache": kv, "$": packed},
            "create_paged_kv_cache": {
                "max_batch_size": int, "max_total_seq_len": int, "prefill_chunk_size": int, "page_size": int,
                "support_sliding_window": int, "$": {"param_mode": "none", "effect_mode": "none"},
            },
        }
