"""`omniquant export` bad input: a clear error, exit status 2 through the CLI, and nothing left at the output path
(no directory, no temporary sibling). Ragged layers (in_features not a multiple of the group size) are refused with
the layers named and the group sizes that would work; per-channel runs have no such limit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from omniquant.cli import main
from omniquant.errors import UserError
from omniquant.paths import CALIB_BOOKS, austen_dir
from serving_formats import FORMATS, export_checkpoint
from serving_formats.source import working_group_sizes

CALIB = str(austen_dir() / CALIB_BOOKS[0])


def _calibrate(src: Path, out: Path, **kw) -> Path:
    from omniquant.calibrate import calibrate_checkpoint

    settings = {"nsamples": 4, "seqlen": 64, "calib_data": CALIB, "epochs": 0, "lwc": False} | kw
    return calibrate_checkpoint(src, out, **settings)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export_errors")


@pytest.fixture(scope="module")
def fq4(work, tiny_llama_dir) -> Path:
    return _calibrate(tiny_llama_dir, work / "fq_w4g64", wbits=4, group_size=64)


def _refused(work: Path, src, fmt: str, match: str, **kw) -> str:
    """Export must raise UserError matching `match` and leave the parent folder as it was."""
    before = {p.name for p in work.iterdir()}
    with pytest.raises(UserError, match=match) as e:
        export_checkpoint(src, fmt, work / "never", progress=False, **kw)
    assert {p.name for p in work.iterdir()} == before
    return str(e.value)


def _variant(work: Path, fq: Path, name: str) -> Path:
    """A copy of `fq` to corrupt."""
    dst = work / name
    if dst.exists():
        shutil.rmtree(dst)
    return Path(shutil.copytree(fq, dst))


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_ragged_layers_are_refused_naming_layers_and_working_group_sizes(work, tiny_llama_dir, fmt):
    fq = work / "fq_w4g128"
    if not fq.exists():
        _calibrate(tiny_llama_dir, fq, wbits=4, group_size=128)  # in_features 192 and 320: both ragged at 128
    msg = _refused(work, fq, fmt, "not a multiple of group size 128")
    assert "14 of 14 quantized linears" in msg
    assert "model.layers.*.self_attn.q_proj (in_features 192) x2" in msg
    assert "model.layers.*.mlp.down_proj (in_features 320) x2" in msg
    assert "--group-size 64 (or 32) (or 16)" in msg and "never" not in msg


def test_group_sizes_suggested_for_smollm2_shapes():
    # SmolLM2-135M: q/k/v/o/gate/up read 576 = 4.5 x 128 features, down reads 1536.
    assert working_group_sizes([576, 576, 1536], 128) == [64, 32, 16]
    assert working_group_sizes([4096, 11008], 128) == [64, 32, 16]  # 11008 = 86 x 128: fine at 128 already
    assert working_group_sizes([4096, 14336], 256) == [128, 64, 32, 16]


def test_per_channel_run_has_no_group_limit_but_gptq_needs_word_aligned_shapes(work, tiny_llama_dir):
    """A model with in_features 80 / 160: per-channel exports to compressed-tensors (strategy channel) exactly; GPTQ
    refuses (its words need multiples of 32), naming the shapes."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig, LlamaConfig

    pytest.importorskip("compressed_tensors")
    src = work / "odd_llama"
    cfg = LlamaConfig(hidden_size=80, intermediate_size=160, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=40, vocab_size=515, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(src)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama_dir / f, src / f)
    fq = _calibrate(src, work / "fq_odd_pc", wbits=3, group_size=-1)
    msg = _refused(work, fq, "gptq", "multiples of 32")
    assert "model.layers.*.self_attn.k_proj [40, 80]" in msg and "model.layers.*.mlp.down_proj [80, 160]" in msg
    out = export_checkpoint(fq, "compressed-tensors", work / "odd_pc_ct", progress=False)
    weights = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert (weights["strategy"], weights["group_size"]) == ("channel", None)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                 quantization_config=CompressedTensorsConfig(dequantize=True))
    want = load_file(fq / "model.safetensors")
    got = model.state_dict()
    assert all(torch.equal(got[n], w) for n, w in want.items())


def test_checkpoint_without_sidecar(work, tiny_llama_dir):
    _refused(work, tiny_llama_dir, "compressed-tensors", "no quantization sidecar")
    _refused(work, work / "does-not-exist", "gptq", "is not a directory")


def test_unknown_format_and_existing_output(work, fq4):
    _refused(work, fq4, "awq", "unknown export format 'awq'; choose one of compressed-tensors, gptq")
    existing = work / "existing"
    existing.mkdir(exist_ok=True)
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        export_checkpoint(fq4, "gptq", existing, progress=False)
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]


def test_bits_a_format_cannot_hold(work, tiny_llama_dir):
    fq6 = _calibrate(tiny_llama_dir, work / "fq_w6g64", wbits=6, group_size=64)
    _refused(work, fq6, "gptq", "gptq cannot hold 6-bit weights .*export to compressed-tensors instead")


def test_symmetric_flag_that_does_not_match_the_zeros(work, fq4):
    bad = _variant(work, fq4, "fq_says_sym")
    qc = json.loads((bad / "quant_config.json").read_text())
    (bad / "quant_config.json").write_text(json.dumps(qc | {"symmetric": True}))
    for fmt in FORMATS:
        _refused(work, bad, fmt, "says symmetric but .* has zeros other than 7")


def test_sidecar_that_does_not_belong_to_the_weights(work, fq4):
    bad = _variant(work, fq4, "fq_foreign_weights")
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] += 1e-3
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    msg = _refused(work, bad, "compressed-tensors", "model.layers.1.mlp.up_proj: 1 weights are not on the sidecar")
    assert "4-bit grid" in msg
    bits = _variant(work, fq4, "fq_says_3bit")
    qc = json.loads((bits / "quant_config.json").read_text())
    (bits / "quant_config.json").write_text(json.dumps(qc | {"wbits": 3}))
    _refused(work, bits, "gptq", "zeros outside \\[0, 7\\]|not on the sidecar's 3-bit grid")


def test_sidecar_missing_tensors_and_weight_activation_runs(work, fq4):
    bad = _variant(work, fq4, "fq_short_sidecar")
    side = load_file(bad / "quant_params.safetensors")
    del side["model.layers.0.self_attn.q_proj.zeros"]
    save_file(side, str(bad / "quant_params.safetensors"))
    _refused(work, bad, "gptq", "sidecar quant_params.safetensors lacks 1 tensors")
    wa = _variant(work, fq4, "fq_w4a8")
    qc = json.loads((wa / "quant_config.json").read_text())
    (wa / "quant_config.json").write_text(json.dumps(qc | {"abits": 8}))
    _refused(work, wa, "compressed-tensors", "activations quantized to 8 bits; .* weight-only")


def test_cli_exit_status_and_messages(work, fq4, capsys):
    assert main(["export", "--input", str(fq4), "--format", "gptq", "--output", str(work / "cli_gptq")]) == 0
    assert "exported" in capsys.readouterr().out and (work / "cli_gptq" / "model.safetensors").is_file()
    assert main(["export", "--input", str(fq4), "--format", "exl2", "--output", str(work / "cli_bad")]) == 2
    assert "error: unknown export format 'exl2'" in capsys.readouterr().err
    assert main(["export", "--input", str(fq4), "--format", "gptq", "--output", str(work / "cli_gptq")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert not (work / "cli_bad").exists()
