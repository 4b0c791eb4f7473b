"""Qwen3 and Gemma 3 end to end on CPU: tiny model -> calibrate -> pack -> compile (llvm, float32) -> run on TVM.

The tiny models have what sets each architecture apart at a size that shows it (tests/conftest.py): a sliding
window of 16 tokens on some layers, so every check uses sequences longer than the window. As in test_tvm_e2e.py,
token-level references are the fake-quant checkpoint with its dense tensors rounded to float16 (what the packed dir
stores); perplexity is compared with the unmodified checkpoint. One compile per architecture (session fixtures).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
torch = pytest.importorskip("torch")

from test_tvm_e2e import (  # the same references as the Llama chain
    _greedy_torch,
    _torch_model,
)

from omniquant.paths import austen_dir

CALIB = austen_dir() / "sensesensibility.txt"
EVAL = austen_dir() / "prideprejudice.txt"
PROMPT = "It is a truth universally acknowledged, that a single man in possession"


def _chain(root, src, scheme, **calib):
    from mlc_schemes import pack_checkpoint
    from mlc_schemes.compile import compile_packed
    from omniquant.calibrate import calibrate_checkpoint

    calibrate_checkpoint(src, root / "fq", nsamples=2, seqlen=64, calib_data=str(CALIB), **calib)
    pack_checkpoint(root / "fq", scheme, root / "packed", progress=False)
    compile_packed(root / "packed", "llvm", root / "lib32.so", dtype="float32")
    return root


@pytest.fixture(scope="session")
def qwen3_chain(tmp_path_factory, tiny_qwen3_dir):
    """Qwen3, OmniQuant LWC 1 epoch, w4a16g128asym (tied embedding, layer 1 local)."""
    return _chain(tmp_path_factory.mktemp("qwen3"), tiny_qwen3_dir, "w4a16g128asym", wbits=4, group_size=128,
                  epochs=1)


@pytest.fixture(scope="session")
def gemma3_chain(tmp_path_factory, tiny_gemma3_text_dir):
    """Gemma 3 text, OmniQuant LWC 1 epoch, w3a16g128asym (layers local / global / local)."""
    return _chain(tmp_path_factory.mktemp("gemma3"), tiny_gemma3_text_dir, "w3a16g128asym", wbits=3,
                  group_size=128, epochs=1)


CHAINS = ["qwen3_chain", "gemma3_chain"]


@pytest.mark.parametrize("chain", CHAINS)
def test_greedy_tokens_and_logits_equal_transformers(chain, request):
    """Prompt (Gemma: with the BOS its tokenizer adds) + 24 greedy tokens, 40+ tokens in all: tokens equal HF's;
    prefill logits (in chunks of the window) and decode logits equal HF's."""
    from mlc_schemes.engine import Engine

    root = request.getfixturevalue(chain)
    eng = Engine(root / "packed", root / "lib32.so")
    assert eng.prefill_chunk == 16 and eng.meta["sliding_window"] == 16  # chunks never exceed the window
    model = _torch_model(root / "fq", root / "packed")
    ids = eng.tokenizer(PROMPT)["input_ids"]
    assert (ids[0] == 0) == (chain == "gemma3_chain")  # Gemma's tokenizer puts BOS (id 0) first
    tokens = eng.generate_ids(ids, 24, stop_on_eos=False)
    assert len(ids) + len(tokens) > 32 and tokens == _greedy_torch(model, ids, 24)
    seq = ids + tokens
    with torch.no_grad():
        ref = model(torch.tensor([seq])).logits[0].numpy()
        # the window matters here: without it (HF with a window longer than the sequence) logits differ
        window, model.config.sliding_window = model.config.sliding_window, 10**6
        wide = model(torch.tensor([seq])).logits[0].numpy()
        model.config.sliding_window = window
    assert np.abs(wide[16:] - ref[16:]).max() > 1e-2 * np.abs(ref).max()
    eng.reset()
    np.testing.assert_allclose(eng.prefill(seq, all_logits=True), ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    eng.reset()
    eng.prefill(seq[:5])
    step = np.stack([eng.decode(t) for t in seq[5:]])  # decode across the window boundary
    np.testing.assert_allclose(step, ref[5:], rtol=0, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("chain", CHAINS)
def test_perplexity_matches_torch(chain, request):
    """TVM perplexity = torch perplexity of the fake-quant checkpoint within 1e-3, 64-token windows (4 x the
    sliding window), BOS first for Gemma in both engines."""
    from transformers import AutoTokenizer

    from mlc_schemes.engine import tvm_perplexity
    from omniquant.data import load_tokens
    from omniquant.ppl import perplexity

    root = request.getfixturevalue(chain)
    tokens = load_tokens(AutoTokenizer.from_pretrained(root / "packed"), str(EVAL))[: 4 * 64]
    ppl_tvm = tvm_perplexity(root / "packed", root / "lib32.so", tokens, 64)
    ppl_torch = perplexity(_torch_model(root / "fq", root / "packed", round_dense=False), tokens, 64)
    assert abs(ppl_tvm - ppl_torch) / ppl_torch <= 1e-3, (ppl_tvm, ppl_torch)


def test_chat_template_turns_share_the_cache(gemma3_chain):
    """`omniquant chat` renders turns with the tokenizer's template (BOS once, Gemma turn markers); the second
    turn keeps the cached prefix, rolls back what the re-rendering changed, and answers as HF does on the whole
    rendering."""
    from mlc_schemes.chat_cli import Conversation
    from mlc_schemes.engine import Engine

    root = gemma3_chain
    eng = Engine(root / "packed", root / "lib32.so")
    model = _torch_model(root / "fq", root / "packed")
    conv = Conversation(eng.tokenizer)
    replies = []
    for text in ("Who is Mr Darcy?", "And Elizabeth?"):
        full = conv.prompt_ids(text, eng.tokens)
        cached = list(eng.tokens)
        feed = Conversation.sync(eng, full)
        assert eng.tokens + feed == full and eng.tokens == full[:len(eng.tokens)]
        if cached:  # second turn: the first turn's prompt stays cached (the reply may re-tokenize differently)
            assert len(eng.tokens) >= len(replies[0]) and eng.tokens == cached[:len(eng.tokens)]
        new = eng.generate_ids(feed, 6, stop_on_eos=False)
        assert new == _greedy_torch(model, full, 6)
        replies.append(full)
        conv.add_reply(eng.tokenizer.decode(new, skip_special_tokens=True))
    text = eng.tokenizer.decode(replies[1])
    assert text.count("<s>") == 1 and text.startswith("<s><start_of_turn>user") and text.count("<start_of_turn>") == 4


def test_cli_chat_prompt(gemma3_chain):
    root = gemma3_chain
    r = subprocess.run([sys.executable, "-m", "omniquant", "chat", "--model", str(root / "packed"), "--lib",
                        str(root / "lib32.so"), "--prompt", "Hello", "--max-new-tokens", "4"],
                       capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-2000:]


def test_multimodal_gemma3_deploys_its_text_model(tiny_gemma3_dir, gemma3_chain, tmp_path):
    """A `gemma3` (image + text) checkpoint packs as its text model: the tensors of Gemma3ForCausalLM (vision tower
    and projector left out), model_type gemma3_text; unpacked, it computes the multimodal model's text logits; and
    it builds the same TVM module as a gemma3_text checkpoint of these shapes."""
    from transformers import AutoModelForCausalLM

    from mlc_schemes import load_packed, pack_checkpoint, unpack_to_hf
    from mlc_schemes.compile import build_module, make_target, read_packed_model
    from omniquant.calibrate import calibrate_checkpoint

    calibrate_checkpoint(tiny_gemma3_dir, tmp_path / "fq", wbits=4, group_size=64, epochs=0, lwc=False)
    pack_checkpoint(tmp_path / "fq", "w4a16g64asym", tmp_path / "packed", progress=False)
    chat, params = load_packed(tmp_path / "packed")
    assert chat["model_type"] == "gemma3_text" and chat["model_config"]["final_logit_softcapping"] is None
    assert all(n.startswith(("model.layers.", "model.embed_tokens.", "model.norm.")) for n in params)
    assert "model.layers.2.self_attn.q_proj.q_weight" in params and "lm_head.weight" not in params
    ref_model = AutoModelForCausalLM.from_pretrained(tmp_path / "fq", dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in ref_model.named_parameters():
            if not name.endswith("proj.weight"):  # what the packed dir stores in float16
                p.copy_(p.half().float())
        ids = torch.tensor([[0] + list(range(5, 45))])
        ref = ref_model(ids).logits
        got = unpack_to_hf(tmp_path / "packed")(ids).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
    target = make_target("llvm")
    names = build_module(read_packed_model(tmp_path / "packed"), target, "float32").param_names
    assert names == build_module(read_packed_model(gemma3_chain / "packed"), target, "float32").param_names


def _chat_of(path, **extra):
    from mlc_schemes.chat_config import model_config_from_hf

    return {"model_config": model_config_from_hf(json.loads((path / "config.json").read_text())),
            "context_window_size": 1024, **extra}


def test_sliding_window_settings_per_architecture(tmp_path, tiny_llama_dir):
    """Which layers are local and the prefill chunk, from each architecture's config: Mistral's window applies to
    every layer (the Llama-family model ignored it before), Qwen2/3 `layer_types`, Gemma 3 `layer_types` or the
    older `sliding_window_pattern` with `rope_local_base_freq` / `rope_scaling`; a window covering the context is
    no window; unsupported settings are refused."""
    from mlc_schemes.model import gemma3, llama
    from omniquant.tiny import make_tiny

    mistral = llama.LlamaConfig.from_chat_config(_chat_of(make_tiny(tmp_path / "m", "mistral")))
    assert mistral.sliding_layers == (True, True) and mistral.sliding_window == 16 and mistral.prefill_chunk_size == 16
    plain = llama.LlamaConfig.from_chat_config(_chat_of(tiny_llama_dir))
    assert plain.sliding_layers == (False, False) and plain.prefill_chunk_size == 1024
    wide = llama.LlamaConfig.from_chat_config(_chat_of(tmp_path / "m", context_window_size=16))
    assert not any(wide.sliding_layers) and wide.local_layers == (True, True)
    old_style = {"model_type": "gemma3_text", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 7,
                 "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "vocab_size": 300,
                 "sliding_window": 32, "sliding_window_pattern": 3, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
                 "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "query_pre_attn_scalar": 32}
    cfg = gemma3.Gemma3Config.from_chat_config({"model_config": old_style, "context_window_size": 1024})
    assert cfg.sliding_layers == (True, True, False, True, True, False, True) and cfg.prefill_chunk_size == 32
    assert cfg.rope_local == gemma3.HeadRope(1e4) and cfg.rope_global == gemma3.HeadRope(1e6, 1 / 8)
    for bad, match in (({"attn_logit_softcapping": 50.0}, "soft-capping"),
                       ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
                       ({"hidden_activation": "relu"}, "relu")):
        with pytest.raises(ValueError, match=match):
            gemma3.Gemma3Config.from_chat_config({"model_config": {**old_style, **bad}})
