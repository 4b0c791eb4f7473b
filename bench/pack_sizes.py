"""Bytes on disk and bits/weight of packed models, plus the packed-vs-fake-quant perplexity check (not a test).

For each `FAKEQUANT_DIR:SCHEME` pair: pack (into --workdir), measure the files, rebuild the HF model with
`mlc_schemes.unpack_to_hf` and compare its perplexity with the fake-quant checkpoint's on local text.
Prints a markdown table and writes JSON.

    python bench/pack_sizes.py build/pack/real_rtn_w3g128:w3a16g128asym build/pack/real_rtn_w4g128:w4a16g128asym \
        --workdir build/pack --json build/pack/pack_sizes.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from omniquant.paths import EVAL_BOOKS, austen_dir


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pairs", nargs="+", metavar="FAKEQUANT_DIR:SCHEME")
    p.add_argument("--workdir", default="build/pack", help="where the packed directories go (reused if present)")
    p.add_argument("--json", default="build/pack/pack_sizes.json")
    p.add_argument("--eval-data", default=str(austen_dir() / EVAL_BOOKS[0]))
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=4, help="perplexity windows (0: skip the perplexity check)")
    args = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mlc_schemes import pack_checkpoint, unpack_to_hf
    from mlc_schemes.size_report import size_report
    from omniquant.data import load_tokens
    from omniquant.ppl import perplexity

    torch.set_num_threads(2)
    rows = []
    for pair in args.pairs:
        fq, scheme = pair.rsplit(":", 1)
        out = Path(args.workdir) / f"{Path(fq).name}-{scheme}"
        t0 = time.perf_counter()
        if not out.exists():
            pack_checkpoint(fq, scheme, out)
        pack_s = time.perf_counter() - t0
        row = {"fakequant": fq, "packed": str(out), "pack_s": round(pack_s, 2), **size_report(out)}
        if args.max_windows:
            tokens = load_tokens(AutoTokenizer.from_pretrained(out), args.eval_data, split="eval")
            ref = AutoModelForCausalLM.from_pretrained(fq, dtype=torch.float32).eval()
            row["ppl_fakequant"] = perplexity(ref, tokens, args.seqlen, args.max_windows)
            del ref
            row["ppl_packed"] = perplexity(unpack_to_hf(out), tokens, args.seqlen, args.max_windows)
            row["ppl_rel_diff"] = abs(row["ppl_packed"] / row["ppl_fakequant"] - 1)
        rows.append(row)

    print("\n| scheme | linears bits/weight (measured) | nominal | x nominal | whole model bits/param | files on disk "
          "| ppl fake-quant | ppl packed |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ppl = (f"{r['ppl_fakequant']:.3f} | {r['ppl_packed']:.3f}" if "ppl_packed" in r else "- | -")
        print(f"| {r['scheme']} | {r['linear_bits_per_weight']:.4f} | {r['nominal_bits_per_weight']:.2f} "
              f"| {r['linear_vs_nominal']:.4f} | {r['bits_per_param']:.3f} "
              f"| {r['dir_bytes'] / 2**20:.2f} MiB | {ppl} |")
    result = {"machine": platform.machine(), "python": platform.python_version(), "seqlen": args.seqlen,
              "max_windows": args.max_windows, "eval_data": args.eval_data, "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2, default=lambda x: None if isinstance(x, float) and
                                          math.isnan(x) else str(x)))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
