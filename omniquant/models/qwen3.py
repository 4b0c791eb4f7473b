"""Qwen3: the Llama block (pre-RMSNorm, q/k/v/o with RoPE and GQA, SwiGLU) plus a per-head RMSNorm on q and on k
before RoPE (`self_attn.q_norm`, `self_attn.k_norm`, weight [head_dim] shared by all heads); no q/k/v bias.

LET sites, each exact in full precision:
  qkv  input_layernorm -> q/k/v_proj: the norm weight takes 1/s, the columns of q/k/v take s (as Llama).
  out  v_proj -> o_proj: v is not normalised, so rows of v take 1/s and columns of o take rep(s) (as Llama).
  fc1  post_attention_layernorm -> gate/up_proj (as Llama).
  q/k  NOT on the rows of q_proj / k_proj: RMSNorm(q / t) != RMSNorm(q) / t (the mean of squares over the head
       mixes the channels), so that transform would change the model. The scale goes into the norms' weights
       instead: q_norm.weight / t, k_norm.weight * t with t [head_dim] shared by every head (the norm weight is
       shared), tied on rotary pairs (i, i + d/2) so that it commutes with RoPE; q.k is unchanged per head.
"""

from omniquant.models.base import Adapter, register
from omniquant.models.llama import LLAMA

QWEN3 = register(
    Adapter(
        name="qwen3",
        model_types=("qwen3",),
        blocks_path="model.layers",
        linears=LLAMA.linears,
        let_sites=LLAMA.let_sites,
        qk=None,
        qk_norms=("self_attn.q_norm", "self_attn.k_norm"),
        rope=True,
    )
)
