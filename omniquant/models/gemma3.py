"""Gemma 3 text decoder (`gemma3_text`, and the language model inside the multimodal `gemma3`).

Block: h = x + post_attention_layernorm(o_proj(attn(rope(q_norm(q)), rope(k_norm(k)), v)))   with the input
normed by input_layernorm; out = h + post_feedforward_layernorm(down(gelu_tanh(gate(n)) * up(n))), n =
pre_feedforward_layernorm(h). Every norm is an RMSNorm scaling by (1 + w) (`norm_offset` 1); q/k norms run per head
before RoPE; sliding-window and global layers get their own mask and RoPE table (captured per block, see
omniquant/capture.py); the embedding is scaled by sqrt(hidden) inside the model (no block sees it).

LET sites, each exact in full precision:
  qkv  input_layernorm -> q/k/v_proj: (1 + w) -> (1 + w) / s, i.e. w -> (1 + w) / s - 1; columns of q/k/v take s.
  out  v_proj -> o_proj: v has no norm, so rows of v take 1/s and columns of o take rep(s). o_proj's output then
       meets post_attention_layernorm, which is untouched (o's output does not change).
  fc1  pre_feedforward_layernorm -> gate/up_proj (NOT post_attention_layernorm, which in Llama is the pre-MLP norm:
       here it normalises the attention output before the residual add and feeds no linear).
  q/k  into the q_norm / k_norm weights ((1 + w) / t and (1 + w) * t, t [head_dim] tied on rotary pairs), not on
       the rows of q/k_proj: a row scale does not pass through a per-head RMSNorm (see omniquant/models/qwen3.py).
  The post-norms (post_attention_layernorm, post_feedforward_layernorm) take no site: they consume the outputs of
  o_proj / down_proj, and a per-channel scale before an RMSNorm does not commute with it (the mean of squares).
"""

import dataclasses

from omniquant.models.base import Adapter, LetSite, register

_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")

GEMMA3_TEXT = register(
    Adapter(
        name="gemma3_text",
        model_types=("gemma3_text",),
        blocks_path="model.layers",
        linears=(*_QKV, "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
        let_sites=(
            LetSite("qkv", "norm", "input_layernorm", _QKV),
            LetSite("out", "v_o", "self_attn.v_proj", ("self_attn.o_proj",)),
            LetSite("fc1", "norm", "pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ),
        qk=None,
        qk_norms=("self_attn.q_norm", "self_attn.k_norm"),
        rope=True,
        norm_offset=1.0,
        bos_first=True,
    )
)

# Gemma3ForConditionalGeneration: the same decoder under model.language_model; the vision tower is not quantized.
GEMMA3 = register(dataclasses.replace(GEMMA3_TEXT, name="gemma3", model_types=("gemma3",),
                                      blocks_path="model.language_model.layers"))
