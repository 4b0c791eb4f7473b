"""Weight-activation OmniQuant (LWC + LET) end to end on tiny models: it beats round-to-nearest, the export
reproduces the in-memory model, activation statistics are right and cached, and bad input fails cleanly."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from omniquant.config import CalibConfig
from omniquant.errors import UserError

SEQLEN = 64


def _cfg(calib_text, **kw) -> CalibConfig:
    base = {"wbits": 4, "group_size": -1, "nsamples": 8, "seqlen": SEQLEN, "epochs": 4, "calib_data": calib_text,
            "seed": 2}
    base.update(kw)
    return CalibConfig(**base)


def _eval_tokens(model_dir, eval_text):
    from transformers import AutoTokenizer

    from omniquant.data import load_tokens

    return load_tokens(AutoTokenizer.from_pretrained(model_dir), eval_text, split="eval")[: 8 * SEQLEN]


def _ppl(model, tokens) -> float:
    from omniquant.ppl import perplexity

    return perplexity(model, tokens, SEQLEN)


RUNS = {
    # name: settings; RTN = round-to-nearest weights, no LWC/LET, same dynamic activation quantization
    "rtn_w4a4": {"abits": 4, "kv_bits": 4, "lwc": False, "epochs": 0},
    "lwc_w4a4": {"abits": 4, "kv_bits": 4},
    "omni_w4a4": {"abits": 4, "kv_bits": 4, "let": True},
    "rtn_w6a6": {"wbits": 6, "abits": 6, "lwc": False, "epochs": 0},
    "omni_w6a6": {"wbits": 6, "abits": 6, "let": True},
}


OUTLIER_CHANNELS, OUTLIER_GAIN = (5, 40, 77, 150), 60.0


@pytest.fixture(scope="module")
def outlier_llama_dir(trained_llama_dir, tmp_path_factory):
    """The trained tiny Llama with a few activation outlier channels, as real LLMs have: norm weights × 60 on 4
    channels and the consuming q/k/v/gate/up columns ÷ 60 (v rows × 60, o columns ÷ 60 for the attention output).
    An exact rescaling, so full precision is unchanged (checked); only quantization gets hard, as it does on real
    models (the tiny model trained for 80 steps has no outliers and loses < 0.5% perplexity at W4A4)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(trained_llama_dir, dtype=torch.float32).eval()
    ids = torch.randint(3, 500, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        c, g = list(OUTLIER_CHANNELS), OUTLIER_GAIN
        for layer in model.model.layers:
            for norm, lins in ((layer.input_layernorm, ("q_proj", "k_proj", "v_proj")),
                               (layer.post_attention_layernorm, ("gate_proj", "up_proj"))):
                norm.weight[c] *= g
                for n in lins:
                    lin = getattr(layer.self_attn if n.endswith(("q_proj", "k_proj", "v_proj")) else layer.mlp, n)
                    lin.weight[:, c] /= g
            # attention output channels (v rows, o columns): KV channel j feeds o columns of its query group
            kv = [ch % layer.self_attn.v_proj.out_features for ch in c]
            layer.self_attn.v_proj.weight[kv] *= g
            rep = layer.self_attn.num_key_value_groups
            d = layer.self_attn.head_dim
            cols = [(j // d) * rep * d + r * d + j % d for j in kv for r in range(rep)]
            layer.self_attn.o_proj.weight[:, cols] /= g
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)
    out = tmp_path_factory.mktemp("tiny") / "llama_outliers"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(trained_llama_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def runs(outlier_llama_dir, calib_text, eval_text, tmp_path_factory):
    """In-memory quantized models of the trained tiny Llama (GQA, with outliers) for every setting in RUNS."""
    from omniquant.calibrate import quantize_in_memory

    trained_llama_dir = outlier_llama_dir
    tokens = _eval_tokens(trained_llama_dir, eval_text)
    out = {}
    base = tmp_path_factory.mktemp("runs")
    for name, kw in RUNS.items():
        cfg = _cfg(calib_text, **kw)
        model, tok, qc, qp = quantize_in_memory(trained_llama_dir, cfg, base / f"{name}.state")
        out[name] = {"model": model, "tok": tok, "qc": qc, "qp": qp, "ppl": _ppl(model, tokens), "cfg": cfg}
    out["tokens"] = tokens
    out["dir"] = trained_llama_dir
    return out


def test_calibrated_beats_rtn_on_held_text(runs):
    ppl = {k: v["ppl"] for k, v in runs.items() if k in RUNS}
    print("held-text perplexity", {k: round(v, 3) for k, v in ppl.items()})
    assert all(math.isfinite(p) for p in ppl.values()), ppl
    assert ppl["omni_w4a4"] < ppl["rtn_w4a4"], ppl
    assert ppl["omni_w6a6"] < ppl["rtn_w6a6"], ppl


def test_let_plus_lwc_lowers_block_mse_vs_lwc_alone_at_w4a4(runs):
    """Block 0 sees the same (embedding) input in every model, so its output error compares the methods directly."""
    from transformers import AutoModelForCausalLM

    from omniquant.capture import block_forward, capture_block_inputs

    fp = AutoModelForCausalLM.from_pretrained(runs["dir"], dtype=torch.float32).eval()
    windows = runs["tokens"].reshape(-1, SEQLEN)
    x, block_kwargs = capture_block_inputs(fp, fp.model.layers, windows)
    kwargs = block_kwargs[0]
    with torch.no_grad():
        ref = block_forward(fp.model.layers[0], x, kwargs)
        mse = {name: float(torch.mean((block_forward(runs[name]["model"].model.layers[0], x, kwargs) - ref) ** 2))
               for name in ("lwc_w4a4", "omni_w4a4")}
    print("block 0 output MSE", mse)
    assert mse["omni_w4a4"] < mse["lwc_w4a4"], mse


def test_export_and_load_quantized_reproduce_in_memory_ppl(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    import omniquant
    from omniquant.export import save_fakequant

    r = runs["omni_w4a4"]
    out = save_fakequant(r["model"], r["tok"], r["qp"], r["qc"], tmp_path / "ck")
    qc = json.loads((out / "quant_config.json").read_text())
    assert qc["abits"] == 4 and qc["kv_bits"] == 4 and qc["let"] is True
    assert qc["act_quant"]["offsets_file"] == "act_params.safetensors" and (out / "act_params.safetensors").exists()
    loaded = omniquant.load_quantized(out)
    assert _ppl(loaded, runs["tokens"]) == pytest.approx(r["ppl"], rel=1e-6)
    # a plain transformers load is the same network without activation quantizers: it differs, and is finite
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    p_plain = _ppl(plain, runs["tokens"])
    assert math.isfinite(p_plain) and abs(p_plain - r["ppl"]) > 1e-3 * r["ppl"]
    # missing offsets file: clear error instead of a silently different model
    (out / "act_params.safetensors").unlink()
    with pytest.raises(UserError, match="act_params.safetensors"):
        omniquant.load_quantized(out)


def test_act_stats_values_and_cache(tiny_llama_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from omniquant import act_stats
    from omniquant.capture import block_forward, capture_block_inputs
    from omniquant.models import get_adapter

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    adapter = get_adapter("llama")
    windows = torch.randint(3, 500, (3, 32), generator=torch.Generator().manual_seed(0))
    stats = act_stats.collect(model, adapter, windows)
    # independent: q_proj of block 0 reads input_layernorm(embeddings)
    with torch.no_grad():
        y = model.model.layers[0].input_layernorm(model.model.embed_tokens(windows))  # [3, 32, H]
    torch.testing.assert_close(stats["model.layers.0.self_attn.q_proj.act_scales"], y.abs().amax((0, 1)))
    torch.testing.assert_close(stats["model.layers.0.self_attn.q_proj.act_shifts"],
                               ((y.amax(1) + y.amin(1)) / 2).mean(0))
    assert stats["model.layers.1.self_attn.o_proj.act_scales"].shape == (192,)
    # block by block (what calibration does: block i observed while it runs on the fp stream) == whole model
    path = tmp_path / "stats.safetensors"
    blocks = act_stats.BlockStats(path, model, adapter, windows)
    x, kwargs = capture_block_inputs(model, model.model.layers, windows)
    with torch.no_grad():
        for i, block in enumerate(model.model.layers):
            with blocks.observe(block, i):
                x = torch.cat([block_forward(block, x[j:j + 1], kwargs[i]) for j in range(3)])
    blocks.save()
    assert blocks.stats.keys() == stats.keys() and all(torch.equal(blocks.stats[k], stats[k]) for k in stats)
    # same windows: reused from the file, not recomputed
    again = act_stats.BlockStats(path, model, adapter, windows)
    assert again.loaded and all(torch.equal(again.stats[k], stats[k]) for k in stats)
    monkeypatch.setattr(act_stats._Accumulator, "attach", lambda *a: pytest.fail("statistics recomputed"))
    with again.observe(model.model.layers[0], 0):
        pass
    # other windows: collected again
    assert not act_stats.BlockStats(path, model, adapter, windows[:2]).loaded


def test_act_stats_from_another_model_is_rejected(tiny_llama_dir, tiny_opt_dir, tmp_path):
    from safetensors.torch import save_file
    from safetensors.torch import save_file as save
    from transformers import AutoModelForCausalLM

    from omniquant import act_stats
    from omniquant.cli import main
    from omniquant.models import get_adapter

    opt = AutoModelForCausalLM.from_pretrained(tiny_opt_dir, dtype=torch.float32).eval()
    windows = torch.randint(3, 500, (1, 16))
    save(act_stats.collect(opt, get_adapter("opt"), windows), str(tmp_path / "opt.safetensors"))
    rc = main(["calibrate", "--model", str(tiny_llama_dir), "--output", str(tmp_path / "out"), "--let", "--abits", "4",
               "--act-stats", str(tmp_path / "opt.safetensors"), "--nsamples", "1", "--seqlen", "16", "--epochs", "0",
               "--calib-data", str(tiny_llama_dir / "tokenizer.json")])
    assert rc == 2 and not (tmp_path / "out").exists()
    # right names, wrong channel count
    llama = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    ad = get_adapter("llama")
    good = act_stats.collect(llama, ad, windows)
    bad = {k: (v[:100] if "layers.1.mlp.down_proj" in k else v) for k, v in good.items()}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(UserError, match=r"down_proj.*shape \(100,\).*320 input channels"):
        act_stats.BlockStats(tmp_path / "bad.safetensors", llama, ad, windows, given=True)


def test_let_without_sites_is_rejected(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from omniquant.models import get_adapter
    from omniquant.weight_act import setup_weight_act

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    no_sites = dataclasses.replace(get_adapter("llama"), name="nolet", let_sites=())
    with pytest.raises(UserError, match="nolet adapter declares no LET sites"):
        setup_weight_act(model, no_sites, torch.zeros(1, 8, dtype=torch.long), CalibConfig(let=True, abits=4),
                         tmp_path / "x.state")


def test_nan_during_let_training_restores_finite_parameters(tiny_llama_dir, calib_text, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from omniquant.blockwise import RunState, calibrate_model
    from omniquant.data import load_tokens, sample_windows
    from omniquant.models import get_adapter
    from omniquant.weight_act import setup_weight_act

    cfg = CalibConfig(wbits=4, abits=4, let=True, group_size=64, nsamples=2, seqlen=32, epochs=2, calib_data=calib_text)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    adapter = get_adapter("llama")
    windows = sample_windows(load_tokens(AutoTokenizer.from_pretrained(tiny_llama_dir), calib_text), 2, 32, 0)
    wa = setup_weight_act(model, adapter, windows, cfg, tmp_path / "r.state")
    make_let, act_factory = wa.make_let, wa.act_factory
    calls = {"n": 0}

    def poisoned(block, qlinears, cfg_, i):
        let = make_let(block, qlinears, cfg_, i)
        if i == 1:
            orig = let.apply_temporary

            def apply():
                calls["n"] += 1
                if calls["n"] == 3:  # third forward of block 1: the LET scale blows up
                    with torch.no_grad():
                        let.qkv_scale[0] = float("nan")
                orig()
            let.apply_temporary = apply
        return let

    state = RunState(tmp_path / "r.state", cfg, str(tiny_llama_dir))
    result = calibrate_model(model, adapter, windows, cfg, state, make_let=poisoned, act_quantizer_factory=act_factory,
                             fp_observer=wa.observe)
    assert result.block_log[0]["nan"] is None
    assert result.block_log[1]["nan"] == {"epoch": 1, "step": 0}
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with torch.no_grad():
        assert torch.isfinite(model(windows[:1]).logits).all()


def test_killed_let_run_resumes_bit_exact(tiny_opt_dir, calib_text, tmp_path):
    """OPT W4A4 + LET (learned shifts): killed after block 0 and resumed == uninterrupted, bit for bit."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    args = [sys.executable, "-m", "omniquant", "calibrate", "--model", str(tiny_opt_dir), "--calib-data", calib_text,
            "--wbits", "4", "--abits", "4", "--let", "--group-size", "64", "--nsamples", "2", "--seqlen", "32",
            "--epochs", "2"]
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    from omniquant.calibrate import (
        calibrate_checkpoint,  # the uninterrupted reference runs in-process
    )

    calibrate_checkpoint(tiny_opt_dir, tmp_path / "full", wbits=4, abits=4, let=True, group_size=64, nsamples=2,
                         seqlen=32, epochs=2, calib_data=calib_text)
    killed = subprocess.run(args + ["--output", str(tmp_path / "resumed")],
                            env={**env, "OMNIQUANT_TEST_KILL_AFTER_BLOCK": "0"}, capture_output=True, check=False)
    assert killed.returncode != 0 and not (tmp_path / "resumed").exists()
    subprocess.run(args + ["--output", str(tmp_path / "resumed"), "--resume", str(tmp_path / "resumed.state")],
                   check=True, env=env, capture_output=True)
    for f in ("model.safetensors", "quant_params.safetensors", "act_params.safetensors"):
        a, b = load_file(str(tmp_path / "full" / f)), load_file(str(tmp_path / "resumed" / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
