"""Benchmark harness (bench/): settings, storage accounting, shared windows, the weight-swapping evaluator, report."""

from __future__ import annotations

import math

import pytest
import torch

from bench.methods import linear_bits, parse_setting


def test_parse_setting():
    s = parse_setting("w3g128")
    assert (s.wbits, s.group_size, s.abits, s.weight_act) == (3, 128, 16, False)
    wa = parse_setting("w4a4")
    assert (wa.wbits, wa.group_size, wa.abits, wa.weight_act) == (4, -1, 4, True)
    for bad in ("w3", "3g128", "w3g", "w4a4g128"):
        with pytest.raises(ValueError):
            parse_setting(bad)


@pytest.mark.parametrize("n,k,bits,gs", [(576, 576, 4, 128), (1536, 576, 3, 128), (576, 1536, 2, 128), (7, 5, 3, -1)])
def test_linear_bits_counts_ragged_last_group(n, k, bits, gs):
    groups = 1 if gs == -1 else math.ceil(k / gs)  # 576 = 4.5 x 128 -> 5 groups per row
    assert linear_bits(n, k, bits, gs) == n * k * bits + n * groups * (16 + 16)


@pytest.fixture(scope="module")
def tiny_tok(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def test_windows_are_seeded_disjoint_and_cut_from_the_right_books(tiny_tok, tmp_path, calib_text, eval_text):
    from safetensors.torch import load_file

    from bench.windows import prepare_windows
    from omniquant.data import load_tokens

    t = prepare_windows(tiny_tok, tmp_path / "w.safetensors", n_calib=4, calib_seqlen=64, n_eval=3, eval_seqlen=32,
                        seed=5)
    on_disk = load_file(str(tmp_path / "w.safetensors"))
    assert torch.equal(on_disk["calib"], t["calib"]) and torch.equal(on_disk["eval"], t["eval"])
    assert t["calib"].shape == (4, 64) and t["eval"].shape == (96,)
    calib_stream = load_tokens(tiny_tok, calib_text)
    eval_stream = load_tokens(tiny_tok, eval_text, split="eval")
    assert torch.equal(t["eval"], eval_stream[:96])
    cal_views, ev_views = calib_stream.unfold(0, 64, 1), eval_stream.unfold(0, 64, 1)
    for w in t["calib"]:
        assert (cal_views == w).all(dim=1).any()  # a real window of the calibration books
        assert not (ev_views == w).all(dim=1).any()  # never one of the evaluation books
    again = prepare_windows(tiny_tok, tmp_path / "w2.safetensors", n_calib=4, calib_seqlen=64, n_eval=3,
                            eval_seqlen=32, seed=5)
    other = prepare_windows(tiny_tok, tmp_path / "w3.safetensors", n_calib=4, calib_seqlen=64, n_eval=3,
                            eval_seqlen=32, seed=6)
    assert torch.equal(again["calib"], t["calib"]) and not torch.equal(other["calib"], t["calib"])


def _reference_ppl(model, tokens, seqlen) -> float:
    """float64 mean NLL over non-overlapping windows, exp."""
    nlls = []
    with torch.no_grad():
        for w in tokens.reshape(-1, seqlen):
            logp = torch.log_softmax(model(w[None]).logits[0].double(), dim=-1)
            nlls.append(-logp[torch.arange(seqlen - 1), w[1:]].mean())
    return math.exp(float(torch.stack(nlls).mean()))


def test_evaluator_scores_swapped_weights_and_restores(tiny_llama_dir, tiny_tok, eval_text, tmp_path):
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from bench.evaluate import Evaluator
    from omniquant.data import load_tokens

    tokens = load_tokens(tiny_tok, eval_text, split="eval")[: 3 * 48]
    ev = Evaluator(tiny_llama_dir, tokens, 48)
    base = ev.perplexity()
    ref_model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    assert base == pytest.approx(_reference_ppl(ref_model, tokens, 48), rel=1e-5)

    g = torch.Generator().manual_seed(0)
    new = {}
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        w = ref_model.get_parameter(name).detach()
        new[name] = (w + 0.05 * torch.randn(w.shape, generator=g)).contiguous()
    save_file(new, str(tmp_path / "weights.safetensors"))
    swapped = ev.perplexity_with(tmp_path / "weights.safetensors")
    with torch.no_grad():
        for name, t in new.items():
            ref_model.get_parameter(name).copy_(t)
    assert swapped == pytest.approx(_reference_ppl(ref_model, tokens, 48), rel=1e-5)
    assert swapped != pytest.approx(base, rel=1e-6)
    assert ev.perplexity() == base  # original weights restored bit for bit

    save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(3, 3)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="shape"):
        ev.perplexity_with(tmp_path / "bad.safetensors")
    save_file({"no.such.weight": torch.zeros(3, 3)}, str(tmp_path / "unknown.safetensors"))
    with pytest.raises(ValueError, match="not in the model"):
        ev.perplexity_with(tmp_path / "unknown.safetensors")
    assert ev.perplexity() == base


def _fake_results():
    ok = lambda ppl, bpw: {"ppl": ppl, "bpw": bpw, "n_skipped": 0, "n_linears": 210, "calib_seconds": 12.0,
                           "peak_rss_mib": 2048.0, "notes": ""}
    return {
        "model": {"name": "M"}, "eval": {"description": "2 x 512"}, "settings": ["w4g128", "w3g128"],
        "methods": [{"name": "rtn", "label": "RTN"}, {"name": "omniquant", "label": "OmniQuant"},
                    {"name": "hqq", "label": "HQQ"}],
        "fp_ppl": 25.0,
        "results": {"w4g128": {"rtn": ok(31.0, 4.28), "omniquant": ok(29.5, 4.28), "hqq": {"error": "exit 1: boom"}},
                    "w3g128": {"rtn": ok(70.0, 3.28), "omniquant": ok(45.0, 3.28), "hqq": ok(44.0, 3.28)}},
        "best": {"w4g128": 29.5, "w3g128": 44.0}, "run": {"date": "today"}, "goal": "w3g128: NOT met",
    }


def test_report_table_marks_best_and_failures(tmp_path):
    from bench.report import markdown

    md = markdown(_fake_results())
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in md.splitlines()
            if line.startswith("| ") and line.count("|") == 4}
    assert rows["RTN"] == ["31.00", "70.00"]
    assert rows["OmniQuant"] == ["**29.50**", "45.00"]
    assert rows["HQQ"] == ["failed", "**44.00**"]
    assert rows["FP32 (unquantized)"] == ["25.00", "25.00"]
    assert "failed: exit 1: boom" in md and "NOT met" in md


def test_report_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    from bench.report import plot

    assert plot(_fake_results(), tmp_path / "q.png")
    assert (tmp_path / "q.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
