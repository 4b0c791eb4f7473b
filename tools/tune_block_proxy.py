"""Fast proxy for tuning the recipes: block reconstruction error on held-out windows, a few blocks of the real model.

    python tools/tune_block_proxy.py --blocks 3,15,27 --wbits 2 --configs '[{"recipe": "lwc"}, {"recipe": "blockap"}]'

For each chosen block i of SmolLM2-135M, with X_i the float model's input to block i: train a copy of the block with
each configuration (CalibConfig overrides) on the quick bench's calibration windows (16 x 512 tokens of
sensesensibility + northangerabbey, seed 0), then measure MSE(F_i^q(X_i), F_i(X_i)) on validation windows of the
spare books emma + mansfieldpark (never on the evaluation books), relative to round-to-nearest's MSE. Prints and
appends to --out one JSON line per configuration: per-block ratios, their geometric mean, train seconds.
Whole-model validation perplexity (tools/tune_recipes.py) confirms what this ranks.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.windows import book_source
    from omniquant.block_train import schedule_factors, train_block
    from omniquant.blockwise import _quant_linears, start_clipping
    from omniquant.capture import block_forward, capture_block_inputs
    from omniquant.config import CalibConfig
    from omniquant.data import load_tokens, sample_windows
    from omniquant.models import get_adapter
    from omniquant.paths import CALIB_BOOKS, VAL_BOOKS
    from omniquant.quant.recipes import LR_GROUPS
    from omniquant.quant.spec import WeightQuantSpec
    from omniquant.real_model import prepare_smollm2

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", default="3,15,27")
    ap.add_argument("--wbits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--n-val", type=int, default=8)
    ap.add_argument("--configs", required=True, help="JSON list of CalibConfig overrides")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", type=Path, default=REPO / "build" / "tune" / "proxy.jsonl")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    configs = json.loads(args.configs)
    sel = sorted(int(b) for b in args.blocks.split(","))

    model_dir = prepare_smollm2()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    adapter = get_adapter(model.config.model_type)
    calib = sample_windows(load_tokens(tok, book_source(CALIB_BOOKS)), args.nsamples, args.seqlen, 0)
    val = sample_windows(load_tokens(tok, book_source(VAL_BOOKS), split="eval"), args.n_val, args.seqlen, 1)
    blocks = adapter.blocks(model)
    xc, kws = capture_block_inputs(model, blocks, calib)
    xv, _ = capture_block_inputs(model, blocks, val)
    spec = WeightQuantSpec(args.wbits, args.group_size)

    def run(block, x, kw):
        with torch.no_grad():
            return torch.cat([block_forward(block, x[j : j + 1], kw).float() for j in range(x.shape[0])])

    rows = [{"tag": args.tag, "cfg": c, "wbits": args.wbits, "group_size": args.group_size, "ratio": {},
             "seconds": {}} for c in configs]
    for i in range(sel[-1] + 1):
        block = blocks[i].requires_grad_(False)
        kw = kws[i]
        yc, yv = run(block, xc, kw), run(block, xv, kw)
        if i in sel:
            rtn = copy.deepcopy(block)
            base = CalibConfig(wbits=args.wbits, group_size=args.group_size, epochs=0, lwc=False)
            _quant_linears(rtn, adapter, spec, base)
            mse_rtn = float(torch.nn.functional.mse_loss(run(rtn, xv, kw), yv))
            for row, c in zip(rows, configs):
                over = {k: v for k, v in c.items() if not k.startswith("budget_")}
                cfg = CalibConfig(**{"wbits": args.wbits, "group_size": args.group_size, "epochs": 2,
                                     "nsamples": args.nsamples, "seqlen": args.seqlen, **over})
                # "budget_<group>": B -> that group's peak lr B / sum of the schedule factors (a total movement)
                f = schedule_factors(cfg.epochs * cfg.nsamples // cfg.batch_size, cfg.lr_schedule)
                for k, v in c.items():
                    if k.startswith("budget_"):
                        setattr(cfg, LR_GROUPS[k.removeprefix("budget_")].field, v / sum(f))
                b = copy.deepcopy(block)
                qls = _quant_linears(b, adapter, spec, cfg)
                start_clipping(b, qls, cfg, xc, kw)
                t0 = time.time()
                log = train_block(b, xc, yc, None, kw, cfg, None, f"block {i} {c}")
                row["seconds"][i] = round(time.time() - t0, 1)
                row["ratio"][i] = float(torch.nn.functional.mse_loss(run(b, xv, kw), yv)) / mse_rtn
                row.setdefault("best", {})[i] = (log.get("best") or {}).get("step")
                print(f"block {i} {c}: val mse / rtn {row['ratio'][i]:.4f} ({row['seconds'][i]} s, best step "
                      f"{row['best'][i]}, lr {log.get('lr')})", flush=True)
        xc, xv = yc, yv
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        for row in rows:
            row["geomean"] = math.exp(sum(math.log(r) for r in row["ratio"].values()) / len(row["ratio"]))
            row["load"] = os.getloadavg()[0]
            f.write(json.dumps(row) + "\n")
            print(f"{args.tag} {row['cfg']}: geomean {row['geomean']:.4f}  {row['ratio']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
