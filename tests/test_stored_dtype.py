"""Fake-quant checkpoints in the source dtype (docs/formats.md §1): the stored weight is round_D((q - z) * s); codes
are recovered from it exactly where the dtype allows (checked exhaustively), and pack / unpack_to_hf / torch agree."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from omniquant.quant.codes import (
    MAX_RECOVERABLE_DISTANCE,
    codes_recoverable,
    max_code_distance,
    recover_codes,
    stored_weight,
)
from omniquant.quant.fakequant import SCALE_MAX, SCALE_MIN
from omniquant.safetensors_io import SafetensorsDir


def _all_fp16_scales() -> torch.Tensor:
    """Every positive finite float16 value in the scale range the quantizer can produce, as float64."""
    s = torch.arange(0, 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.float16).double()
    lo = torch.tensor(SCALE_MIN).half().double()
    return s[torch.isfinite(s) & (s >= lo) & (s <= SCALE_MAX)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_code_recovery_margin_exhaustive(dtype):
    """For every float16 scale s in [1e-5, 1e4] and every |q - z| = m <= 255: w = round_D(m * s) (the float32
    product is exact). Round-to-nearest recovery rint(w / s), the quotient computed in float32 as recover_codes
    does, gives m for every m up to the dtype's limit (float16: all of them, error <= 0.122 code; bfloat16:
    m <= 127, error <= 0.483), and fails somewhere above it (bfloat16, 128 <= m <= 255): exactly the rule
    `codes_recoverable` applies."""
    s = _all_fp16_scales().float()
    m = torch.arange(1, 256, dtype=torch.float32)
    w = (m[:, None] * s[None, :]).to(dtype).float()
    finite = torch.isfinite(w)  # float16 overflows for large m * s: the export refuses those (tested below)
    err = torch.where(finite, ((w / s).double() - m[:, None]).abs(), torch.zeros_like(w, dtype=torch.float64))
    limit = MAX_RECOVERABLE_DISTANCE[dtype]
    ok_rows = min(limit, 255)
    assert err[:ok_rows].max() < 0.5
    got = torch.round(w[:ok_rows] / s)[finite[:ok_rows]]
    assert torch.equal(got, m[:ok_rows, None].expand(-1, s.numel())[finite[:ok_rows]])
    if limit < 255:
        assert (err[limit:] > 0.5).any()
    worst = {"float16": 0.1213, "bfloat16": 0.4827}[str(dtype)[6:]]
    assert err[:ok_rows].max().item() == pytest.approx(worst, abs=1e-3)
    for bits in (2, 3, 4, 6, 8):
        for sym in (False, True):
            d = max_code_distance(bits, sym)
            assert codes_recoverable(dtype, bits, sym) == (err[:d].max() < 0.5).item(), (bits, sym)
    assert not codes_recoverable(torch.bfloat16, 8, False) and codes_recoverable(torch.bfloat16, 8, True)


def test_recover_codes_rejects_foreign_weights():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (8, 64), generator=g, dtype=torch.int32)
    scales = (torch.rand(8, 1, generator=g) * 0.01 + 1e-3).half().float()
    zeros = torch.full((8, 1), 7, dtype=torch.int32)
    w16 = stored_weight(codes, scales, zeros, 64, torch.float16)
    assert torch.equal(recover_codes(w16, scales, zeros, 4, 64, False), codes)
    with pytest.raises(ValueError, match="not float16 roundings"):
        recover_codes(w16 + torch.finfo(torch.float16).eps * w16.abs().max(), scales, zeros, 4, 64, False)
    with pytest.raises(ValueError, match="out of range"):
        recover_codes(w16 * 4, scales, zeros, 4, 64, False)


def _resave(src: Path, dst: Path, dtype: torch.dtype) -> Path:
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(src, dtype=dtype).save_pretrained(dst)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, dst / f.name)
    return dst


@pytest.mark.parametrize("dtype,bits,sym,gs,scheme", [
    (torch.float16, 4, False, 64, "w4a16g64asym"),
    (torch.bfloat16, 8, False, 128, "w8a16g128asym"),  # codes not recoverable from bfloat16: stored in the sidecar
    (torch.bfloat16, 4, True, 32, "q4f16_1"),
    (torch.float32, 3, False, 128, "w3a16g128asym"),
])
def test_export_pack_unpack_in_source_dtype(dtype, bits, sym, gs, scheme, tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from mlc_schemes import load_packed, pack_checkpoint, unpack_to_hf
    from mlc_schemes.unpack import dequantized_state_dict
    from omniquant.calibrate import calibrate_checkpoint
    from omniquant.quant.codes import dequantize

    src = _resave(tiny_llama_dir, tmp_path / "src", dtype)
    fq = calibrate_checkpoint(src, tmp_path / "fq", wbits=bits, group_size=gs, symmetric=sym, epochs=0, lwc=False)
    qc = json.loads((fq / "quant_config.json").read_text())
    assert qc["weight_dtype"] == str(dtype)[6:] and qc["codes_in_sidecar"] is (not codes_recoverable(dtype, bits, sym))
    weights, side = SafetensorsDir(fq), SafetensorsDir(fq, "quant_params")
    source = SafetensorsDir(src)
    assert all(weights.dtype(n) == source.dtype(n) for n in weights.names())
    assert weights.nbytes("model.layers.0.mlp.up_proj.weight") == source.nbytes("model.layers.0.mlp.up_proj.weight")

    packed = pack_checkpoint(fq, scheme, tmp_path / "packed", progress=False)
    chat, params = load_packed(packed)
    exact = dequantized_state_dict(chat, params)  # float32 grid values (q - z) * s
    for lin in qc["quantized_linears"]:
        w, s, z = weights.get(f"{lin}.weight"), side.get(f"{lin}.scales"), side.get(f"{lin}.zeros")
        grid = torch.from_numpy(exact[f"{lin}.weight"])
        # what the checkpoint stores: the exact grid value rounded once to the dtype
        assert torch.equal(grid.to(dtype), w), lin
        codes = side.get(f"{lin}.codes").int() if qc["codes_in_sidecar"] else recover_codes(w, s, z, bits, gs, sym)
        assert torch.equal(dequantize(codes, s, z, gs), grid), lin
        if dtype == torch.float32:
            assert torch.equal(w, grid)

    # unpack_to_hf in the source dtype reproduces every quantized weight of the checkpoint bit for bit
    model = unpack_to_hf(packed, dtype="source")
    assert model.dtype == dtype
    sd = model.state_dict()
    for lin in qc["quantized_linears"]:
        assert torch.equal(sd[f"{lin}.weight"], weights.get(f"{lin}.weight")), lin
    # torch on the checkpoint (widened to float32) vs unpack_to_hf's exact float32 grid: the weights differ by at
    # most one rounding to the dtype (relative 2^-11 float16, 2^-8 bfloat16), the logits by little
    ck = AutoModelForCausalLM.from_pretrained(fq, dtype=torch.float32).eval()
    ex = unpack_to_hf(packed)
    ids = torch.randint(3, 500, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ck(ids).logits, ex(ids).logits
    tol = {torch.float32: 2e-2, torch.float16: 2e-2, torch.bfloat16: 5e-2}[dtype]  # fp16 norms / embedding in `ex`
    assert (a - b).abs().max() <= tol * b.abs().max(), (a - b).abs().max()


@pytest.mark.parametrize("dtype,bits", [(torch.float16, 4), (torch.bfloat16, 8)])
def test_gptq_export_reads_sharded_source_dtype_checkpoints(dtype, bits, tiny_llama_dir, tmp_path):
    """`omniquant export` on a sharded (index) fake-quant checkpoint in its source dtype, bfloat16 8-bit with its
    codes in the sidecar: the reference-unpacked GPTQ tensors, (q - z) * s in float32 rounded once to the dtype,
    are the stored weights bit for bit."""
    from test_export_gptq import unpack_reference

    from omniquant.calibrate import calibrate_checkpoint
    from serving_formats import export_checkpoint

    src = _resave(tiny_llama_dir, tmp_path / "src", dtype)
    fq = calibrate_checkpoint(src, tmp_path / "fq", wbits=bits, group_size=64, epochs=0, lwc=False,
                              max_shard_bytes=300_000)
    qc = json.loads((fq / "quant_config.json").read_text())
    assert len(list(fq.glob("model-*.safetensors"))) > 1 and qc["codes_in_sidecar"] is (dtype == torch.bfloat16)
    out = SafetensorsDir(export_checkpoint(fq, "gptq", tmp_path / "gptq", progress=False))
    weights = SafetensorsDir(fq)
    for lin in qc["quantized_linears"]:
        w = weights.get(f"{lin}.weight")
        n, k = w.shape
        q = unpack_reference(out.get(f"{lin}.qweight"), bits, k, dim=0)  # [K, N]
        z = unpack_reference(out.get(f"{lin}.qzeros"), bits, n, dim=1)  # [G, N]
        g = out.get(f"{lin}.g_idx").numpy()
        grid = (q - z[g]).astype("float32") * out.get(f"{lin}.scales").float().numpy()[g]
        assert torch.equal(torch.from_numpy(grid.T.copy()).to(dtype), w), lin


def test_quantized_weight_that_overflows_float16_is_refused(tmp_path, tiny_llama_dir, capsys):
    """A float16 source whose largest weight is float16's largest value, 65504: at 8 bits per channel the scale
    65504 / 255 rounds up to 257 (float16), the top grid point 255 * 257 = 65535 rounds to inf in float16; the export
    says so instead of writing inf."""
    from safetensors.torch import load_file, save_file

    from omniquant.cli import main

    src = _resave(tiny_llama_dir, tmp_path / "src", torch.float16)
    t = load_file(str(src / "model.safetensors"))
    w = t["model.layers.0.mlp.up_proj.weight"]
    w[0, 0] = 65504.0
    save_file(t, str(src / "model.safetensors"), {"format": "pt"})
    rc = main(["calibrate", "--model", str(src), "--output", str(tmp_path / "o"), "--wbits", "8",
               "--group-size", "-1", "--epochs", "0", "--no-lwc"])
    err = capsys.readouterr().err
    assert rc == 2 and "overflows float16" in err and not (tmp_path / "o").exists(), err


def test_pack_rejects_codes_that_do_not_reproduce_the_weights(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from mlc_schemes import pack_checkpoint
    from omniquant.calibrate import calibrate_checkpoint
    from omniquant.errors import UserError

    src = _resave(tiny_llama_dir, tmp_path / "src", torch.bfloat16)
    fq = calibrate_checkpoint(src, tmp_path / "fq", wbits=8, group_size=128, epochs=0, lwc=False)
    side = load_file(str(fq / "quant_params.safetensors"))
    name = "model.layers.1.self_attn.v_proj.codes"
    side[name] = (side[name].int() + 1).clamp(max=255).to(torch.uint8)
    save_file(side, str(fq / "quant_params.safetensors"))
    with pytest.raises(UserError, match="v_proj: the sidecar's codes do not reproduce"):
        pack_checkpoint(fq, "w8a16g128asym", tmp_path / "p", progress=False)
    assert not (tmp_path / "p").exists()
