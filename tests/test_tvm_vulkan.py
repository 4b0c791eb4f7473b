"""Vulkan target on a real Vulkan device (Mesa lavapipe on a GPU-less machine).

Runs only where `make tvm-vulkan` has built the Vulkan TVM and a Vulkan device answers; skipped with the reason
otherwise (CI never builds it). The commands are the user's: `omniquant compile --target vulkan` and `omniquant
ppl/chat` with a Vulkan library, started from this interpreter, which hands them to the Vulkan TVM's interpreter.
References: the llvm library of the same packed dir (greedy tokens) and torch on the fake-quant checkpoint
(perplexity).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from mlc_schemes.tvm_vulkan import vulkan_python
from omniquant.paths import austen_dir

CALIB = austen_dir() / "sensesensibility.txt"
EVAL = austen_dir() / "prideprejudice.txt"
PROMPT = "It is a truth universally acknowledged, that a single man"


def test_device_flag_parsing_and_mismatch():
    from mlc_schemes.engine import parse_device
    from omniquant.errors import UserError

    assert parse_device(None, "vulkan") == ("vulkan", 0)
    assert parse_device("vulkan:2", "vulkan") == ("vulkan", 2)
    assert parse_device("Vulkan", "vulkan") == ("vulkan", 0)
    assert parse_device("cuda:1", "cuda") == ("cuda", 1)
    assert parse_device(None, "llvm") == ("cpu", 0) and parse_device("llvm", "llvm") == ("cpu", 0)
    with pytest.raises(UserError, match="compiled for llvm; it runs on cpu devices only"):
        parse_device("vulkan:0", "llvm")
    with pytest.raises(UserError, match="KIND:INDEX"):
        parse_device("vulkan:x", "vulkan")


def test_vulkan_library_without_vulkan_runtime_says_how_to_get_it():
    import tvm

    from mlc_schemes.engine import _device_for
    from mlc_schemes.tvm_vulkan import tvm_has_vulkan
    from omniquant.errors import UserError

    if tvm_has_vulkan(codegen=False):
        pytest.skip(f"this interpreter's TVM ({tvm.__file__}) has the Vulkan runtime")
    with pytest.raises(UserError, match="make tvm-vulkan"):
        _device_for({"target": "vulkan"}, "vulkan:0")


@pytest.fixture(scope="module")
def vk_python():
    py = vulkan_python()
    if py is None:
        pytest.skip("no Vulkan TVM here (build it with `make tvm-vulkan`)")
    r = subprocess.run([str(py), "-c", ("import tvm; d = tvm.vulkan(0); print(int(d.exist), d.device_name if d.exist "
                        "else '')")], check=False, capture_output=True, text=True, timeout=300)
    if r.returncode != 0 or not r.stdout.startswith("1"):
        pytest.skip(f"the Vulkan TVM sees no Vulkan device ({(r.stdout + r.stderr).strip()[-300:]})")
    print(f"Vulkan device: {r.stdout.split(' ', 1)[1].strip()}")
    return py


def _cli(*args, timeout=1800):
    env = {k: v for k, v in os.environ.items() if k != "OMNIQUANT_HANDED_TO_VULKAN_TVM"}
    r = subprocess.run([sys.executable, "-m", "omniquant", *map(str, args)], check=False, capture_output=True, text=True,
                       timeout=timeout, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _greedy(py, packed, lib, n=24) -> list[int]:
    """Greedy tokens of PROMPT through `lib`, computed by the Vulkan TVM's interpreter (it runs llvm libraries too)."""
    code = ("import json, sys; from mlc_schemes.engine import Engine; e = Engine(sys.argv[1], sys.argv[2]); "
            "ids = e.tokenizer(sys.argv[3])['input_ids']; print(json.dumps(e.generate_ids(ids, int(sys.argv[4]), "
            "stop_on_eos=False)))")
    r = subprocess.run([str(py), "-c", code, str(packed), str(lib), PROMPT, str(n)], check=False, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tiny_vk(vk_python, tmp_path_factory):
    """Tiny Llama, OmniQuant 1 epoch, w3a16g128asym; llvm and vulkan libraries (float32 compute) of one packed dir."""
    from mlc_schemes import pack_checkpoint
    from mlc_schemes.compile import compile_packed
    from omniquant.calibrate import calibrate_checkpoint
    from omniquant.tiny import make_tiny

    root = tmp_path_factory.mktemp("vulkan")
    make_tiny(root / "tiny", arch="llama")
    calibrate_checkpoint(root / "tiny", root / "fq", nsamples=4, seqlen=64, calib_data=str(CALIB), wbits=3,
                         group_size=128, epochs=1)
    pack_checkpoint(root / "fq", "w3a16g128asym", root / "packed", progress=False)
    compile_packed(root / "packed", "llvm", root / "cpu32.so", dtype="float32")
    _cli("compile", "--model", root / "packed", "--target", "vulkan", "--dtype", "float32", "--output",
         root / "vk32.so")
    return root


def test_vulkan_library_greedy_tokens_equal_llvm(vk_python, tiny_vk):
    meta = json.loads((tiny_vk / "vk32.so.json").read_text())
    assert meta["target"] == "vulkan" and meta["dtype"] == "float32"
    vk = _greedy(vk_python, tiny_vk / "packed", tiny_vk / "vk32.so")
    cpu = _greedy(vk_python, tiny_vk / "packed", tiny_vk / "cpu32.so")
    assert len(vk) == 24 and vk == cpu


def test_vulkan_perplexity_equals_torch(vk_python, tiny_vk, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from omniquant.data import load_tokens
    from omniquant.ppl import perplexity

    out = tmp_path / "ppl.json"
    _cli("ppl", "--engine", "tvm", "--model", tiny_vk / "packed", "--lib", tiny_vk / "vk32.so", "--device", "vulkan:0",
         "--data", EVAL, "--seqlen", 256, "--max-windows", 4, "--json", out)
    ppl_vk = json.loads(out.read_text())["ppl"]
    tokens = load_tokens(AutoTokenizer.from_pretrained(tiny_vk / "packed"), str(EVAL), split="eval")
    model = AutoModelForCausalLM.from_pretrained(tiny_vk / "fq", dtype=torch.float32).eval()
    ppl_torch = perplexity(model, tokens, 256, max_windows=4)
    assert abs(ppl_vk - ppl_torch) / ppl_torch <= 1e-3, (ppl_vk, ppl_torch)


@pytest.mark.slow
def test_real_smollm2_w4g128_runs_on_vulkan(vk_python, tmp_path):
    """The real model, float16 deployment library: compiles, runs, and reports speed and memory."""
    from omniquant.real_model import prepare_smollm2

    src = prepare_smollm2()
    _cli("calibrate", "--model", src, "--wbits", 4, "--group-size", 128, "--epochs", 0, "--no-lwc",
         "--output", tmp_path / "fq")
    _cli("pack", "--input", tmp_path / "fq", "--scheme", "w4a16g128asym", "--output", tmp_path / "packed")
    _cli("compile", "--model", tmp_path / "packed", "--target", "vulkan", "--output", tmp_path / "vk.so")
    out = tmp_path / "eval.json"
    _cli("chat", "--model", tmp_path / "packed", "--lib", tmp_path / "vk.so", "--evaluate", "--eval-prompt-len", 32,
         "--eval-gen-len", 32, "--json", out)
    res = json.loads(out.read_text())
    print("SmolLM2 W4g128 on Vulkan:", res)
    assert res["target"] == "vulkan" and res["decode_tok_per_s"] > 0 and res["prefill_tok_per_s"] > 0
    assert res["vulkan_device"] and res["vulkan_total_mib"] > 0
