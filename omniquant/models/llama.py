"""Llama family (Llama 1/2/3, Mistral, Qwen2): pre-RMSNorm blocks, q/k/v/o attention with RoPE and GQA, SwiGLU MLP."""

from omniquant.models.base import Adapter, LetSite, register

LLAMA = register(
    Adapter(
        name="llama",
        model_types=("llama", "mistral", "qwen2"),
        blocks_path="model.layers",
        linears=(
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
        ),
        let_sites=(
            LetSite("qkv", "norm", "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            LetSite("out", "v_o", "self_attn.v_proj", ("self_attn.o_proj",)),
            LetSite("fc1", "norm", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ),
        qk=("self_attn.q_proj", "self_attn.k_proj"),
        rope=True,
    )
)
