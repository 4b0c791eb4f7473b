"""compressed-tensors export: a calibrated tiny model loaded by plain transformers with the compressed-tensors package
(the pinned release, whose dense 3-bit layout is the one written) decompresses to exactly the fake-quant weights and
scores the same perplexity; the packed tensors equal what the library's own compressor writes for the same grid."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from omniquant.paths import CALIB_BOOKS, EVAL_BOOKS, austen_dir
from serving_formats import export_checkpoint

ct = pytest.importorskip("compressed_tensors")
CALIB = str(austen_dir() / CALIB_BOOKS[0])
EVAL = str(austen_dir() / EVAL_BOOKS[0])
GROUP = 64  # divides the tiny model's in_features 192 and 320


def _calibrate(src: Path, out: Path, **kw) -> Path:
    from omniquant.calibrate import calibrate_checkpoint

    settings = {"nsamples": 4, "seqlen": 64, "calib_data": CALIB, "epochs": 0, "lwc": False, "group_size": GROUP} | kw
    return calibrate_checkpoint(src, out, **settings)


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        if f.name != "quant_params.safetensors":
            out |= load_file(f)
    return out


def _load_ct(path: Path, dtype=torch.float32, dequantize: bool = True):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw).eval()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export_ct")


@pytest.fixture(scope="module", params=[2, 3, 4, 6, 8])
def fq(request, work, trained_llama_dir) -> Path:
    """The trained tiny Llama calibrated at `bits` g64 asym: OmniQuant LWC (1 epoch) at 3 bits, the calibrate
    command's round-to-nearest (LWC at its init, no training) at the others."""
    bits = request.param
    lwc = {"epochs": 1, "lwc": True} if bits == 3 else {}
    return _calibrate(trained_llama_dir, work / f"fq_w{bits}", wbits=bits, **lwc)


@pytest.fixture(scope="module")
def exported(fq) -> Path:
    return export_checkpoint(fq, "compressed-tensors", fq.with_name(fq.name + "_ct"), progress=False)


def test_transformers_decompresses_exact_weights_and_same_perplexity(fq, exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from omniquant.data import load_tokens
    from omniquant.ppl import perplexity

    model = _load_ct(exported)
    ref = AutoModelForCausalLM.from_pretrained(fq, dtype=torch.float32).eval()
    got, want = model.state_dict(), ref.state_dict()
    assert set(got) == set(want)
    for name, w in want.items():  # every tensor, bit for bit (quantized linears decompressed by the library)
        assert got[name].dtype == w.dtype and torch.equal(got[name].view(torch.int32), w.view(torch.int32)), name
    tokens = load_tokens(AutoTokenizer.from_pretrained(exported), EVAL, split="eval")
    assert perplexity(model, tokens, seqlen=128, max_windows=2) == perplexity(ref, tokens, seqlen=128, max_windows=2)


def test_packed_tensors_equal_the_librarys_own_compressor(fq, exported):
    """compressed-tensors' PackedQuantizationCompressor, given the fake-quant weight and the sidecar's grid (signed,
    as the library keeps it), writes the same bits; our config parses as the library's QuantizationConfig."""
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    config = json.loads((exported / "config.json").read_text())["quantization_config"]
    scheme = QuantizationConfig.model_validate(config).config_groups["group_0"]
    qc = json.loads((fq / "quant_config.json").read_text())
    bits = qc["wbits"]
    assert (scheme.weights.num_bits, scheme.weights.group_size, scheme.weights.symmetric) == (bits, GROUP, False)
    assert config["ignore"] == ["lm_head"] and config["format"] == "pack-quantized"
    ours, fake, side = _tensors(exported), _tensors(fq), load_file(fq / "quant_params.safetensors")
    for name in qc["quantized_linears"]:
        w = fake[f"{name}.weight"]
        lib = PackedQuantizationCompressor.compress(
            {"weight": w, "weight_scale": side[f"{name}.scales"],
             "weight_zero_point": (side[f"{name}.zeros"] - 2 ** (bits - 1)).to(torch.int8)}, scheme)
        for key in ("weight_packed", "weight_zero_point", "weight_shape"):
            assert torch.equal(ours[f"{name}.{key}"], lib[key]), (name, key)
        n, k = w.shape
        assert ours[f"{name}.weight_packed"].shape == (n, -(-k * bits // 32))
        assert ours[f"{name}.weight_zero_point"].shape == (-(-n * bits // 32), k // GROUP)
        state = {key.removeprefix(f"{name}."): t for key, t in ours.items() if key.startswith(f"{name}.")}
        assert torch.equal(PackedQuantizationCompressor.decompress(state, scheme)["weight"], w), name
    copied = {n for n in fake if n.removesuffix(".weight") not in qc["quantized_linears"]}
    assert all(torch.equal(ours[n], fake[n]) and ours[n].dtype == fake[n].dtype for n in copied)


def test_symmetric_run_loads_through_transformers_default_path(work, tiny_llama_dir):
    """A symmetric (MLC-style) run is written as compressed-tensors symmetric (no zero point): plain
    `from_pretrained` (compressed modules, decompressed on the first forward) gives the fake-quant logits exactly."""
    from transformers import AutoModelForCausalLM

    fq = _calibrate(tiny_llama_dir, work / "fq_sym4", wbits=4, symmetric=True)
    out = export_checkpoint(fq, "compressed-tensors", work / "ct_sym4", progress=False)
    assert not any(n.endswith("weight_zero_point") for n in _tensors(out))
    ids = torch.randint(0, 500, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = _load_ct(out, dequantize=False)(ids).logits
        want = AutoModelForCausalLM.from_pretrained(fq, dtype=torch.float32)(ids).logits
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_sharded_checkpoint(work, tiny_llama_dir, dtype):
    """A fake-quant checkpoint saved in float16 / bfloat16 and sharded with an index is read through the index and
    written sharded; transformers loads it in that dtype with exactly the checkpoint's weights. Tokenizer, chat
    template and generation config are copied byte for byte."""
    from transformers import AutoModelForCausalLM

    fq32 = work / "fq_w4_f32"
    if not fq32.exists():
        _calibrate(tiny_llama_dir, fq32, wbits=4)
    half = work / f"fq_w4_{str(dtype).removeprefix('torch.')}"
    AutoModelForCausalLM.from_pretrained(fq32, dtype=dtype).save_pretrained(half, max_shard_size="200KB")
    for f in ("quant_config.json", "quant_params.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(fq32 / f, half / f)
    (half / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert (half / "model.safetensors.index.json").is_file()

    out = export_checkpoint(half, "compressed-tensors", work / f"{half.name}_ct", max_shard_bytes=300_000,
                            progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert all((out / f).is_file() for f in index["weight_map"].values())
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (out / f).read_bytes() == (half / f).read_bytes(), f
    stored = _tensors(out)
    assert stored["model.norm.weight"].dtype == dtype
    scale_dtype = torch.float32 if dtype == torch.bfloat16 else dtype  # bf16 cannot hold the fp16 scales
    assert stored["model.layers.0.mlp.up_proj.weight_scale"].dtype == scale_dtype

    got, want = _load_ct(out, dtype=dtype).state_dict(), _tensors(half)
    assert set(got) == set(want)
    for name, w in want.items():
        assert got[name].dtype == dtype and torch.equal(got[name], w), name


@pytest.mark.parametrize("bits", range(1, 9))
def test_bit_stream_is_the_librarys_pack_to_int32(bits, monkeypatch):
    """Our packer (shared with GPTQ) against compressed-tensors' pack_to_int32 / unpack_from_int32 at every width,
    both axes, lengths that end mid-word, and row chunks that split the array."""
    from compressed_tensors.compressors.pack_quantized.helpers import (
        pack_to_int32,
        unpack_from_int32,
    )

    from serving_formats import bitstream

    monkeypatch.setattr(bitstream, "ROWS_PER_CHUNK", 3)
    gen = torch.Generator().manual_seed(bits)
    for shape in [(5, 64), (7, 77), (4, 1)]:
        codes = torch.randint(0, 2 ** bits, shape, generator=gen, dtype=torch.int32)
        for dim in (0, 1):
            ours = bitstream.pack_stream(codes, bits, dim)
            signed = (codes - 2 ** (bits - 1)).to(torch.int8)
            assert torch.equal(ours, pack_to_int32(signed, bits, packed_dim=dim)), (shape, dim)
            assert torch.equal(unpack_from_int32(ours, bits, torch.Size(shape), packed_dim=dim), signed)
