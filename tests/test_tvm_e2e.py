"""End to end on CPU: tiny model -> calibrate -> pack -> compile (llvm, float32 compute) -> run on TVM.

References are the torch fake-quant model of the same checkpoint. The packed format stores dense tensors
(embeddings, norms, lm_head) in float16, so token-level checks use the checkpoint with exactly those tensors rounded
to float16 (the function the packed dir represents); perplexity is compared with the unmodified checkpoint.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
torch = pytest.importorskip("torch")

from omniquant.errors import UserError
from omniquant.paths import austen_dir

CALIB = austen_dir() / "sensesensibility.txt"
EVAL = austen_dir() / "prideprejudice.txt"


def _chain(root, arch, scheme, **calib):
    from mlc_schemes import pack_checkpoint
    from mlc_schemes.compile import compile_packed
    from omniquant.calibrate import calibrate_checkpoint
    from omniquant.tiny import make_tiny

    make_tiny(root / "tiny", arch=arch)
    calibrate_checkpoint(root / "tiny", root / "fq", nsamples=4, seqlen=64, calib_data=str(CALIB), **calib)
    pack_checkpoint(root / "fq", scheme, root / "packed", progress=False)
    compile_packed(root / "packed", "llvm", root / "lib32.so", dtype="float32")
    return root


@pytest.fixture(scope="module")
def llama_w3(tmp_path_factory):
    """Llama tiny, OmniQuant LWC 1 epoch, w3a16g128asym (K = 192, 320: partial groups, padded words)."""
    return _chain(tmp_path_factory.mktemp("tvm_llama"), "llama", "w3a16g128asym", wbits=3, group_size=128, epochs=1)


@pytest.fixture(scope="module")
def llama_w4(tmp_path_factory):
    """Llama tiny, RTN w4a16g128asym: groups of whole words."""
    return _chain(tmp_path_factory.mktemp("tvm_llama_w4"), "llama", "w4a16g128asym", wbits=4, group_size=128,
                  epochs=0, lwc=False)


def _torch_model(fq_dir, packed_dir, round_dense=True):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fq_dir, dtype=torch.float32).eval()
    if round_dense:
        quantized = set(json.loads((packed_dir / "mlc-chat-config.json").read_text())["quantization_config"][
            "quantized_linears"])
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.rsplit(".", 1)[0] not in quantized:
                    p.copy_(p.half().float())
    return model


def _greedy_torch(model, ids, n):
    out = []
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            out.append(nxt)
            seq.append(nxt)
    return out


def test_logits_and_greedy_tokens_match_torch(llama_w3):
    from mlc_schemes.engine import Engine

    root = llama_w3
    eng = Engine(root / "packed", root / "lib32.so")
    model = _torch_model(root / "fq", root / "packed")
    ids = eng.tokenizer("It is a truth universally acknowledged, that a single man")["input_ids"]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    got = eng.prefill(ids, all_logits=True)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    eng.reset()
    tokens = eng.generate_ids(ids, 24, stop_on_eos=False)
    assert tokens == _greedy_torch(model, ids, 24)
    # Decode steps (M = 1, fused dequant-GEMV) give the same logits as a full prefill of the sequence.
    eng.reset()
    full = eng.prefill(ids + tokens[:-1], all_logits=True)
    eng.reset()
    eng.prefill(ids)
    step = [eng.decode(t) for t in tokens[:5]]
    np.testing.assert_allclose(np.stack(step), full[len(ids):len(ids) + 5], atol=1e-4 * np.abs(full).max())
    # A prompt continued by a second prefill (chat turn, chunked prompt): the new tokens attend to cached pages.
    eng.reset()
    eng.prefill(ids[:5])
    np.testing.assert_allclose(eng.prefill(ids[5:], all_logits=True), ref[5:], atol=1e-4 * np.abs(ref).max())


def test_perplexity_matches_torch_fake_quant(llama_w3):
    from transformers import AutoTokenizer

    from mlc_schemes.engine import tvm_perplexity
    from omniquant.data import load_tokens
    from omniquant.ppl import perplexity

    root = llama_w3
    tok = AutoTokenizer.from_pretrained(root / "packed")
    tokens = load_tokens(tok, str(EVAL))[: 4 * 256]
    ppl_tvm = tvm_perplexity(root / "packed", root / "lib32.so", tokens, 256)
    ppl_torch = perplexity(_torch_model(root / "fq", root / "packed", round_dense=False), tokens, 256)
    assert abs(ppl_tvm - ppl_torch) / ppl_torch <= 1e-3, (ppl_tvm, ppl_torch)


@pytest.mark.parametrize("tied", [False, True])
def test_quantized_embedding_and_lm_head(llama_w3, tmp_path, tied):
    """`pack --embedding-scheme`: the embedding (and the untied lm_head, or the tied one through the embedding) run
    packed in TVM and match torch on the unpacked model."""
    from safetensors.torch import load_file, save_file

    from mlc_schemes import pack_checkpoint
    from mlc_schemes.compile import compile_packed
    from mlc_schemes.engine import Engine
    from mlc_schemes.unpack import unpack_to_hf

    fq = tmp_path / "fq"
    shutil.copytree(llama_w3 / "fq", fq)
    if tied:
        cfg = json.loads((fq / "config.json").read_text())
        (fq / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
        state = load_file(str(fq / "model.safetensors"))
        del state["lm_head.weight"]
        save_file(state, str(fq / "model.safetensors"), metadata={"format": "pt"})
    pack_checkpoint(fq, "w3a16g128asym", tmp_path / "packed", progress=False, embedding_scheme="w4a16g32asym")
    chat = json.loads((tmp_path / "packed" / "mlc-chat-config.json").read_text())
    names = set(chat["quantization_config"]["embedding_quantization"]["quantized_tensors"])
    assert names == ({"model.embed_tokens"} if tied else {"model.embed_tokens", "lm_head"})
    compile_packed(tmp_path / "packed", "llvm", tmp_path / "lib.so", dtype="float32")
    eng = Engine(tmp_path / "packed", tmp_path / "lib.so")
    model = unpack_to_hf(tmp_path / "packed")
    emb = model.model.embed_tokens.weight.detach().numpy()
    assert len(np.unique(emb[0])) <= 6 * 16  # 4-bit codes: at most 16 levels per group of 32 (192 = 6 groups)
    ids = list(range(3, 60))
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(eng.prefill(ids, all_logits=True), ref, atol=1e-4 * np.abs(ref).max())
    np.testing.assert_allclose(eng.decode(7), model(torch.tensor([ids + [7]])).logits[0, -1].detach().numpy(),
                               atol=1e-4 * np.abs(ref).max())


def test_qwen2_biases_and_mlc_symmetric_scheme(tmp_path):
    """Qwen2 (q/k/v biases) with MLC's symmetric q4f16_1 (no stored zero), RTN calibration."""
    from mlc_schemes.engine import Engine

    root = _chain(tmp_path, "qwen2", "q4f16_1", wbits=4, group_size=32, symmetric=True, epochs=0, lwc=False)
    eng = Engine(root / "packed", root / "lib32.so")
    model = _torch_model(root / "fq", root / "packed")
    ids = list(range(3, 40))
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(eng.prefill(ids, all_logits=True), ref, atol=1e-4 * np.abs(ref).max())


def test_fingerprint_mismatch_is_rejected(llama_w3, tmp_path):
    from mlc_schemes.engine import Engine

    other = tmp_path / "packed"
    shutil.copytree(llama_w3 / "packed", other)
    cfg = json.loads((other / "mlc-chat-config.json").read_text())
    cfg["model_config"]["rms_norm_eps"] = 1e-3  # another model as far as the library is concerned
    (other / "mlc-chat-config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="fingerprint"):
        Engine(other, llama_w3 / "lib32.so")


def test_cached_library_is_stale_after_model_code_changes(llama_w3, monkeypatch):
    """Reuse (bench.decode, chat --random-weights) needs the same weights fingerprint AND the same model code."""
    from mlc_schemes import compile as comp

    pm = comp.read_packed_model(llama_w3 / "packed")
    assert comp.read_library_meta_if_fits(llama_w3 / "lib32.so", pm) is not None
    monkeypatch.setattr(comp, "model_code_hash", lambda: "0" * 64)
    assert comp.read_library_meta_if_fits(llama_w3 / "lib32.so", pm) is None


def test_missing_weights_and_long_prompt(llama_w3, tmp_path):
    from mlc_schemes.engine import Engine

    broken = tmp_path / "packed"
    shutil.copytree(llama_w3 / "packed", broken)
    for shard in broken.glob("params_shard_*.bin"):
        shard.unlink()
    with pytest.raises(UserError, match="missing weight shard"):
        Engine(broken, llama_w3 / "lib32.so")
    with pytest.raises(UserError, match="does not exist"):
        Engine(llama_w3 / "packed", tmp_path / "nope.so")
    eng = Engine(llama_w3 / "packed", llama_w3 / "lib32.so")
    with pytest.raises(UserError, match="context window"):
        eng.generate_ids([5] * eng.context, 4)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "omniquant", *args], check=False, capture_output=True, text=True,
                          timeout=600)


def test_cli_evaluate_writes_json(llama_w3, tmp_path):
    out = tmp_path / "eval.json"
    r = _cli("chat", "--model", str(llama_w3 / "packed"), "--lib", str(llama_w3 / "lib32.so"), "--evaluate",
             "--eval-prompt-len", "32", "--eval-gen-len", "16", "--json", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["prefill_tok_per_s"] > 0 and res["decode_tok_per_s"] > 0 and res["peak_rss_mib"] > 0
    # resident memory split: the weights are the packed tensors (fp16 dense ones widened: float32 library)
    split = res["rss_split_mib"]
    assert set(split) == {"runtime", "weights", "kv_cache", "activations"}
    packed = sum(f.stat().st_size for f in (llama_w3 / "packed").glob("params_shard_*.bin")) / 2**20
    assert packed <= split["weights"] <= 2 * packed
    assert split["runtime"] > 0 and 0 <= split["kv_cache"] < res["kv_cache_reserved_mib"]  # 47 of 1,024+ tokens
    assert abs(sum(split.values()) - res["peak_rss_mib"]) <= 0.5


def test_vulkan_without_vulkan_tvm_and_unknown_targets_fail_cleanly(llama_w3, tmp_path, monkeypatch):
    # as on a machine where `make tvm-vulkan` never ran: nothing to hand over to, PyPI TVM has no Vulkan codegen
    monkeypatch.setenv("OMNIQUANT_TVM_VULKAN_PYTHON", str(tmp_path / "no-such-python"))
    r = _cli("compile", "--model", str(llama_w3 / "packed"), "--target", "vulkan", "--output", str(tmp_path / "v.so"))
    assert r.returncode == 2 and "no Vulkan support" in r.stderr and "make tvm-vulkan" in r.stderr, r.stderr
    r = _cli("compile", "--model", str(llama_w3 / "packed"), "--target", "rocm", "--output", str(tmp_path / "r.so"))
    assert r.returncode == 2 and "unsupported target" in r.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("target,suffix", [("cuda", ".so"), ("metal", ".tar"), ("webgpu", ".tar")])
def test_gpu_targets_compile_without_gpu(llama_w3, tmp_path, target, suffix):
    """GPU libraries build on this GPU-less machine; in a subprocess, so a dlight segfault cannot kill pytest."""
    lib = tmp_path / f"model{suffix}"
    r = _cli("compile", "--model", str(llama_w3 / "packed"), "--target", target, "--output", str(lib), "--no-aot")
    assert r.returncode == 0, r.stderr[-2000:]
    assert lib.stat().st_size > 0
    meta = json.loads((tmp_path / f"model{suffix}.json").read_text())
    assert meta["target"] == target and meta["dtype"] == "float16"
    if target == "cuda" and not tvm.cuda(0).exist:
        from mlc_schemes.engine import Engine

        with pytest.raises(UserError, match="no CUDA GPU"):
            Engine(llama_w3 / "packed", lib)


def _host_has(*flags):
    from pathlib import Path

    line = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    return set(flags) <= set(line.split(":", 1)[-1].split())


@pytest.mark.skipif(not _host_has("avx2", "fma", "f16c"), reason="needs an AVX2 CPU to run the AVX2 build")
def test_avx2_build_gives_the_native_tokens_and_perplexity(llama_w3, tmp_path):
    """`compile --isa avx2` (mcpu x86-64-v3, 8-lane schedules): same greedy tokens and perplexity (within 1e-3 of
    torch) as the native build; on an AVX-512 host that compares the 8- and 16-lane schedules."""
    from transformers import AutoTokenizer

    from mlc_schemes.compile import compile_packed
    from mlc_schemes.engine import Engine, tvm_perplexity
    from omniquant.data import load_tokens
    from omniquant.ppl import perplexity

    root = llama_w3
    meta = compile_packed(root / "packed", "llvm", tmp_path / "avx2.so", dtype="float32", isa="avx2")
    assert meta["cpu_isa"] == {"mcpu": "x86-64-v3", "isa": "avx2", "lanes": 8}
    ids = list(range(5, 40))
    native, avx2 = Engine(root / "packed", root / "lib32.so"), Engine(root / "packed", tmp_path / "avx2.so")
    assert avx2.generate_ids(ids, 20, stop_on_eos=False) == native.generate_ids(ids, 20, stop_on_eos=False)
    tokens = load_tokens(AutoTokenizer.from_pretrained(root / "packed"), str(EVAL))[: 4 * 256]
    ppl_torch = perplexity(_torch_model(root / "fq", root / "packed", round_dense=False), tokens, 256)
    for lib in (root / "lib32.so", tmp_path / "avx2.so"):
        ppl = tvm_perplexity(root / "packed", lib, tokens, 256)
        assert abs(ppl - ppl_torch) / ppl_torch <= 1e-3, (lib.name, ppl, ppl_torch)


def test_avx512_build_compiles_and_runs_only_where_supported(llama_w3, tmp_path):
    """An AVX-512 library (x86-64-v4) builds on any machine; the engine runs it on an AVX-512 CPU and refuses it
    elsewhere with a message instead of dying of an illegal instruction."""
    from mlc_schemes.compile import compile_packed
    from mlc_schemes.engine import Engine

    meta = compile_packed(llama_w3 / "packed", "llvm", tmp_path / "avx512.so", dtype="float32", isa="avx512")
    assert meta["cpu_isa"] == {"mcpu": "x86-64-v4", "isa": "avx512", "lanes": 16}
    if _host_has("avx512f", "avx512bw", "avx512dq", "avx512vl"):
        ref = Engine(llama_w3 / "packed", llama_w3 / "lib32.so").prefill(list(range(3, 30)), all_logits=True)
        got = Engine(llama_w3 / "packed", tmp_path / "avx512.so").prefill(list(range(3, 30)), all_logits=True)
        np.testing.assert_allclose(got, ref, atol=1e-4 * np.abs(ref).max())
    else:
        with pytest.raises(UserError, match="lacks avx512"):
            Engine(llama_w3 / "packed", tmp_path / "avx512.so")
    r = _cli("compile", "--model", str(llama_w3 / "packed"), "--isa", "pentium-nine", "--output",
             str(tmp_path / "x.so"))
    assert r.returncode == 2 and "unknown --isa" in r.stderr


def _misalign_first_shard(packed, out):
    """Copy of a packed dir whose first shard starts with 4 extra bytes: its records lose their 64-byte alignment."""
    import hashlib

    shutil.copytree(packed, out)
    index = json.loads((out / "tensor-cache.json").read_text())
    shard = index["records"][0]
    path = out / shard["dataPath"]
    data = b"\0" * 4 + path.read_bytes()
    path.write_bytes(data)
    shard.update(nbytes=len(data), md5sum=hashlib.md5(data).hexdigest())
    for rec in shard["records"]:
        rec["byteOffset"] += 4
    (out / "tensor-cache.json").write_text(json.dumps(index))
    return out


@pytest.mark.parametrize("chain", ["llama_w4", "llama_w3"])
def test_zero_copy_load_equals_copy_load(chain, request, tmp_path):
    """Parameters mapped from the shards (zero-copy views) give the same logits, bit for bit, as parameters
    copied into fresh tensors; misaligned records fall back to copies and give them too. The exact CPU library
    row-interleaves its packed linears (`param_interleave`): always copied (W3); a W4 library with --int8-dot keeps
    MLC's layout for its int8-dot linears, which are mapped."""
    import tvm_ffi

    from mlc_schemes.compile import compile_packed
    from mlc_schemes.engine import Engine
    from mlc_schemes.model.isa import host_isa

    root = request.getfixturevalue(chain)
    lib = root / "lib32.so"
    if chain == "llama_w4":
        if not host_isa().int8_dot:
            pytest.skip("the int8-dot library needs AVX2")
        lib = tmp_path / "int8.so"
        compile_packed(root / "packed", "llvm", lib, dtype="float32", int8_dot=True)
    ids = list(range(3, 45))
    copied = Engine(root / "packed", lib, zero_copy=False)
    mapped = Engine(root / "packed", lib)
    assert copied.memory["weights_mapped_mib"] == 0
    # mapped: exactly the unfused, 64-byte aligned records the library takes as stored (in this float32 library the
    # packed codes / scales / zeros; float16 dense tensors are widened, fused q/k/v and gate/up concatenated)
    index = json.loads((root / "packed" / "tensor-cache.json").read_text())
    records = {r["name"]: r for shard in index["records"] for r in shard["records"]}
    concat, interleaved = mapped.meta["param_concat"], mapped.meta["param_interleave"]
    assert bool(interleaved) == (chain == "llama_w3")
    expect = sum(records[n]["nbytes"] for n in mapped.meta["param_names"]
                 if n not in concat and n not in interleaved and n.endswith((".q_weight", ".q_scale", ".q_zero"))
                 and records[n]["byteOffset"] % 64 == 0)
    assert mapped.memory["weights_mapped_mib"] * 2**20 == expect
    assert mapped.memory["weights_mib"] == copied.memory["weights_mib"]
    ref = copied.prefill(ids, all_logits=True)
    np.testing.assert_array_equal(mapped.prefill(ids, all_logits=True), ref)
    np.testing.assert_array_equal(mapped.decode(7), copied.decode(7))
    if interleaved:  # the exact library's linears are copied (the mapped total above leaves them out)
        return
    # a mapped parameter is a view of the file: its bytes are the record's, its memory not a TVM allocation
    assert expect > 0
    name = next(n for n in mapped.meta["param_names"] if n.endswith("o_proj.q_weight"))
    t = mapped.params[mapped.meta["param_names"].index(name)]
    assert isinstance(t, tvm_ffi.Tensor) and t.data_ptr() % 64 == 0
    shifted = Engine(_misalign_first_shard(root / "packed", tmp_path / "shifted"), lib)
    assert shifted.memory["weights_mapped_mib"] < mapped.memory["weights_mapped_mib"]  # first shard's records copied
    np.testing.assert_array_equal(shifted.prefill(ids, all_logits=True), ref)


def test_float16_checkpoint_through_tvm_matches_unpacked_grid(llama_w3, tmp_path):
    """A float16 source (docs/formats.md §1): its fake-quant checkpoint stores round_fp16((q - z) * s); the packed
    codes run in the float32 library compute the exact grid (q - z) * s, as unpack_to_hf does (tolerance as for the
    float32 chain: kernel summation order); torch on the float16 checkpoint differs from both by one float16
    rounding of each weight."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mlc_schemes import pack_checkpoint
    from mlc_schemes.engine import tvm_perplexity
    from mlc_schemes.unpack import unpack_to_hf
    from omniquant.calibrate import calibrate_checkpoint
    from omniquant.data import load_tokens
    from omniquant.ppl import perplexity

    src = tmp_path / "fp16"
    AutoModelForCausalLM.from_pretrained(llama_w3 / "tiny", dtype=torch.float16).save_pretrained(src)
    for f in (llama_w3 / "tiny").glob("tokenizer*"):
        shutil.copy(f, src / f.name)
    fq = calibrate_checkpoint(src, tmp_path / "fq", wbits=3, group_size=128, epochs=0, lwc=False)
    packed = pack_checkpoint(fq, "w3a16g128asym", tmp_path / "packed", progress=False)
    tokens = load_tokens(AutoTokenizer.from_pretrained(packed), str(EVAL))[: 4 * 256]
    ppl_tvm = tvm_perplexity(packed, llama_w3 / "lib32.so", tokens, 256)  # same shapes and scheme: same library
    ppl_grid = perplexity(unpack_to_hf(packed), tokens, 256)
    ppl_ckpt = perplexity(AutoModelForCausalLM.from_pretrained(fq, dtype=torch.float32).eval(), tokens, 256)
    assert abs(ppl_tvm - ppl_grid) / ppl_grid <= 1e-3, (ppl_tvm, ppl_grid)
    assert abs(ppl_ckpt - ppl_grid) / ppl_grid <= 1e-2, (ppl_ckpt, ppl_grid)
