"""LET is an exact equivalence before quantization: float64 logits of the transformed model equal the original's.

Checked on tiny random Llama (GQA: 6 query / 2 KV heads, RoPE), OPT, Qwen3 and Gemma 3 (q/k head norms: the q/k
scale goes into their weights; Gemma's (1 + w) norms; local / global layers) models, with random scales/shifts at
every site, both while calibrating (temporary weights + norm hooks) and after fusing (plain transformers reload).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from omniquant.let import AttnShape, BlockLET
from omniquant.models import get_adapter
from omniquant.quant.act import ActQuantizer
from omniquant.quant.qlinear import QuantLinear, replace_linears, restore_linears
from omniquant.quant.spec import WeightQuantSpec

REL = 1e-10


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(autouse=True)
def rmsnorm_in_input_dtype(monkeypatch):
    """HF's RMSNorms normalise in float32 even for float64 input; that rounding (not LET) would cap the
    agreement at ~1e-7, so these float64 tests normalise in the input dtype."""
    from transformers.models.gemma3 import modeling_gemma3
    from transformers.models.llama import modeling_llama
    from transformers.models.qwen3 import modeling_qwen3

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def gemma_forward(self, x):  # Gemma scales by (1 + w)
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)) * (1.0 + self.weight)

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", forward)
    monkeypatch.setattr(modeling_qwen3.Qwen3RMSNorm, "forward", forward)
    monkeypatch.setattr(modeling_gemma3.Gemma3RMSNorm, "forward", gemma_forward)


def _dirs(request, arch):
    return request.getfixturevalue({"llama": "tiny_llama_dir", "opt": "tiny_opt_dir", "qwen3": "tiny_qwen3_dir",
                                    "gemma3_text": "tiny_gemma3_text_dir", "gemma3": "tiny_gemma3_dir"}[arch])


def _load64(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()


def _randomise(let: BlockLET, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in let.named_parameters():
            r = torch.randn(p.shape, generator=gen, dtype=torch.float64).float()
            p.copy_(torch.exp(0.7 * r) if name.endswith("scale") else 0.5 * r)


def _transform_all(model, adapter, gen, stats=True):
    """Swap in QuantLinears (no weight quantization), attach random LETs; returns [(block, qlinears, let)]."""
    spec = WeightQuantSpec(4, 64)
    attn = AttnShape.from_config(model.config)
    out = []
    for block in adapter.blocks(model):
        qlinears = replace_linears(block, adapter.linears, lambda lin: QuantLinear(lin, spec, lwc=False))
        for q in qlinears.values():
            q.quantize_weight = False
            q.act_quantizer = ActQuantizer(16)  # identity; still receives the offsets
        st = None
        if stats:
            st = {n: (torch.rand(q.linear.in_features, generator=gen) + 0.1,
                      torch.randn(q.linear.in_features, generator=gen)) for n, q in qlinears.items()}
        let = BlockLET(block, qlinears, adapter, attn, 0.5, st, use_shift=True)
        _randomise(let, gen)
        out.append((block, qlinears, let))
    return out


def _fuse_plain(items):
    for block, qlinears, let in items:
        let.fuse()
        for q in qlinears.values():
            q.linear.weight.data.copy_(q.temp_weight if q.temp_weight is not None else q.linear.weight)
            if q.temp_bias is not None:
                q.linear.bias = torch.nn.Parameter(q.temp_bias.clone(), requires_grad=False)
        restore_linears(block, qlinears)


def _capture_blocks(model, adapter, ids):
    """[(args, kwargs, output)] of every decoder block during one forward of `model`."""
    seen, handles = [], []
    for block in adapter.blocks(model):
        def hook(_m, args, kwargs, out):
            seen.append((args, kwargs, out[0] if isinstance(out, tuple) else out))
        handles.append(block.register_forward_hook(hook, with_kwargs=True))
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits  # no KV cache: re-running a block must not see its old keys
    for h in handles:
        h.remove()
    return seen, logits


def _block_errors(model, adapter, captured) -> list[float]:
    errs = []
    with torch.no_grad():
        for block, (args, kwargs, out) in zip(adapter.blocks(model), captured):
            got = block(*args, **kwargs)
            errs.append(_rel(got[0] if isinstance(got, tuple) else got, out))
    return errs


def _random_ids(model, n=2, length=40):
    """Token ids [n, length] (longer than the tiny models' sliding window of 16)."""
    vocab = model.config.get_text_config().vocab_size
    return torch.randint(5, vocab, (n, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", ["llama", "opt", "qwen3", "gemma3_text", "gemma3"])
def test_let_fusion_is_exact_in_float64(arch, request, tmp_path):
    """Block outputs (fed the original model's block inputs) and whole-model logits agree to 1e-10 in float64."""
    path = _dirs(request, arch)
    model = _load64(path)
    adapter = get_adapter(model.config.model_type)
    ids = _random_ids(model)
    captured, ref = _capture_blocks(model, adapter, ids)
    with torch.no_grad():
        items = _transform_all(model, adapter, torch.Generator().manual_seed(0))
        for _, _, let in items:
            let.apply_temporary()
    during = _block_errors(model, adapter, captured)
    # the transformation really changed the weights (not a vacuous identity)
    q0 = items[0][1][adapter.linears[0]]
    assert _rel(q0.temp_weight, q0.linear.weight) > 1e-2
    norms_before = {n: m.weight.detach().clone() for n, m in items[0][0].named_modules() if n.endswith("norm")}
    with torch.no_grad():
        _fuse_plain(items)
    # every site's norm took its scale: the pre-norms, and the q/k head norms where the q/k scale lives
    changed = {n for n, w in norms_before.items() if _rel(items[0][0].get_submodule(n).weight.detach(), w) > 1e-3}
    expected = {s.prev for s in adapter.let_sites if s.kind == "norm"} | set(adapter.qk_norms or ())
    assert changed == expected, (changed, expected)
    fused = _block_errors(model, adapter, captured)
    assert max(during) < REL, during
    assert max(fused) < REL, fused
    # the fused checkpoint is a plain transformers model (no new modules or biases) computing the same function
    model.save_pretrained(tmp_path / "fused")
    reloaded_model = _load64(tmp_path / "fused")
    assert _block_errors(reloaded_model, adapter, captured) == pytest.approx(fused, abs=1e-14)
    with torch.no_grad():
        assert _rel(reloaded_model(ids).logits, ref) < REL
    assert sorted(reloaded_model.state_dict()) == sorted(_load64(path).state_dict())


def _fused_errors(path, adapter, transform_stats=True):
    """Block errors after fusing random LETs of `adapter` (not necessarily the model's own) into a float64 model."""
    model = _load64(path)
    captured, _ = _capture_blocks(model, adapter, _random_ids(model, 1))
    with torch.no_grad():
        items = _transform_all(model, adapter, torch.Generator().manual_seed(0), stats=transform_stats)
        for _, _, let in items:
            let.apply_temporary()
        during = _block_errors(model, adapter, captured)
        _fuse_plain(items)
    return during, _block_errors(model, adapter, captured)


def test_qk_row_scale_does_not_pass_the_head_norms(tiny_qwen3_dir):
    """Why Qwen3 / Gemma 3 put the q/k scale into q_norm / k_norm: on the rows of q_proj / k_proj (the Llama site)
    the per-head RMSNorm undoes it and the model changes."""
    adapter = dataclasses.replace(get_adapter("qwen3"), qk=("self_attn.q_proj", "self_attn.k_proj"), qk_norms=None,
                                  let_sites=())
    during, fused = _fused_errors(tiny_qwen3_dir, adapter, transform_stats=False)
    assert min(during) > 1e-4 and min(fused) > 1e-4


def test_gemma_norm_fusion_needs_the_offset(tiny_gemma3_text_dir):
    """Gemma's norms scale by (1 + w): folding s as w / s (the Llama rule) breaks the fused model, while the
    temporary (hook) form, which divides the norm's output, is exact either way."""
    adapter = dataclasses.replace(get_adapter("gemma3_text"), norm_offset=0.0)
    during, fused = _fused_errors(tiny_gemma3_text_dir, adapter)
    assert max(during) < REL and min(fused) > 1e-4


def test_gqa_v_to_o_scale_is_repeated_per_query_group(tiny_llama_dir):
    model = _load64(tiny_llama_dir)
    attn = AttnShape.from_config(model.config)
    assert (attn.n_heads, attn.n_kv, attn.n_rep) == (6, 2, 3)
    v = torch.arange(attn.n_kv * attn.d, dtype=torch.float64)
    rep = attn.repeat_kv(v).reshape(attn.n_heads, attn.d)
    # HF repeat_kv: query head h reads KV head h // n_rep
    for h in range(attn.n_heads):
        assert torch.equal(rep[h], v.reshape(attn.n_kv, attn.d)[h // attn.n_rep])
    # reduce_group_max is the adjoint bookkeeping used by the init: max over the group's query heads
    x = torch.randn(attn.n_heads * attn.d, dtype=torch.float64)
    red = attn.reduce_group_max(x).reshape(attn.n_kv, attn.d)
    xs = x.reshape(attn.n_heads, attn.d)
    for j in range(attn.n_kv):
        assert torch.equal(red[j], xs[j * attn.n_rep:(j + 1) * attn.n_rep].amax(0))


def test_qk_scale_must_be_tied_within_rotary_pairs(tiny_llama_dir):
    """Untied per-channel q/k scales break RoPE models: the constraint the code enforces is necessary."""
    model = _load64(tiny_llama_dir)
    adapter = dataclasses.replace(get_adapter("llama"), rope=False, let_sites=())  # q/k scaling only, untied
    ids = torch.randint(3, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    captured, _ = _capture_blocks(model, adapter, ids)
    with torch.no_grad():
        items = _transform_all(model, adapter, torch.Generator().manual_seed(0), stats=False)
        for _, _, let in items:
            let.apply_temporary()
    assert min(_block_errors(model, adapter, captured)) > 1e-4


def test_let_init_is_smoothquant(tiny_opt_dir):
    model = _load64(tiny_opt_dir)
    adapter = get_adapter("opt")
    block = adapter.blocks(model)[0]
    spec = WeightQuantSpec(4, 64)
    qlinears = replace_linears(block, adapter.linears, lambda lin: QuantLinear(lin, spec, lwc=False))
    gen = torch.Generator().manual_seed(3)
    stats = {n: (torch.rand(q.linear.in_features, generator=gen) * 5, torch.randn(q.linear.in_features, generator=gen))
             for n, q in qlinears.items()}
    let = BlockLET(block, qlinears, adapter, AttnShape.from_config(model.config), 0.3, stats, use_shift=True)
    w = torch.cat([qlinears[n].linear.weight for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")])
    act = stats["self_attn.q_proj"][0].double()
    expect = act.clamp(min=1e-5) ** 0.3 / w.abs().amax(0).clamp(min=1e-5) ** 0.7
    torch.testing.assert_close(let.qkv_scale.double(), expect.float().double(), rtol=1e-6, atol=0)
    # OPT (LayerNorm with bias): shifts start at the activation shifts; q/k scale starts at 1
    torch.testing.assert_close(let.qkv_shift, stats["self_attn.q_proj"][1].float())
    assert torch.equal(let.qk_scale, torch.ones_like(let.qk_scale))
