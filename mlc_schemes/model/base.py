"""What every architecture's TVM model shares: the config fields of a decoder, the parameter builder (quantized or
dense linears under HF names, fused q/k/v and gate/up), RMSNorm, per-head q/k RMSNorm (+ RoPE), the paged KV cache
with per-layer sliding windows, and the exported functions.

Exported functions, MLC style: `embed(input_ids[s]) -> [s, H]`, `prefill(embed[1, s, H], kv) -> (logits[1, 1, V]
f32, kv)` (last position), `prefill_logits(...) -> (logits[1, s, V] f32, kv)` (every position; for perplexity),
`decode(embed[1, 1, H], kv) -> (logits[1, 1, V] f32, kv)`, and `create_paged_kv_cache(...)`.

Sliding windows. A local layer lets token i see tokens j with i - W < j <= i (HF's `sliding_window` W). The layer
is declared `mha_sliding` to TVM's paged KV cache (`layer_sliding_window_size` W): it attends to the cached tokens
of its window, but TVM's ragged prefill kernel (the new tokens among themselves) has no window, so a prefill
chunk must not exceed W (`DecoderConfig.prefill_chunk_size` is capped; the engine splits prompts into chunks).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

from tvm import relax as rx
from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op, spec
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache

from mlc_schemes.model.attention_cpu import patched_cpu_attention
from mlc_schemes.model.attention_sliding_cpu import patched_sliding_attention
from mlc_schemes.model.linear import DenseLinear, QuantEmbedding, QuantLinear, matmul_nt

SUPPORTED_ROPE = ("default", "llama3")


def rope_settings(params: dict | None, where: str = "") -> tuple[float | None, dict]:
    """(theta, scaling) of an HF rope dict (`rope_parameters` of transformers 5, or `rope_scaling`): scaling {} for
    plain RoPE, the dict itself for llama3; any other type is refused (ValueError)."""
    params = dict(params or {})
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in SUPPORTED_ROPE:
        raise ValueError(f"RoPE scaling {kind!r}{where} is not supported (supported: {', '.join(SUPPORTED_ROPE)})")
    return params.get("rope_theta"), ({} if kind == "default" else params)


@dataclass
class DecoderConfig:
    """The network fields every decoder needs, read from `mlc-chat-config.json` (`model_config` = HF config).

    `local_layers[i]`: the checkpoint declares layer i local (sliding-window); `sliding_layers[i]`: the window is
    applied (it sees `sliding_window` tokens, itself included). A window that covers the whole context is not
    applied (nothing to cut, and prefill chunks stay long); a local layer keeps its own RoPE base (Gemma) anyway.
    """

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
    context_window_size: int = 2048
    prefill_chunk_size: int = 2048
    sliding_window: int = 0
    sliding_layers: tuple[bool, ...] = ()
    local_layers: tuple[bool, ...] = ()
    final_logit_softcapping: float | None = None

    @staticmethod
    def common_fields(chat: dict, sliding: list[bool], window: int | None) -> dict:
        """Fields read the same way for every architecture; `sliding` / `window` come from the architecture."""
        mc = chat["model_config"]
        heads = mc["num_attention_heads"]
        context = int(chat.get("context_window_size") or mc.get("max_position_embeddings") or 2048)
        chunk = int(chat.get("prefill_chunk_size") or min(context, 2048))
        if len(sliding) != mc["num_hidden_layers"]:
            raise ValueError(f"layer_types names {len(sliding)} layers, the model has {mc['num_hidden_layers']}")
        local = tuple(bool(s) for s in sliding)
        if not window or window >= context or not any(sliding):
            window, sliding = 0, [False] * mc["num_hidden_layers"]
        else:
            chunk = min(chunk, window)  # TVM's ragged prefill has no window (module docstring)
        return {
            "model_type": mc.get("model_type", chat.get("model_type")),
            "hidden_size": mc["hidden_size"],
            "intermediate_size": mc["intermediate_size"],
            "num_hidden_layers": mc["num_hidden_layers"],
            "num_attention_heads": heads,
            "num_key_value_heads": mc.get("num_key_value_heads") or heads,
            "head_dim": mc.get("head_dim") or mc["hidden_size"] // heads,
            "vocab_size": mc["vocab_size"],
            "rms_norm_eps": float(mc.get("rms_norm_eps", 1e-6)),
            "tie_word_embeddings": bool(mc.get("tie_word_embeddings", False)),
            "context_window_size": context,
            "prefill_chunk_size": chunk,
            "sliding_window": int(window),
            "sliding_layers": tuple(bool(s) for s in sliding),
            "local_layers": local,
        }


def sliding_from_layer_types(mc: dict) -> list[bool] | None:
    """Per-layer local attention from HF's `layer_types` ("sliding_attention" / "full_attention"), or None."""
    types = mc.get("layer_types")
    return None if not types else [t == "sliding_attention" for t in types]


class ParamBuilder:
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

    def embedding(self, vocab: int, hidden: int, tied: bool = False):
        """tied: the table is also the lm_head; a quantized one then takes the CPU kernels' row-interleaved layout
        (its logits GEMV is the largest of a small model's decode step; lookups read B-strided words)."""
        if "model.embed_tokens" in self.quantized_embed:
            return QuantEmbedding(vocab, hidden, self.embed_scheme, dtype=self.dtype,
                                  interleave=tied and self.backend == "cpu")
        return nn.Embedding(vocab, hidden, dtype=self.dtype)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * (w + offset) over the last axis; `offset` 1 is Gemma's (1 + w). With an
    offset the norm runs in float32 and casts once at the end, as HF's Gemma3RMSNorm does."""

    def __init__(self, hidden: int, eps: float, dtype: str, offset: float = 0.0):
        self.weight = nn.Parameter((hidden,), dtype)
        self.eps, self.offset, self.dtype = eps, offset, dtype

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        if not self.offset:
            return op.rms_norm(x, self.weight, axes=-1, epsilon=self.eps)
        w = self.weight.astype("float32") + self.offset
        y = op.rms_norm(x.astype("float32") if x.dtype != "float32" else x, w, axes=-1, epsilon=self.eps)
        return y.astype(self.dtype) if self.dtype != "float32" else y


@dataclass(frozen=True)
class HeadRope:
    """RoPE applied in the model (not in the KV cache): rotate-half over head_dim, frequencies theta^(-2i/d) of
    positions * `scale` (`scale` 1/factor is HF's "linear" scaling)."""

    theta: float
    scale: float = 1.0


def qk_head_norm(qkv: nn.Tensor, q_weight: nn.Tensor, k_weight: nn.Tensor, n_q: int, n_kv: int, eps: float,
                 offset: float, positions: nn.Tensor | None = None, rope: HeadRope | None = None) -> nn.Tensor:
    """Per-head RMSNorm of the q and k heads of qkv [b, s, n_q + 2 n_kv, d] (weights q_weight / k_weight [d], scale
    (w + offset)); v heads pass unchanged. With `rope` the normed q / k are then rotated at `positions` [b*s]
    (int32, from the KV cache). float32 inside, one kernel; cos / sin once per (token, frequency)."""
    b, s, heads, d = qkv.shape
    half = d // 2
    dtype = qkv.dtype

    def f(x: te.Tensor, wq: te.Tensor, wk: te.Tensor, *pos):
        r = te.reduce_axis((0, d), name="r")
        ss = te.compute((b, s, n_q + n_kv), lambda i, j, h: te.sum(
            x[i, j, h, r].astype("float32") * x[i, j, h, r].astype("float32"), axis=r), name="head_sumsq")

        def normed(i, j, h, c):
            w = tirx.if_then_else(h < n_q, wq[c], wk[c]).astype("float32") + offset
            return x[i, j, h, c].astype("float32") * tirx.rsqrt(ss[i, j, h] / d + eps) * w

        if rope is None:
            return te.compute((b, s, heads, d), lambda i, j, h, c: tirx.if_then_else(
                h < n_q + n_kv, normed(i, j, h, c).astype(dtype), x[i, j, h, c]), name="qk_norm")
        (p,) = pos

        def angle(t, c):  # HF: inv_freq = theta ** -(2c / d), freq = position * inv_freq (linear: / factor)
            inv = 1.0 / tirx.power(tirx.const(rope.theta, "float32"), tirx.Cast("float32", c * 2) / d)
            return tirx.Cast("float32", p[t]) * tirx.const(rope.scale, "float32") * inv

        cos = te.compute((b * s, half), lambda t, c: tirx.cos(angle(t, c)), name="rope_cos")
        sin = te.compute((b * s, half), lambda t, c: tirx.sin(angle(t, c)), name="rope_sin")

        def out(i, j, h, c):
            tok = i * s + j
            cc = tirx.if_then_else(c < half, c, c - half)
            rot = tirx.if_then_else(c < half, -normed(i, j, h, c + half), normed(i, j, h, c - half))
            y = normed(i, j, h, c) * cos[tok, cc] + rot * sin[tok, cc]
            return tirx.if_then_else(h < n_q + n_kv, y.astype(dtype), x[i, j, h, c])

        return te.compute((b, s, heads, d), out, name="qk_norm_rope")

    args = [qkv, q_weight, k_weight] + ([positions] if rope is not None else [])
    return op.tensor_expr_op(f, "qk_norm_rope" if rope is not None else "qk_norm", args)


class DecoderForCausalLM(nn.Module):
    """Base of every architecture's model: subclasses build `self.model` (with `embed_tokens` and a forward
    (hidden [1, s, H], kv) -> normed hidden) and the lm_head via `_init_head`. `dtype` is the activation /
    dense-weight dtype ("float16" deployment, "float32" exact); `rope_mode` NORMAL lets the KV cache apply RoPE
    (one theta for every layer), NONE means the model rotates q / k itself (`qk_head_norm`)."""

    rope_mode = RopeMode.NORMAL

    def _init_head(self, cfg: DecoderConfig, b: ParamBuilder, dtype: str, backend: str, target) -> None:
        self.cfg, self.dtype, self.backend, self.target = cfg, dtype, backend, target
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
        logits = logits.astype("float32") if logits.dtype != "float32" else logits
        if cap := self.cfg.final_logit_softcapping:  # cap * tanh(logits / cap)
            logits = op.tanh(logits / cap) * cap
        return logits

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
        # CPU: our attention kernels instead of TVM's serial reference ones (mlc_schemes.model.attention_cpu,
        # attention_sliding_cpu for the local layers)
        cpu = self.backend == "cpu"
        with patched_cpu_attention() if cpu else contextlib.nullcontext(), \
                patched_sliding_attention() if cpu else contextlib.nullcontext():
            return self._paged_kv_cache(max_batch_size, max_total_seq_len, prefill_chunk_size, page_size,
                                        support_sliding_window)

    def _paged_kv_cache(self, max_batch_size, max_total_seq_len, prefill_chunk_size, page_size,
                        support_sliding_window) -> PagedKVCache:
        cfg = self.cfg
        kinds = "mha" if not any(cfg.sliding_layers) else [
            "mha_sliding" if s else "mha" for s in cfg.sliding_layers]
        window = {"layer_sliding_window_size": cfg.sliding_window} if cfg.sliding_window else {}
        return TIRPagedKVCache(
            attn_kind=kinds,
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
            rope_mode=self.rope_mode,
            rope_scale=1,
            rope_theta=cfg.rope_theta,
            rope_scaling=cfg.rope_scaling,
            rope_ext_factors=rx.prim_value(0),
            rotary_dim=cfg.head_dim,
            enable_disaggregation=False,
            dtype=self.dtype,
            target=self.target,
            **window,
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


def attention_scale(head_dim: int, query_pre_attn_scalar: float | None = None) -> float:
    """Softmax scale: 1/sqrt(query_pre_attn_scalar) (Gemma) or 1/sqrt(head_dim)."""
    return 1.0 / math.sqrt(query_pre_attn_scalar or head_dim)
