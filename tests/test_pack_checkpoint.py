"""End to end: tiny model -> calibrate -> pack -> load / unpack_to_hf, and bad input (clear errors, nothing left)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from mlc_schemes import get_scheme, load_packed, pack_checkpoint, unpack_to_hf
from mlc_schemes.size_report import size_report
from mlc_schemes.unpack import dequantized_state_dict
from omniquant.errors import UserError
from omniquant.paths import CALIB_BOOKS, EVAL_BOOKS, austen_dir

CALIB = str(austen_dir() / CALIB_BOOKS[0])
EVAL = str(austen_dir() / EVAL_BOOKS[0])


def _calibrate(src: Path, out: Path, **kw) -> Path:
    from omniquant.calibrate import calibrate_checkpoint

    settings = {"nsamples": 4, "seqlen": 64, "calib_data": CALIB, "epochs": 0, "lwc": False} | kw
    return calibrate_checkpoint(src, out, **settings)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pack")


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir) -> Path:
    return tiny_llama_dir  # shared session fixture (tests/conftest.py)


@pytest.fixture(scope="module")
def fq_w3(work, tiny) -> Path:
    """OmniQuant W3 g128 asym with one LWC epoch (the issue's calibrated tiny model)."""
    return _calibrate(tiny, work / "fq_w3", wbits=3, group_size=128, epochs=1, lwc=True)


@pytest.fixture(scope="module")
def packed_w3(work, fq_w3) -> Path:
    return pack_checkpoint(fq_w3, "w3a16g128asym", work / "packed_w3", progress=False)


def _fq_tensors(fq: Path) -> dict[str, np.ndarray]:
    return load_file(fq / "model.safetensors")


def test_packed_directory_layout_and_chat_config(fq_w3, packed_w3):
    cfg, params = load_packed(packed_w3)
    scheme = get_scheme("w3a16g128asym")
    assert cfg["quantization"] == "w3a16g128asym"
    assert cfg["quantization_config"]["bits"] == 3 and cfg["quantization_config"]["group_size"] == 128
    hf = json.loads((fq_w3 / "config.json").read_text())
    mc = cfg["model_config"]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "vocab_size", "tie_word_embeddings",
                "max_position_embeddings", "hidden_act", "model_type"):
        assert mc[key] == hf[key], key
    assert mc["rope_theta"] == hf["rope_parameters"]["rope_theta"] and mc["rope_scaling"] is None
    assert cfg["vocab_size"] == hf["vocab_size"] and cfg["context_window_size"] == hf["max_position_embeddings"]
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (
        hf["bos_token_id"], hf["eos_token_id"], hf["pad_token_id"])
    for f in cfg["tokenizer_files"]:
        assert (packed_w3 / f).read_bytes() == (fq_w3 / f).read_bytes()
    assert "tokenizer.json" in cfg["tokenizer_files"]

    qlin = json.loads((fq_w3 / "quant_config.json").read_text())["quantized_linears"]
    assert sorted(cfg["quantization_config"]["quantized_linears"]) == sorted(qlin)
    tensors = _fq_tensors(fq_w3)
    for name in qlin:
        n, k = tensors[f"{name}.weight"].shape
        assert params[f"{name}.q_weight"].dtype == np.uint32
        assert params[f"{name}.q_weight"].shape == (n, math.ceil(k / 10))
        assert params[f"{name}.q_scale"].dtype == np.float16 == params[f"{name}.q_zero"].dtype
        assert params[f"{name}.q_scale"].shape == (n, math.ceil(k / 128))
        assert f"{name}.weight" not in params
    others = [n for n in tensors if n.removesuffix(".weight") not in qlin]
    assert all(params[n].dtype == np.float16 for n in others)

    # tensor-cache.json: MLC record fields, md5 per shard, metadata from the actual bytes.
    cache = json.loads((packed_w3 / "tensor-cache.json").read_text())
    stored = sum(a.nbytes for a in params.values())
    assert cache["metadata"]["ParamSize"] == len(params)
    assert cache["metadata"]["ParamBytes"] == stored
    logical = sum(a.size for a in tensors.values())
    assert cache["metadata"]["BitsPerParam"] == pytest.approx(stored * 8 / logical)
    for shard in cache["records"]:
        assert shard["format"] == "raw-shard" and len(shard["md5sum"]) == 32
        assert (packed_w3 / shard["dataPath"]).stat().st_size == shard["nbytes"] <= 32 << 20
        assert {"name", "shape", "dtype", "format", "nbytes", "byteOffset"} <= set(shard["records"][0])
    assert scheme.elems_per_word == 10


def test_dequantized_linears_are_bit_exact(fq_w3, packed_w3):
    cfg, params = load_packed(packed_w3)
    state = dequantized_state_dict(cfg, params)
    tensors = _fq_tensors(fq_w3)
    qlin = set(cfg["quantization_config"]["quantized_linears"])
    assert set(state) == set(tensors)
    for name, ref in tensors.items():
        if name.removesuffix(".weight") in qlin:
            np.testing.assert_array_equal(state[name].view(np.uint32), ref.view(np.uint32), err_msg=name)
        else:  # stored float16: exactly the float16 rounding of the fake-quant float32 tensor
            np.testing.assert_array_equal(state[name], ref.astype(np.float16).astype(np.float32), err_msg=name)


def _ref_model(fq: Path, round_unquantized_to_fp16: bool):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fq, dtype=torch.float32).eval()
    if round_unquantized_to_fp16:
        qlin = set(json.loads((fq / "quant_config.json").read_text())["quantized_linears"])
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.removesuffix(".weight") not in qlin:
                    p.copy_(p.half().float())
    return model


def test_unpack_to_hf_matches_fake_quant_logits_and_perplexity(fq_w3, packed_w3):
    from transformers import AutoTokenizer

    from omniquant.data import load_tokens
    from omniquant.ppl import perplexity

    model = unpack_to_hf(packed_w3)
    ids = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(ids).logits
        # Same weights as the packed ones (fp16-rounded norms/embeddings): identical computation, identical logits.
        assert torch.equal(got, _ref_model(fq_w3, True)(ids).logits)
        fq_logits = _ref_model(fq_w3, False)(ids).logits
    assert (got - fq_logits).abs().max() < 2e-2 * fq_logits.abs().max()

    tokens = load_tokens(AutoTokenizer.from_pretrained(fq_w3), EVAL, split="eval")
    ppl_packed = perplexity(model, tokens, seqlen=128, max_windows=8)
    ppl_fq = perplexity(_ref_model(fq_w3, False), tokens, seqlen=128, max_windows=8)
    assert abs(ppl_packed / ppl_fq - 1) < 1e-3, (ppl_packed, ppl_fq)


@pytest.mark.parametrize("bits,group,scheme", [(4, 32, "q4f16_1"), (3, 40, "q3f16_1")])
def test_symmetric_run_packs_losslessly_into_stock_mlc_scheme(work, tiny, bits, group, scheme):
    fq = _calibrate(tiny, work / f"fq_sym{bits}", wbits=bits, group_size=group, symmetric=True)
    if bits == 4:  # same bits and group but asymmetric: still refused (the scheme must match the run)
        with pytest.raises(UserError, match="calibrated with wbits=4, group_size=32, symmetric"):
            pack_checkpoint(fq, "w4a16g32asym", work / "never_sym", progress=False)
    out = pack_checkpoint(fq, scheme, work / f"packed_{scheme}", progress=False)
    cfg, params = load_packed(out)
    assert not any(n.endswith(".q_zero") for n in params)  # MLC symmetric: zero fixed at max_int, not stored
    state = dequantized_state_dict(cfg, params)
    tensors = _fq_tensors(fq)
    for name in cfg["quantization_config"]["quantized_linears"]:
        w = tensors[f"{name}.weight"]
        np.testing.assert_array_equal(state[f"{name}.weight"].view(np.uint32), w.view(np.uint32))
        # Independent check of MLC's dequantization (q - max_int) * scale, from the bit formula, in float64.
        words, scale = params[f"{name}.q_weight"].astype(np.uint64), params[f"{name}.q_scale"].astype(np.float64)
        epw, mx = 32 // bits, 2 ** (bits - 1) - 1
        kk = np.arange(w.shape[1])
        q = (words[:, kk // epw] >> ((kk % epw) * bits).astype(np.uint64)) & (2**bits - 1)
        ref = (q.astype(np.float64) - mx) * scale[:, kk // group]
        np.testing.assert_allclose(w, ref, rtol=2**-23, atol=0)


def test_tied_qwen2_with_biases_round_trips(work):
    """Qwen2 (q/k/v biases) with tied embeddings: lm_head stored once, biases float16, logits as the reference."""
    from transformers import AutoModelForCausalLM

    from omniquant.tiny import make_tiny

    src = make_tiny(work / "tiny_qwen2", "qwen2", seed=1)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    tied = work / "tiny_qwen2_tied"
    model.save_pretrained(tied)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, tied / f)
    fq = _calibrate(tied, work / "fq_qwen2", wbits=4, group_size=64)
    out = pack_checkpoint(fq, "w4a16g64asym", work / "packed_qwen2", progress=False)
    _, params = load_packed(out)
    assert "lm_head.weight" not in params and params["model.embed_tokens.weight"].dtype == np.float16
    assert params["model.layers.0.self_attn.q_proj.bias"].dtype == np.float16
    got = unpack_to_hf(out)
    assert got.lm_head.weight.data_ptr() == got.model.embed_tokens.weight.data_ptr()
    ids = torch.arange(40)[None] % got.config.vocab_size
    with torch.no_grad():
        assert torch.equal(got(ids).logits, _ref_model(fq, True)(ids).logits)


def test_size_report_counts_actual_bytes(packed_w3):
    rep = size_report(packed_w3)
    shards = sorted(packed_w3.glob("params_shard_*.bin"))
    assert rep["shard_bytes"] == sum(p.stat().st_size for p in shards) == rep["param_bytes"]
    # Tiny shapes: K = 192 -> 20 words + 2 groups; K = 320 -> 32 words + 3 groups (per row, 32-bit units).
    cfg = json.loads((packed_w3 / "mlc-chat-config.json").read_text())
    expected_bits = sum(n * ((-(-k // 10)) * 32 + (-(-k // 128)) * 32)
                        for n, k in cfg["quantization_config"]["quantized_linears"].values())
    assert rep["linear_bytes"] * 8 == expected_bits
    assert rep["linear_vs_layout"] == pytest.approx(1.0)
    assert rep["nominal_bits_per_weight"] == 3.25


def test_size_report_reads_no_weight_bytes(packed_w3, monkeypatch):
    """The report sizes tensors from their records: a 7B's shards are 3.5 GB, and reading them back doubled pack's
    peak memory (3.90 GiB measured, 0.99 without)."""
    import builtins

    expected = size_report(packed_w3)
    real_read, real_open = Path.read_bytes, builtins.open

    def is_shard(path) -> bool:
        return Path(str(path)).name.startswith("params_shard_")

    def read_bytes(self):
        assert not is_shard(self), f"size_report read {self.name}"
        return real_read(self)

    def guarded_open(file, *args, **kwargs):
        assert not (isinstance(file, (str, Path)) and is_shard(file)), f"size_report opened {file}"
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    monkeypatch.setattr(builtins, "open", guarded_open)
    assert size_report(packed_w3) == expected


def _rtn_reference(w: np.ndarray, bits: int, gs: int) -> np.ndarray:
    """Asymmetric round-to-nearest in float64, written out independently of the project's quantizer: groups of gs
    along K (a ragged last group keeps its own min/max), range widened to contain 0, fp16 scale, integer zero."""
    n, k = w.shape
    out = np.empty((n, k))
    qmax = 2**bits - 1
    for start in range(0, k, gs):
        g = w[:, start:start + gs].astype(np.float64)
        hi, lo = np.maximum(g.max(1), 0), np.minimum(g.min(1), 0)
        scale = np.clip((hi - lo) / qmax, 1e-5, 1e4).astype(np.float16).astype(np.float64)
        zero = np.clip(np.round(-lo / scale), 0, qmax)
        q = np.clip(np.round(g / scale[:, None]) + zero[:, None], 0, qmax)
        out[:, start:start + gs] = (q - zero[:, None]) * scale[:, None]
    return out


def test_embedding_scheme_quantizes_embedding_and_untied_lm_head(work, fq_w3, packed_w3):
    packed = pack_checkpoint(fq_w3, "w3a16g128asym", work / "packed_w3_emb8", progress=False,
                             embedding_scheme="w8a16g128asym")
    chat, params = load_packed(packed)
    eq = chat["quantization_config"]["embedding_quantization"]
    assert (eq["name"], eq["bits"]) == ("w8a16g128asym", 8)
    assert set(eq["quantized_tensors"]) == {"model.embed_tokens", "lm_head"}
    assert "model.embed_tokens.weight" not in params and params["model.embed_tokens.q_weight"].dtype == np.uint32
    state = dequantized_state_dict(chat, params)
    src = _fq_tensors(fq_w3)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        ref = _rtn_reference(src[name], 8, 128)  # K = 192: one full group of 128 and a ragged one of 64
        np.testing.assert_allclose(state[name], ref, rtol=0, atol=1e-7)
        assert 0 < np.abs(state[name] - src[name]).max() < 1e-2  # quantized, and 8-bit close
    assert size_report(packed)["embedding_scheme"] == "w8a16g128asym"
    # the decoder linears are untouched by the embedding scheme
    _, plain = load_packed(packed_w3)
    assert all((plain[n] == params[n]).all() for n in plain if ".layers." in n)


# ---------------------------------------------------------------------------------------------- bad input


def _no_leftovers(parent: Path, before: set[str]) -> None:
    assert {p.name for p in parent.iterdir()} == before


@pytest.mark.parametrize("scheme", ["w4a16g128asym", "w3a16g64asym", "q3f16_1", "w3a16asym"])
def test_scheme_not_matching_the_calibration_is_rejected(work, fq_w3, scheme):
    before = {p.name for p in work.iterdir()}
    with pytest.raises(UserError, match="calibrated with wbits=3, group_size=128, asymmetric"):
        pack_checkpoint(fq_w3, scheme, work / "never", progress=False)
    _no_leftovers(work, before)


def test_unknown_scheme_lists_registered(fq_w3, tmp_path):
    with pytest.raises(UserError, match="registered: .*w3a16g128asym.*q4f16_1"):
        pack_checkpoint(fq_w3, "w3g128", tmp_path / "out")


def _broken_copy(fq: Path, dest: Path, edit) -> Path:
    shutil.copytree(fq, dest)
    side = load_file(dest / "quant_params.safetensors")
    edit(side)
    save_file(side, str(dest / "quant_params.safetensors"))
    return dest


@pytest.mark.parametrize("case,message", [
    ("scales_doubled", "sidecar inconsistent with the weights of model.layers.0.self_attn.q_proj"),
    ("zeros_shifted", "sidecar inconsistent with the weights of model.layers.0.self_attn.q_proj"),
    ("shape", "do not match weight"),
    ("missing_tensor", "sidecar lacks"),
])
def test_inconsistent_sidecar_is_rejected_without_leftovers(tmp_path, fq_w3, case, message):
    name = "model.layers.0.self_attn.q_proj"

    def edit(side):
        if case == "scales_doubled":
            side[f"{name}.scales"] = side[f"{name}.scales"] * 2
        elif case == "zeros_shifted":
            side[f"{name}.zeros"] = np.where(side[f"{name}.zeros"] < 7, side[f"{name}.zeros"] + 1, 0).astype(np.int32)
        elif case == "shape":
            side[f"{name}.scales"] = side[f"{name}.scales"][:, :1].copy()
            side[f"{name}.zeros"] = side[f"{name}.zeros"][:, :1].copy()
        else:
            del side[f"{name}.zeros"]

    bad = _broken_copy(fq_w3, tmp_path / "bad", edit)
    before = {p.name for p in tmp_path.iterdir()}
    with pytest.raises(UserError, match=message):
        pack_checkpoint(bad, "w3a16g128asym", tmp_path / "out", progress=False)
    _no_leftovers(tmp_path, before)


def test_missing_sidecar_and_existing_output(tmp_path, fq_w3, packed_w3):
    plain = tmp_path / "plain"
    shutil.copytree(fq_w3, plain, ignore=shutil.ignore_patterns("quant_params.safetensors"))
    with pytest.raises(UserError, match="sidecar missing"):
        pack_checkpoint(plain, "w3a16g128asym", tmp_path / "out", progress=False)
    with pytest.raises(UserError, match="already exists"):
        pack_checkpoint(fq_w3, "w3a16g128asym", packed_w3, progress=False)


def test_corrupt_shard_is_detected(tmp_path, packed_w3):
    bad = tmp_path / "copy"
    shutil.copytree(packed_w3, bad)
    shard = bad / "params_shard_0.bin"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x40
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match="md5 mismatch in weight shard params_shard_0.bin"):
        load_packed(bad)
    load_packed(bad, verify=False)  # size still right: readable without verification
    shard.write_bytes(bytes(data[:-4]))
    with pytest.raises(UserError, match="has .* bytes, the index says"):
        load_packed(bad, verify=False)
    with pytest.raises(UserError, match="not a packed weights directory"):
        load_packed(tmp_path)


def test_cli_pack_reports_and_fails_cleanly(tmp_path, fq_w3, capsys):
    from omniquant.cli import main

    assert main(["pack", "--input", str(fq_w3), "--scheme", "w4a16g128asym", "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: scheme w4a16g128asym") and err.count("\n") == 1
    assert not (tmp_path / "x").exists()
    report = tmp_path / "report.json"
    assert main(["pack", "--input", str(fq_w3), "--scheme", "w3a16g128asym", "--output", str(tmp_path / "ok"),
                 "--report-json", str(report)]) == 0
    assert "bits/weight" in capsys.readouterr().out
    assert json.loads(report.read_text())["linear_bytes"] == size_report(tmp_path / "ok")["linear_bytes"]


def test_write_packed_model_from_synthetic_codes(tmp_path):
    """Synthetic weights (no checkpoint, no tokenizer): what a random-weights bench writes, read back exactly."""
    from mlc_schemes import linear_params, write_packed_model
    from mlc_schemes.packing import dequantize

    scheme = get_scheme("w2a16g64asym")
    rng = np.random.default_rng(3)
    n, k = 24, 150
    codes = rng.integers(0, 4, size=(n, k))
    scales = rng.uniform(0.01, 1, size=(n, 3)).astype(np.float16)
    zeros = rng.integers(0, 4, size=(n, 3))
    norm = rng.normal(size=k).astype(np.float32)
    params = [*linear_params("model.layers.0.mlp.down_proj", codes, scales, zeros, scheme),
              ("model.norm.weight", norm.astype(np.float16))]
    hf = {"model_type": "llama", "hidden_size": 150, "num_attention_heads": 3, "vocab_size": 10}
    out = write_packed_model(tmp_path / "syn", hf, scheme, params, {"model.layers.0.mlp.down_proj": [n, k]},
                             lambda: n * k + k)
    cfg, back = load_packed(out)
    assert cfg["tokenizer_files"] == [] and cfg["model_config"]["head_dim"] == 50
    state = dequantized_state_dict(cfg, back)
    ref = dequantize(codes, scales, zeros, 64)
    np.testing.assert_array_equal(state["model.layers.0.mlp.down_proj.weight"], ref)
    assert json.loads((out / "tensor-cache.json").read_text())["metadata"]["BitsPerParam"] == pytest.approx(
        sum(a.nbytes for a in back.values()) * 8 / (n * k + k))
    with pytest.raises(UserError, match="already exists"):
        write_packed_model(out, hf, scheme, [], {}, lambda: 1)


@pytest.mark.parametrize("key", ["abits", "kv_bits"])
def test_weight_activation_runs_are_rejected(tmp_path, fq_w3, key):
    bad = tmp_path / "wa"
    shutil.copytree(fq_w3, bad)
    qc = json.loads((bad / "quant_config.json").read_text())
    qc[key] = 8
    (bad / "quant_config.json").write_text(json.dumps(qc))
    with pytest.raises(UserError, match="weight-only"):
        pack_checkpoint(bad, "w3a16g128asym", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
