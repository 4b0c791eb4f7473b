"""Benchmark harness (bench/): settings, storage accounting, shared windows, the weight-swapping evaluator, report."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

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


def test_readme_section_is_rewritten_from_json_between_markers(tmp_path):
    from bench.report import README_BEGIN, README_END, main

    data = _fake_results()
    data["run"] = {"date": "2026-11-23 10:00 UTC", "mode": "quick", "machine": "x86_64, 2 CPU cores",
                   "versions (main env)": "torch 2.13.0+cpu", "jobs (method processes at once)": 2}
    data["results"]["w3g128"]["gptq"] = {"ppl": 26.4, "bpw": 12.81, "n_skipped": 180, "n_linears": 210,
                                         "calib_seconds": 5.0, "peak_rss_mib": 1024.0, "notes": "",
                                         "versions": {"torch": "2.13.0", "llmcompressor": "0.14.0.1"}}
    data["methods"].append({"name": "gptq", "label": "GPTQ"})
    (tmp_path / "quality.json").write_text(json.dumps(data))
    head, tail = "# Title\n\nintro with | pipes |\n\n", "\n\n### Next section\nkept\n"
    readme = tmp_path / "README.md"
    readme.write_text(f"{head}{README_BEGIN}\n### Old\n| OmniQuant | 99.99 |\n{README_END}{tail}")
    argv = [str(tmp_path / "quality.json"), "--readme", str(readme), "--results-dir", str(tmp_path / "res")]
    assert main(argv) == 0
    text = readme.read_text()
    assert text.startswith(head + README_BEGIN) and text.endswith(README_END + tail)
    section = text[len(head):-len(tail)]
    assert "99.99" not in section and "### Old" not in section
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]] for ln in section.splitlines()
            if ln.startswith("| ") and ln.count("|") == 4}
    assert rows["OmniQuant"] == ["**29.50**", "45.00"] and rows["GPTQ"] == ["—", "26.40 (180/210 float)"]
    for fact in ("2026-11-23 10:00 UTC", "x86_64, 2 CPU cores", "torch 2.13.0+cpu", "llmcompressor 0.14.0.1",
                 "jobs (method processes at once): 2", "w3g128: NOT met", "GPTQ 180/210", "--quick"):
        assert fact in section, fact
    assert "[`res/quality-quick.md`](res/quality-quick.md)" in section
    assert json.loads((tmp_path / "res" / "quality-quick.json").read_text()) == data
    assert "| OmniQuant | w4g128 | 4.28 |" in (tmp_path / "res" / "quality-quick.md").read_text()
    assert main(argv) == 0 and readme.read_text() == text  # idempotent

    # a weight-activation run has its own files and section; the weight-only section stays as it is
    wa_begin, wa_end = README_BEGIN.replace(":begin", "-wa:begin"), README_END.replace(":end", "-wa:end")
    readme.write_text(text + f"\n{wa_begin}\nold\n{wa_end}\n")
    (tmp_path / "quality-wa.json").write_text(json.dumps({**data, "kind": "weight-act"}))
    assert main([str(tmp_path / "quality-wa.json"), *argv[1:]]) == 0
    both = readme.read_text()
    assert both.startswith(text) and "Weight-activation quantization against other quantizers" in both
    assert "\nold\n" not in both and (tmp_path / "res" / "quality-quick-wa.json").exists()

    readme.write_text("no markers\n")
    assert main([*argv[:4], str(tmp_path / "res2")]) == 2
    assert readme.read_text() == "no markers\n" and not (tmp_path / "res2").exists()


def test_schedule_keeps_jobs_slots_and_evaluates_in_the_freed_one():
    import threading
    import time

    from bench.quality import schedule

    def trial(jobs, durations):
        lock, running, started, seen = threading.Lock(), set(), [], {"max": 0, "during_done": []}

        def run_one(i):
            with lock:
                running.add(i)
                started.append(i)
                seen["max"] = max(seen["max"], len(running))
            time.sleep(durations[i])
            with lock:
                running.discard(i)
            return i * 10

        results = {}

        def on_done(i, r):
            assert threading.current_thread() is threading.main_thread()
            with lock:
                seen["during_done"].append(len(running))
            time.sleep(0.03)  # "evaluation": no new task may start meanwhile
            with lock:
                seen["during_done"].append(len(running))
            results[i] = r

        schedule(range(len(durations)), jobs, run_one, on_done)
        return started, seen, results

    durations = [0.25, 0.05, 0.05, 0.1, 0.05, 0.05]
    started, seen, results = trial(2, durations)
    assert results == {i: i * 10 for i in range(6)} and started == list(range(6))
    assert seen["max"] == 2 and max(seen["during_done"]) <= 1
    started, seen, results = trial(1, durations)
    assert started == list(range(6)) and seen["max"] == 1 and set(seen["during_done"]) == {0}
    assert len(results) == 6

    def boom(i):
        raise RuntimeError("method crashed the harness")

    with pytest.raises(RuntimeError, match="crashed"):
        schedule([0], 2, boom, lambda *a: None)


def test_jobs_and_threads_defaults(monkeypatch):
    from bench import quality
    from omniquant.errors import UserError

    monkeypatch.setattr(quality.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(quality.os, "getloadavg", lambda: (0.5, 0.5, 0.5))
    parse = lambda *a: quality.build_parser().parse_args(list(a))
    assert quality._jobs_and_threads(parse("--quick")) == (2, 2)
    assert quality._jobs_and_threads(parse("--quick", "--jobs", "1")) == (1, 4)
    assert quality._jobs_and_threads(parse()) == (1, 4)
    assert quality._jobs_and_threads(parse("--quick", "--jobs", "3", "--threads", "2")) == (3, 2)
    monkeypatch.setattr(quality.os, "getloadavg", lambda: (9.0, 9.0, 9.0))  # oversubscribed: 1 thread each
    assert quality._jobs_and_threads(parse("--quick")) == (2, 1)
    with pytest.raises(UserError, match="--jobs"):
        quality._jobs_and_threads(parse("--jobs", "0"))


def test_quick_budget_is_the_same_for_every_method_and_recipes_are_forwarded(tmp_path):
    from bench.methods import METHODS, OURS, runs
    from bench.quality import FULL, QUICK, _method_cmd

    # the same window-passes of 512 tokens per block: AutoRound iters x batch = OmniQuant epochs x windows
    assert QUICK.autoround_iters * QUICK.autoround_batch == QUICK.epochs * QUICK.n_calib
    assert QUICK.n_calib % QUICK.batch_size == 0 and QUICK.lwc_lr is None and FULL.lwc_lr is None
    s = parse_setting("w3g128")

    def cmd(name, cfg):
        c = _method_cmd(METHODS[name], tmp_path / "py", tmp_path / "m", tmp_path / "w", s, tmp_path / "o", cfg, "src")
        return dict(zip(c[2::2], c[3::2])) if name == "autoround" else c

    assert cmd("autoround", QUICK)["--iters"] == str(QUICK.autoround_iters)
    assert cmd("autoround", QUICK)["--batch-size"] == str(QUICK.autoround_batch)
    for name, recipe in zip(OURS, ("lwc", "lwc+round", "blockap")):
        c = cmd(name, QUICK)
        assert c[c.index("--recipe") + 1] == recipe and c[c.index("--batch-size") + 1] == str(QUICK.batch_size)
        assert c[c.index("--epochs") + 1] == str(QUICK.epochs) and "--lwc-lr" not in c
    # e2e rows: within the budget the e2e epoch replaces a block-loop epoch (32 window-passes), the "more" row adds it
    for name, epochs in (("omniquant-blockap-e2e", QUICK.epochs - 1), ("omniquant-blockap-e2e-more", QUICK.epochs)):
        c = cmd(name, QUICK)
        assert c[c.index("--e2e-epochs") + 1] == "1" and c[c.index("--epochs") + 1] == str(epochs), name
    assert "--e2e-epochs" not in cmd("omniquant-blockap", QUICK)
    # the split row: the same 1 + 1 epochs on the same windows, each trained as two pieces; at W2 only
    c = cmd("omniquant-blockap-e2e-split", QUICK)
    assert c[c.index("--window-split") + 1] == "2" and c[c.index("--epochs") + 1] == str(QUICK.epochs - 1)
    assert runs(METHODS["omniquant-blockap-e2e-split"], parse_setting("w2g64")) and not runs(
        METHODS["omniquant-blockap-e2e-split"], s)
    c = cmd("omniquant", dataclasses.replace(QUICK, lwc_lr=0.3))
    assert float(c[c.index("--lwc-lr") + 1]) == 0.3
    assert "--lwc-lr" not in cmd("rtn", QUICK) and "--epochs" not in cmd("omniquant-small", QUICK)
    assert "--cli-defaults" in cmd("omniquant-small", QUICK)
    assert runs(METHODS["omniquant-small"], s) and not runs(METHODS["omniquant-small"], parse_setting("w2g128"))


def test_goal_check_names_the_best_recipe_against_fully_quantized_peers():
    from bench.quality import goal_check

    def r(p, skipped=0, t=None):
        return {"ppl": p, "n_skipped": skipped, "n_linears": 210, "bpw": 2.3, "calib_seconds": t}

    results = {"w3g128": {"rtn": r(85.0), "omniquant": r(40.0, t=100), "omniquant-blockap": r(30.0, t=150),
                          "omniquant-small": r(50.0), "autoround": r(31.0, t=200), "gptq": r(25.0, skipped=180)},
               "w2g128": {"omniquant-round": r(60.0, t=250), "autoround": r(55.0, t=200)}}
    best, goal = goal_check([parse_setting("w3g128"), parse_setting("w2g128")], results, fp_ppl=20.0)
    assert best == {"w3g128": 30.0, "w2g128": 55.0}
    assert goal[0].startswith("w3g128: met (omniquant-blockap 30.00 < autoround 31.00)") and "gptq 25.00" in goal[0]
    assert goal[1] == "w2g128: NOT met (autoround 55.00 <= omniquant-round 60.00)"
    assert goal[2] == "W2g128 <= 2 x FP (40.00): NOT met (omniquant-round 60.00 = 3.00 x FP)"
    assert goal[3].endswith("w3g128 met (omniquant-blockap 150 s vs AutoRound 200 s), "
                            "w2g128 NOT met (omniquant-round 250 s vs AutoRound 200 s)")
    assert "w3g128: met (54%: RTN 85.00 -> 50.00, FP 20.00)" in goal[4]

    # a row with a larger budget is never the best of ours nor bold, and is named beside the W2 goal
    results["w2g128"]["omniquant-blockap-e2e-more"] = r(39.0, t=300)
    best, goal = goal_check([parse_setting("w3g128"), parse_setting("w2g128")], results, fp_ppl=20.0)
    assert best["w2g128"] == 55.0 and goal[1] == "w2g128: NOT met (autoround 55.00 <= omniquant-round 60.00)"
    assert goal[2].endswith("; with a larger budget met (omniquant-blockap-e2e-more 39.00 = 1.95 x FP)")


def test_merge_fills_in_the_rows_a_partial_run_lacks():
    from bench.report import merge_runs

    base = {**_fake_results(), "calibration": {"seed": 0}, "config": {"epochs": 2}, "kind": "weight-only",
            "run": {"date": "yesterday", "machine": "M1"}}
    new = {**base, "methods": [{"name": "omniquant-blockap", "label": "blockap"}],
           "results": {"w4g128": {"omniquant-blockap": {"ppl": 28.0, "n_skipped": 0, "n_linears": 210}}},
           "run": {"date": "today", "machine": "M2"}}
    m = merge_runs(base, new)
    from bench.methods import METHODS

    names = [x["name"] for x in m["methods"]]
    assert names == sorted(["rtn", "omniquant", "omniquant-blockap", "hqq"], key=list(METHODS).index)
    assert m["results"]["w4g128"]["omniquant-blockap"]["ppl"] == 28.0 and m["results"]["w4g128"]["rtn"]["ppl"] == 31.0
    assert m["results"]["w3g128"]["hqq"]["ppl"] == 44.0 and m["best"] == {"w4g128": 28.0, "w3g128": 44.0}
    old = ", ".join(n for n in names if n != "omniquant-blockap")
    assert m["run"]["date"] == "today" and f"{old} from the run of yesterday (M1" in m["run"]["merged"]
    with pytest.raises(ValueError, match="differ in config"):
        merge_runs(base, {**new, "config": {"epochs": 3}})


# A stand-in method script: the real contract (bench/peers/common.py), a perturbed copy of one linear, a sleep so
# that concurrent runs overlap, and a log line with its start/end time and thread count.
FAKE_METHOD = '''
import json, os, sys, time
sys.path.insert(0, os.path.join(os.environ["PYTHONPATH"], "bench", "peers"))
import torch
from common import load_inputs, parse_args, save_result

args = parse_args(lambda ap: (ap.add_argument("--calib-data"), ap.add_argument("--scale", type=float)))
t0 = time.time()
model, windows, fp_loss0 = load_inputs(args)
w = model.get_submodule("model.layers.0.self_attn.q_proj").weight.detach()
time.sleep(1.0)
save_result(args.out, {"model.layers.0.self_attn.q_proj": w * (1 + args.scale / args.wbits)}, calib_seconds=1.0,
            skipped={}, fp_loss0=fp_loss0)
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({"out": str(args.out), "start": t0, "end": time.time(),
                        "omp": os.environ.get("OMP_NUM_THREADS")}) + "\\n")
'''


def _overlaps(log) -> int:
    return sum(a["start"] < b["end"] and b["start"] < a["end"] for i, a in enumerate(log) for b in log[i + 1:])


@pytest.mark.slow
def test_quality_jobs_run_concurrently_with_the_same_results(tiny_llama_dir, tmp_path, monkeypatch):
    """Fake method scripts on the tiny model: --jobs 2 overlaps their processes, --jobs 1 does not, and both give the
    same results and report structure; the report records jobs and threads."""
    from bench import quality
    from bench.methods import Method

    script = tmp_path / "fake_method.py"
    script.write_text(FAKE_METHOD)
    fakes = {n: Method(n, f"Fake {n}", str(script), None, ("--scale", s), cost=c)
             for n, s, c in (("fa", "0.5", 1), ("fb", "0.2", 2))}
    monkeypatch.setattr(quality, "METHODS", fakes)
    reports, logs = {}, {}
    for jobs, threads in ((2, 1), (1, 2)):
        log = tmp_path / f"log{jobs}.jsonl"
        monkeypatch.setenv("FAKE_LOG", str(log))
        out = tmp_path / f"out{jobs}"
        argv = ["--quick", "--model", str(tiny_llama_dir), "--out", str(out), "--settings", "w4g128,w2g128",
                "--methods", "fa,fb", "--n-calib", "2", "--n-eval", "2", "--jobs", str(jobs), "--threads",
                str(threads)]
        assert quality.main(argv) == 0
        reports[jobs] = json.loads((out / "quality.json").read_text())
        logs[jobs] = [json.loads(ln) for ln in log.read_text().splitlines()]
        assert {e["omp"] for e in logs[jobs]} == {str(threads)} and len(logs[jobs]) == 4
        run = reports[jobs]["run"]
        assert run["jobs (method processes at once)"] == jobs and run["threads per process"] == threads
    assert _overlaps(logs[2]) >= 1 and _overlaps(logs[1]) == 0
    # the longest method (cost) starts first
    assert [e["out"].rsplit("/", 1)[-1] for e in sorted(logs[1], key=lambda e: e["start"])] == ["fb", "fb", "fa", "fa"]
    r1, r2 = reports[1]["results"], reports[2]["results"]
    assert list(r1) == list(r2) == ["w4g128", "w2g128"] and all(list(r1[s]) == ["fa", "fb"] for s in r1)
    for s in r1:
        for m in r1[s]:
            assert r1[s][m]["ppl"] == r2[s][m]["ppl"] and r1[s][m]["bpw"] == r2[s][m]["bpw"]
            assert r2[s][m]["torch_threads"] == 1 and r1[s][m]["torch_threads"] == 2
    assert len({r1[s][m]["ppl"] for s in r1 for m in r1[s]}) == 4  # the fakes really differ
    assert reports[1].keys() == reports[2].keys()


@pytest.mark.slow
def test_weight_act_scoring_equals_load_quantized(tiny_llama_dir, tiny_tok, calib_text, eval_text, tmp_path):
    """W4A4: our peer script (LWC + LET) -> weights + norm weights + LET offsets; the evaluator's act-quant scoring
    of those equals omniquant.load_quantized on the checkpoint the script kept (an independent loading path)."""
    import subprocess
    import sys

    from bench.evaluate import Evaluator
    from bench.methods import METHODS, runs
    from bench.quality import QUICK, REPO, _method_cmd
    from bench.windows import prepare_windows
    from omniquant import load_quantized

    s = parse_setting("w4a4")
    assert runs(METHODS["omniquant"], s) and runs(METHODS["smoothquant"], s) and not runs(METHODS["gptq"], s)
    assert not runs(METHODS["smoothquant"], parse_setting("w4g128"))
    t = prepare_windows(tiny_tok, tmp_path / "w.safetensors", n_calib=4, calib_seqlen=64, n_eval=3, eval_seqlen=48,
                        seed=0)
    cmd = _method_cmd(METHODS["omniquant"], Path(sys.executable), tiny_llama_dir, tmp_path / "w.safetensors", s,
                      tmp_path / "out", QUICK, calib_text) + ["--keep-checkpoint"]
    assert cmd[cmd.index("--abits") + 1] == "4" and cmd[cmd.index("--epochs") + 1] == str(QUICK.wa_epochs)
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["abits"] == 4 and meta["other_params_changed"]  # LET rescaled the norms
    tokens = t["eval"]
    ev = Evaluator(tiny_llama_dir, tokens, 48)
    linears = [n for n, m in ev.model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    wa = ev.perplexity_with(tmp_path / "out" / "weights.safetensors", 4, linears,
                            tmp_path / "out" / "act_offsets.safetensors")
    ref = _reference_ppl(load_quantized(tmp_path / "out" / "checkpoint"), tokens, 48)
    assert wa == pytest.approx(ref, rel=1e-5)
    weights_only = ev.perplexity_with(tmp_path / "out" / "weights.safetensors")
    assert weights_only != pytest.approx(wa, rel=1e-4)  # the activation quantizers did act, and are off again
    assert ev.perplexity_with(tmp_path / "out" / "weights.safetensors") == weights_only


@pytest.mark.slow
def test_our_recipe_rows_run_end_to_end(tiny_llama_dir, tmp_path):
    """The real method script (bench/peers/omniquant_ours.py) for RTN, a recipe and the CLI-defaults row on the tiny
    model: each scored, with its recipe, batch size and learning rates in the report."""
    from bench import quality

    out = tmp_path / "out"
    argv = ["--quick", "--model", str(tiny_llama_dir), "--out", str(out), "--settings", "w3g128",
            "--methods", "rtn,omniquant-blockap,omniquant-small", "--n-calib", "2", "--n-eval", "1", "--epochs", "1",
            "--jobs", "1", "--threads", "1"]
    assert quality.main(argv) == 0
    rep = json.loads((out / "quality.json").read_text())
    rs = rep["results"]["w3g128"]
    assert set(rs) == {"rtn", "omniquant-blockap", "omniquant-small"}
    assert all(math.isfinite(r["ppl"]) for r in rs.values()), rs
    assert rs["omniquant-blockap"]["notes"].startswith("blockap, 1 epochs x 2 x 512 tokens, batch 1, linear lr: scale")
    assert rs["omniquant-small"]["notes"].startswith("lwc, 2 epochs x 16 x 256 tokens, batch 1, linear lr: lwc")
    assert rs["rtn"]["notes"].startswith("round-to-nearest")
    meta = json.loads((out / "quality-quick" / "w3g128" / "omniquant-blockap" / "meta.json").read_text())
    assert set(meta["learning_rates"]) == {"scale", "zero", "weight"}
    assert rep["best_recipe"]["w3g128"] == "omniquant-blockap"  # the only one of OURS here


def test_reuse_skips_a_result_whose_weights_are_gone(tmp_path):
    """A result folder with matching settings but without its weights (cleaned up) is not reused: scoring would
    read the weights; --report-only reports it missing instead of crashing."""
    import json
    from dataclasses import asdict

    from bench.methods import METHODS, parse_setting
    from bench.quality import QUICK, run_method

    method, setting = METHODS["gptq"], parse_setting("w4g128")
    out = tmp_path / setting.name / method.name
    out.mkdir(parents=True)
    signature = json.loads(json.dumps({"cfg": asdict(QUICK), "method": asdict(method), "setting": asdict(setting)}))
    (out / "signature.json").write_text(json.dumps(signature))
    (out / "meta.json").write_text(json.dumps({"calib_seconds": 1.0}))
    args = (method, setting, QUICK, tmp_path / "model", tmp_path / "windows", tmp_path, "calib", 10)
    assert run_method(*args, reuse=True, report_only=True) == {"missing": True}
    (out / "weights.safetensors").write_bytes(b"")
    assert run_method(*args, reuse=True, report_only=True) == {"calib_seconds": 1.0}
