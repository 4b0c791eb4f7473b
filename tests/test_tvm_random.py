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
    _, names, concat = build_module(pm, make_target("llvm"), "float16")  # raises if a name/shape/dtype does not fit
    assert sorted(src for n in names for src in concat.get(n, [n])) == sorted(params)  # every tensor used once
    assert "model.layers.0.self_attn.qkv_proj.q_weight" in names or scheme == "none"
    pm2, none = random_packed_model("smollm2-135m", scheme, materialize=False, embedding_scheme=embedding)
    assert none is None and fingerprint(pm2) == fingerprint(pm)
    if scheme == "w3a16g128asym":  # 3-bit words keep their two pad bits zero (10 codes use bits 0..29)
        qw = params["model.layers.0.mlp.up_proj.q_weight"]
        assert not np.any(qw >> np.uint32(30))
