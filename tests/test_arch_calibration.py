"""Qwen3 and Gemma 3 in the calibration pipeline (torch only): block inputs and per-block kwargs captured for the
block loop rebuild the model's own forward (Gemma's local / global layers each with their own mask and RoPE table),
BOS-first windows for Gemma (perplexity and calibration, one rule), calibration end to end, and a clear error for
an architecture we do not support, at every stage."""

from __future__ import annotations

import json
import math

import pytest
import torch

from omniquant.errors import UserError

ARCHS = {"qwen3": "tiny_qwen3_dir", "gemma3_text": "tiny_gemma3_text_dir", "gemma3": "tiny_gemma3_dir"}


def _model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_captured_block_inputs_rebuild_the_forward(arch, request):
    """Running the blocks one by one on the captured block-0 input with each block's captured kwargs gives the
    model's last hidden state; 40-token windows exceed the sliding window (16), so handing a local layer the
    global layers' mask (or RoPE table) would show."""
    from omniquant.capture import block_forward, capture_block_inputs
    from omniquant.models import get_adapter

    model = _model(request.getfixturevalue(ARCHS[arch]))
    adapter = get_adapter(model.config.model_type)
    blocks = adapter.blocks(model)
    windows = torch.randint(5, 500, (2, 40), generator=torch.Generator().manual_seed(0))
    hidden, kwargs = capture_block_inputs(model, blocks, windows)
    assert hidden.shape == (2, 40, model.config.get_text_config().hidden_size) and len(kwargs) == len(blocks)
    final = {}
    norm = model.get_submodule(adapter.blocks_path.rpartition(".")[0] + ".norm")
    handle = norm.register_forward_pre_hook(lambda _m, args: final.__setitem__("x", args[0]))
    with torch.no_grad():
        for j in range(2):
            model(windows[j : j + 1], use_cache=False)
            x = hidden[j : j + 1]
            for block, kw in zip(blocks, kwargs):
                x = block_forward(block, x, kw)
            torch.testing.assert_close(x, final["x"], rtol=0, atol=1e-5)
    handle.remove()
    types = model.config.get_text_config().layer_types
    local, glob = types.index("sliding_attention"), types.index("full_attention")
    mask_l, mask_g = kwargs[local]["attention_mask"], kwargs[glob]["attention_mask"]
    assert mask_l is not None and (mask_g is None or not torch.equal(mask_l, mask_g))
    if arch.startswith("gemma"):  # a RoPE table per layer kind (local base 1e4, global 1e6 with linear scaling)
        assert not torch.equal(kwargs[local]["position_embeddings"][0], kwargs[glob]["position_embeddings"][0])


def test_window_bos_rule(tiny_gemma3_text_dir, tiny_gemma3_dir, tiny_qwen3_dir):
    """Gemma expects BOS first (its adapter says so; the id is the config's, the one its tokenizer adds); Qwen3 and
    Llama keep the plain-text windows of the paper convention."""
    from transformers import AutoConfig, AutoTokenizer

    from omniquant.ppl import config_window_bos, window_bos, windows

    g = AutoConfig.from_pretrained(tiny_gemma3_text_dir)
    assert config_window_bos(g) == g.bos_token_id == 0
    assert AutoTokenizer.from_pretrained(tiny_gemma3_text_dir)("Emma")["input_ids"][0] == g.bos_token_id
    assert config_window_bos(AutoConfig.from_pretrained(tiny_gemma3_dir)) == 0  # text config of the multimodal one
    assert config_window_bos(AutoConfig.from_pretrained(tiny_qwen3_dir)) is None
    assert window_bos("llama", 1) is None
    with pytest.raises(UserError, match="no bos_token_id"):
        window_bos("gemma3_text", None)
    tokens = torch.arange(10, 30)
    w = windows(tokens, 5, bos=7)
    assert w.shape == (5, 5) and (w[:, 0] == 7).all() and torch.equal(w[:, 1:].reshape(-1), tokens)
    assert torch.equal(windows(tokens, 5), tokens.reshape(4, 5))


def test_gemma_perplexity_puts_bos_first(tiny_gemma3_text_dir):
    """omniquant.ppl.perplexity on Gemma = exp(mean NLL) of windows [BOS, 15 text tokens], computed here by hand."""
    from omniquant.ppl import perplexity

    model = _model(tiny_gemma3_text_dir)
    tokens = torch.randint(5, 500, (48,), generator=torch.Generator().manual_seed(2))
    nlls = []
    with torch.no_grad():
        for j in range(3):
            ids = torch.cat([torch.tensor([0]), tokens[15 * j : 15 * (j + 1)]])[None]
            logits = model(ids).logits[0, :-1].double()
            nlls.append(float(torch.nn.functional.cross_entropy(logits, ids[0, 1:])))
    assert perplexity(model, tokens, 16) == pytest.approx(math.exp(sum(nlls) / 3), rel=1e-6)


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_calibrate_lwc_let_and_kv(arch, request, calib_text, tmp_path, monkeypatch):
    """OmniQuant LWC + LET (every site, including the q/k head-norm one) + KV quantization runs and exports an
    exact fake-quant checkpoint; Gemma's calibration windows start with BOS."""
    from omniquant import data
    from omniquant.calibrate import calibrate_checkpoint

    seen = []
    orig = data.sample_windows

    def spy(*a, **kw):
        seen.append(out := orig(*a, **kw))
        return out

    monkeypatch.setattr("omniquant.calibrate.sample_windows", spy)
    out = calibrate_checkpoint(request.getfixturevalue(ARCHS[arch]), tmp_path / "fq", wbits=4, abits=8, kv_bits=8,
                               let=True, group_size=64, nsamples=2, seqlen=32, epochs=1, calib_data=calib_text)
    qc = json.loads((out / "quant_config.json").read_text())
    prefix = "model.language_model.layers.0" if arch == "gemma3" else "model.layers.0"
    assert f"{prefix}.self_attn.q_proj" in qc["quantized_linears"] and qc["calibration"]["nan_blocks"] == []
    assert (seen[0][:, 0] == 0).all() == (arch == "gemma3")  # BOS id 0 first in every window for Gemma only


def test_unsupported_architecture_is_refused_at_every_stage(tiny_opt_dir, tmp_path, capsys):
    """calibrate (no adapter), pack and compile (no TVM model): a one-line error naming the architecture and the
    supported ones, exit status 2, nothing written."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from omniquant.calibrate import calibrate_checkpoint
    from omniquant.cli import main

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=512)).save_pretrained(gpt2)
    AutoTokenizer.from_pretrained(tiny_opt_dir).save_pretrained(gpt2)
    assert main(["calibrate", "--model", str(gpt2), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "unsupported architecture 'gpt2'" in err and "gemma3_text" in err and "qwen3" in err
    # OPT calibrates, but has no TVM model: pack says so
    calibrate_checkpoint(tiny_opt_dir, tmp_path / "opt-fq", wbits=4, group_size=64, epochs=0, lwc=False)
    assert main(["pack", "--input", str(tmp_path / "opt-fq"), "--scheme", "w4a16g64asym",
                 "--output", str(tmp_path / "opt-packed")]) == 2
    err = capsys.readouterr().err
    assert "pack: architecture 'opt' has no TVM model" in err and "gemma3" in err and "mistral" in err
    assert not (tmp_path / "opt-packed").exists()
    # a packed dir of another architecture (hand-edited): compile says so before building anything
    packed = tmp_path / "packed"
    packed.mkdir()
    (packed / "tensor-cache.json").write_text(json.dumps({"records": [], "metadata": {}}))
    (packed / "mlc-chat-config.json").write_text(json.dumps({"model_type": "gpt2", "model_config": {
        "model_type": "gpt2"}, "quantization_config": {}}))
    assert main(["compile", "--model", str(packed), "--output", str(tmp_path / "lib.so")]) == 2
    assert "compile: architecture 'gpt2' has no TVM model" in capsys.readouterr().err
    assert not (tmp_path / "lib.so").exists()
