"""GPTQ v2 export: unpacked by an independent reference written here (the stream read bit by bit), the tensors give
exactly the fake-quant weights at 2, 3, 4 and 8 bits; GPTQModel's torch kernel (when gptqmodel is importable: it
needs its own venv, see README) dequantizes them to the same weights in float16."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from omniquant.paths import CALIB_BOOKS, austen_dir
from serving_formats import export_checkpoint

CALIB = str(austen_dir() / CALIB_BOOKS[0])
GROUP = 64
BITS = (2, 3, 4, 8)


def _calibrate(src: Path, out: Path, **kw) -> Path:
    from omniquant.calibrate import calibrate_checkpoint

    settings = {"nsamples": 4, "seqlen": 64, "calib_data": CALIB, "epochs": 0, "lwc": False, "group_size": GROUP} | kw
    return calibrate_checkpoint(src, out, **settings)


def unpack_reference(words: torch.Tensor, bits: int, length: int, dim: int) -> np.ndarray:
    """Codes of an int32 word array whose axis `dim` is a bit stream: bit p of the stream is bit p % 32 of word
    p // 32, element i is bits [i*bits, (i+1)*bits) with the lowest first. Read one bit at a time."""
    w = words.numpy().view(np.uint32).astype(np.uint64)
    w = w if dim == 0 else w.T
    out = np.zeros((length, w.shape[1]), dtype=np.int64)
    for i in range(length):
        for t in range(bits):
            p = i * bits + t
            out[i] |= ((w[p // 32] >> np.uint64(p % 32)) & np.uint64(1)).astype(np.int64) << t
    return out if dim == 0 else out.T


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export_gptq")


@pytest.fixture(scope="module", params=BITS)
def fq(request, work, tiny_llama_dir) -> Path:
    return _calibrate(tiny_llama_dir, work / f"fq_w{request.param}", wbits=request.param)


@pytest.fixture(scope="module")
def exported(fq) -> Path:
    return export_checkpoint(fq, "gptq", fq.with_name(fq.name + "_gptq"), progress=False)


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


def test_reference_unpack_gives_exact_fake_quant_weights(fq, exported):
    qc = json.loads((fq / "quant_config.json").read_text())
    bits = qc["wbits"]
    ours, fake = _tensors(exported), _tensors(fq)
    for name in qc["quantized_linears"]:
        w = fake[f"{name}.weight"]
        n, k = w.shape
        qweight, qzeros = ours[f"{name}.qweight"], ours[f"{name}.qzeros"]
        scales, g_idx = ours[f"{name}.scales"], ours[f"{name}.g_idx"]
        assert (qweight.dtype, tuple(qweight.shape)) == (torch.int32, (k * bits // 32, n))
        assert (qzeros.dtype, tuple(qzeros.shape)) == (torch.int32, (k // GROUP, n * bits // 32))
        assert (scales.dtype, tuple(scales.shape)) == (torch.float16, (k // GROUP, n))
        assert torch.equal(g_idx, torch.arange(k, dtype=torch.int32) // GROUP)
        q = unpack_reference(qweight, bits, k, dim=0)              # [K, N]
        z = unpack_reference(qzeros, bits, n, dim=1)               # [G, N], v2: the raw zeros
        g = g_idx.numpy()
        ref = (q - z[g]).astype(np.float32) * scales.numpy().astype(np.float32)[g]
        assert np.array_equal(ref.T.view(np.int32), w.numpy().view(np.int32)), name
    assert not any(f"{n}.weight" in ours for n in qc["quantized_linears"])
    copied = {n for n in fake if n.removesuffix(".weight") not in qc["quantized_linears"]}
    assert all(torch.equal(ours[n], fake[n]) for n in copied)

    config = json.loads((exported / "config.json").read_text())["quantization_config"]
    assert config == json.loads((exported / "quantize_config.json").read_text())
    assert {k: config[k] for k in ("quant_method", "bits", "group_size", "sym", "desc_act", "checkpoint_format")} == {
        "quant_method": "gptq", "bits": bits, "group_size": GROUP, "sym": False, "desc_act": False,
        "checkpoint_format": "gptq_v2"}


def test_symmetric_run_uses_gptq_symmetric_zero(work, tiny_llama_dir):
    """MLC-style symmetric codes (zero 2^(b-1)-1) are shifted by one to GPTQ's symmetric zero 2^(b-1): same weights."""
    fq = _calibrate(tiny_llama_dir, work / "fq_sym4", wbits=4, symmetric=True)
    out = export_checkpoint(fq, "gptq", work / "gptq_sym4", progress=False)
    ours, fake = _tensors(out), _tensors(fq)
    name = "model.layers.1.mlp.down_proj"
    z = unpack_reference(ours[f"{name}.qzeros"], 4, 192, dim=1)
    assert (z == 8).all()
    q = unpack_reference(ours[f"{name}.qweight"], 4, 320, dim=0)
    assert q.min() >= 1  # MLC codes 0..14 -> 1..15
    g = ours[f"{name}.g_idx"].numpy()
    ref = (q - z[g]).astype(np.float32) * ours[f"{name}.scales"].numpy().astype(np.float32)[g]
    assert np.array_equal(ref.T, fake[f"{name}.weight"].numpy())
    assert json.loads((out / "config.json").read_text())["quantization_config"]["sym"] is True


def test_gptqmodel_torch_kernel_dequantizes_exact_weights(fq, exported):
    """GPTQModel (torch backend, float16) loads the v2 checkpoint; every quantized linear dequantizes to the fake-quant
    weight rounded to float16 (its compute dtype), and the model's logits track the fake-quant model's."""
    pytest.importorskip("gptqmodel")
    from gptqmodel import BACKEND, GPTQModel
    from transformers import AutoModelForCausalLM

    qc = json.loads((fq / "quant_config.json").read_text())
    model = GPTQModel.load(str(exported), backend=BACKEND.TORCH, device="cpu", dtype=torch.float16)
    modules = dict(model.model.named_modules())
    fake = _tensors(fq)
    for name in qc["quantized_linears"]:
        got = modules[name].dequantize_weight().T
        assert got.dtype == torch.float16 and torch.equal(got, fake[f"{name}.weight"].half()), name
    ids = torch.randint(0, 500, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model.model(ids).logits.float()
        want = AutoModelForCausalLM.from_pretrained(fq, dtype=torch.float32)(ids).logits
    assert (got - want).abs().max() < 2e-2 * want.abs().max()
