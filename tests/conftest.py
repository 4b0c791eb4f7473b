"""Shared fixtures: tiny models built on the fly (session-scoped, built once per test run) and the Austen text."""

from __future__ import annotations

import pytest

from omniquant.paths import CALIB_BOOKS, EVAL_BOOKS, austen_dir


@pytest.fixture(scope="session")
def calib_text() -> str:
    return ",".join(str(austen_dir() / b) for b in CALIB_BOOKS)


@pytest.fixture(scope="session")
def eval_text() -> str:
    return ",".join(str(austen_dir() / b) for b in EVAL_BOOKS)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    from omniquant.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama", seed=0)


@pytest.fixture(scope="session")
def tiny_opt_dir(tmp_path_factory):
    from omniquant.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "opt", "opt", seed=0)


@pytest.fixture(scope="session")
def trained_llama_dir(tmp_path_factory):
    """A weak but real language model (80 AdamW steps on the calibration books): perplexity comparisons need one."""
    from omniquant.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "llama_trained", "llama", seed=0, train_steps=80)


def _tiny(tmp_path_factory, arch: str):
    from omniquant.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / arch, arch, seed=0)


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory):
    """Qwen3: q/k head norms, tied embeddings, layer 1 local (sliding window 16), head_dim 48 != 192 / 6."""
    return _tiny(tmp_path_factory, "qwen3")


@pytest.fixture(scope="session")
def tiny_gemma3_text_dir(tmp_path_factory):
    """Gemma 3 text: (1 + w) norms, 4 per block, local / global layers (window 16, own RoPE bases, linear scaling
    on the global one), query_pre_attn_scalar 24, final logit soft-capping, BOS-first tokenizer with a template."""
    return _tiny(tmp_path_factory, "gemma3_text")


@pytest.fixture(scope="session")
def tiny_gemma3_dir(tmp_path_factory):
    """Multimodal Gemma 3 (Gemma3ForConditionalGeneration) around the same kind of text model."""
    return _tiny(tmp_path_factory, "gemma3")


def capture_block0(model_dir, calib_text: str, n: int = 8, seqlen: int = 64):
    """(adapter, frozen block 0, its captured inputs [n, seqlen, H], its kwargs, its fp outputs) of a tiny model on
    seeded calibration windows: for tests that train one block directly."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from omniquant.capture import block_forward, capture_block_inputs
    from omniquant.data import load_tokens, sample_windows
    from omniquant.models import get_adapter

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    adapter = get_adapter(model.config.model_type)
    blocks = adapter.blocks(model)
    x, block_kwargs = capture_block_inputs(model, blocks, sample_windows(load_tokens(tok, calib_text), n, seqlen, 0))
    block = blocks[0].requires_grad_(False)
    with torch.no_grad():
        target = torch.cat([block_forward(block, x[i : i + 1], block_kwargs[0]) for i in range(len(x))])
    return adapter, block, x, block_kwargs[0], target
