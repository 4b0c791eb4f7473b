"""Tune the block loop's recipes on a validation split of the calibration text, never on the evaluation windows.

    python tools/tune_recipes.py --wbits 3 --recipe lwc --batch-size 4 [--lwc-lr 0.4 ...] --tag NAME

Calibrates the real model (SmolLM2-135M, `omniquant prepare-real`) on the quick bench's calibration windows
(16 x 512 tokens of sensesensibility + northangerabbey, seed 0: the same windows as `bench.quality --quick`) and
scores the result on validation windows of the spare books emma.txt + mansfieldpark.txt (seeded random 512-token
windows), which neither calibration nor the bench's evaluation (prideprejudice + persuasion) reads. Appends one
JSON line per run to --out (settings, validation perplexity, calibration wall time, per-block logs' summary).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    import torch
    from transformers import AutoTokenizer

    from bench.windows import book_source
    from omniquant.calibrate import quantize_in_memory
    from omniquant.calibrate_cli import add_arguments
    from omniquant.config import CalibConfig
    from omniquant.data import load_tokens, sample_windows
    from omniquant.paths import CALIB_BOOKS, VAL_BOOKS
    from omniquant.ppl import perplexity
    from omniquant.real_model import prepare_smollm2

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap)
    for a in ap._actions:  # --model / --output have defaults here
        a.required = False
    ap.set_defaults(model="smollm2", output="-", calib_data=book_source(CALIB_BOOKS), nsamples=16, seqlen=512,
                    epochs=2, seed=0)
    ap.add_argument("--n-val", type=int, default=10, help="validation windows (default: %(default)s)")
    ap.add_argument("--val-seqlen", type=int, default=512)
    ap.add_argument("--fp", action="store_true", help="score the float model instead")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", type=Path, default=REPO / "build" / "tune" / "results.jsonl")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model_dir = prepare_smollm2()
    cfg = CalibConfig(**{k: getattr(args, k) for k in CalibConfig().to_dict()})
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    val = sample_windows(load_tokens(tok, book_source(VAL_BOOKS), split="eval"), args.n_val, args.val_seqlen,
                         seed=1).reshape(-1)
    if args.fp:
        from transformers import AutoModelForCausalLM

        fp = perplexity(AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32), val, args.val_seqlen)
        print(f"FP32 val ppl {fp:.3f}")
        return 0
    state = REPO / "build" / "tune" / f"state-{os.getpid()}"
    t0 = time.time()
    model, _, qc, _ = quantize_in_memory(model_dir, cfg, state)
    wall = time.time() - t0
    import shutil

    shutil.rmtree(state, ignore_errors=True)
    ppl = perplexity(model, val, args.val_seqlen)
    logs = qc["calibration"]["block_log"]
    row = {"tag": args.tag, "val_ppl": ppl, "calib_s": qc["calibration"]["wall_time_s"], "total_s": wall,
           "load": os.getloadavg()[0], "cfg": {k: v for k, v in cfg.to_dict().items()
                                               if k not in ("calib_data", "act_stats", "device")},
           "lr": logs[0].get("lr"), "e2e": qc["calibration"].get("e2e"), "nan_blocks": qc["calibration"]["nan_blocks"],
           "best_steps": [b.get("best", {}).get("step") for b in logs],
           "final_loss": [b["epoch_loss"][-1] if b["epoch_loss"] else None for b in logs]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"{args.tag} val ppl {ppl:.3f}  calib {row['calib_s']:.0f} s  lr {row['lr']}  best {row['best_steps']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
