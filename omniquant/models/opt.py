"""OPT: pre-LayerNorm blocks (with biases), q/k/v/out_proj attention without RoPE, fc1/fc2 ReLU MLP."""

from omniquant.models.base import Adapter, LetSite, register

OPT = register(
    Adapter(
        name="opt",
        model_types=("opt",),
        blocks_path="model.decoder.layers",
        linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"),
        let_sites=(
            LetSite("qkv", "norm", "self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            LetSite("out", "v_o", "self_attn.v_proj", ("self_attn.out_proj",)),
            LetSite("fc1", "norm", "final_layer_norm", ("fc1",)),
        ),
        qk=("self_attn.q_proj", "self_attn.k_proj"),
        rope=False,
    )
)
