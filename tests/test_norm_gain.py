"""Learnable norm gains (quant/norm_gain.py): a zero gain changes nothing, baking a gain into the norm weights gives
the block the hooked gain computed (also for Gemma's (1 + w) norms), and the recipe that learns them leaves a plain
checkpoint whose norms moved and resumes bit for bit. Tiny models only."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import capture_block0
from safetensors.torch import load_file

from omniquant.capture import block_forward
from omniquant.quant.norm_gain import NORM_GAIN_ATTR, attach_norm_gains, bake_norm_gains

ARCH_DIRS = {"llama": "tiny_llama_dir", "gemma3_text": "tiny_gemma3_text_dir"}


def _out(block, x, kwargs) -> torch.Tensor:
    with torch.no_grad():
        return block_forward(block, x, kwargs)


@pytest.mark.parametrize("arch", list(ARCH_DIRS))
def test_zero_gain_is_identity_and_bake_is_exact(arch, request, calib_text):
    adapter, block, x, kwargs, _ = capture_block0(request.getfixturevalue(ARCH_DIRS[arch]), calib_text, n=2)
    block = copy.deepcopy(block)
    plain = _out(block, x, kwargs)
    gains = attach_norm_gains(block, adapter)
    assert gains.names == [s.prev for s in adapter.let_sites if s.kind == "norm"] and gains.names
    assert torch.equal(_out(block, x, kwargs), plain)  # exp(0) = 1 exactly

    g = torch.Generator().manual_seed(0)
    for p in gains.gains:
        p.log_gain.data = 0.2 * torch.randn(p.log_gain.shape, generator=g)
    hooked = _out(block, x, kwargs)
    assert (hooked - plain).abs().max() > 1e-3  # the gains act
    before = {n: block.get_submodule(n).weight.detach().double().numpy().copy() for n in gains.names}
    logs = {n: p.log_gain.detach().double().numpy() for n, p in zip(gains.names, gains.gains)}
    bake_norm_gains(block)
    assert not hasattr(block, NORM_GAIN_ATTR)
    c = adapter.norm_offset
    assert c == (1.0 if arch.startswith("gemma") else 0.0)
    for n in gains.names:  # float64 reference of the fold: (w + c) * exp(a) - c
        np.testing.assert_allclose(block.get_submodule(n).weight.detach().double().numpy(),
                                   (before[n] + c) * np.exp(logs[n]) - c, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(_out(block, x, kwargs), hooked, rtol=1e-5, atol=1e-5)  # hooks removed, gains baked


NG = {"recipe": "blockap", "norm_gains": True, "wbits": 3, "group_size": 64, "nsamples": 4, "seqlen": 64, "epochs": 2,
      "batch_size": 2, "seed": 0}


def test_norm_gains_are_learned_into_a_plain_checkpoint(tiny_llama_dir, calib_text, tmp_path):
    from transformers import AutoModelForCausalLM

    from omniquant.calibrate import calibrate_checkpoint

    out = calibrate_checkpoint(tiny_llama_dir, tmp_path / "o", calib_data=calib_text, **NG)
    qc = json.loads((out / "quant_config.json").read_text())
    assert "norm" in qc["calibration"]["block_log"][0]["lr"]
    new, orig = load_file(str(out / "model.safetensors")), load_file(str(tiny_llama_dir / "model.safetensors"))
    assert new.keys() == orig.keys()  # no gain tensors: folded into the norms
    for norm in ("input_layernorm", "post_attention_layernorm"):
        key = f"model.layers.0.{norm}.weight"
        assert not torch.equal(new[key], orig[key]), key
    AutoModelForCausalLM.from_pretrained(out)  # loads as the plain architecture

    # resumed after block 0 (its gains saved with the quantizers' state): the same checkpoint bit for bit
    import omniquant.blockwise as bw

    def crash(i):
        if i == 0:
            raise KeyboardInterrupt("simulated crash after block 0")

    with pytest.MonkeyPatch.context() as m:
        m.setattr(bw, "_kill_hook", crash)
        with pytest.raises(KeyboardInterrupt):
            calibrate_checkpoint(tiny_llama_dir, tmp_path / "r", calib_data=calib_text, **NG)
    resumed = calibrate_checkpoint(tiny_llama_dir, tmp_path / "r", calib_data=calib_text, resume=tmp_path / "r.state",
                                   **NG)
    for f in ("model.safetensors", "quant_params.safetensors"):
        a, b = load_file(str(out / f)), load_file(str(resumed / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
