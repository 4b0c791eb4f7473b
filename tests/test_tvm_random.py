"""`--random-weights` presets: tensors have the shapes the compiled model expects (no compile: export only)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")


@pytest.mark.parametrize("scheme,embedding", [("w3a16g128asym", None), ("q4f16_1", None), ("none", None),
                                              ("w4a16g128asym", "w8a16g128asym")])
def test_random_smollm2_fits_the_model(scheme, embedding):
    from mlc_schemes.compile import build_module, fingerprint, make_target
    from mlc_schemes.random_model import random_packed_model

    pm, params = random_packed_model("smollm2-135m", scheme, embedding_scheme=embedding)
    assert ("model.embed_tokens.q_weight" in params) == (embedding is not None)
    assert {n: (a.shape, str(a.dtype)) for n, a in params.items()} == pm.records
    built = build_module(pm, make_target("llvm"), "float16")  # raises if a name/shape/dtype does not fit
    names, concat = built.param_names, built.param_concat
    assert sorted(src for n in names for src in concat.get(n, [n])) == sorted(params)  # every tensor used once
    assert "model.layers.0.self_attn.qkv_proj.q_weight" in names or scheme == "none"
    pm2, none = random_packed_model("smollm2-135m", scheme, materialize=False, embedding_scheme=embedding)
    assert none is None and fingerprint(pm2) == fingerprint(pm)
    if scheme == "w3a16g128asym":  # 3-bit words keep their two pad bits zero (10 codes use bits 0..29)
        qw = params["model.layers.0.mlp.up_proj.q_weight"]
        assert not np.any(qw >> np.uint32(30))
        # its linears are row-interleaved for the CPU kernels (the embedding is not quantized here)
        assert set(built.param_interleave) == {n for n in names if n.endswith((".q_weight", ".q_scale", ".q_zero"))}


def test_random_weights_written_as_a_packed_dir(tmp_path, monkeypatch):
    """`chat --random-weights --weights-dir`: the dir holds exactly the in-memory random weights, readable as any
    packed dir (index, md5, fingerprint), written without leaving a partial dir behind."""
    from mlc_schemes import random_model
    from mlc_schemes.compile import fingerprint
    from mlc_schemes.weights_dir import read_tensor_cache
    from omniquant.errors import UserError

    tiny = dict(random_model.PRESETS["smollm2-135m"], hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=300)
    monkeypatch.setitem(random_model.PRESETS, "tiny", tiny)
    pm = random_model.write_random_packed_dir("tiny", "w4a16g128asym", tmp_path / "w", seed=3,
                                              embedding_scheme="w8a16g128asym")
    ref_pm, ref = random_model.random_packed_model("tiny", "w4a16g128asym", seed=3, embedding_scheme="w8a16g128asym")
    params, _ = read_tensor_cache(tmp_path / "w")  # md5-verified
    assert params.keys() == ref.keys() and all(np.array_equal(params[n], ref[n]) for n in ref)
    assert fingerprint(pm) == fingerprint(ref_pm)
    with pytest.raises(UserError, match="exists"):
        random_model.write_random_packed_dir("tiny", "w4a16g128asym", tmp_path / "w")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]
