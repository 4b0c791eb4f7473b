"""auto-round 0.16 peer: SignRound (signed-gradient rounding + min/max tuning), weight-only, asymmetric, group
``--group-size``; ``--iters`` steps per block of ``--batch-size`` windows (200 x 8 = its default recipe, 50 x 8 its
"light" recipe; the quick benchmark gives it OmniQuant's quick budget, 32 x 1).

Scored in memory right after ``quantize()``: the tuned weights are fake-quantized in place there (its "fake" export
writes the original weights). A linear auto-round leaves unchanged (it may skip, without an error, shapes it does
not support) is detected by comparing with the original weights and recorded as skipped (float). Measured with
0.16.1 on SmolLM2 at w4g128: it quantizes the 576-wide inputs too, with a 64-wide last group per row.
"""

from __future__ import annotations

import torch
from common import Timer, load_inputs, parse_args, quantizable_linears, save_result


def _extra(ap):
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)


def main() -> None:
    args = parse_args(_extra)
    from auto_round import AutoRound
    from transformers import AutoTokenizer

    model, windows, fp_loss0 = load_inputs(args)
    tok = AutoTokenizer.from_pretrained(str(args.model))
    n, seqlen = windows.shape
    linears = quantizable_linears(model)
    original = {name: m.weight.detach().clone() for name, m in linears.items()}
    timer = Timer()
    with timer():
        ar = AutoRound(model, tokenizer=tok, bits=args.wbits, group_size=args.group_size, sym=False,
                       dataset=[windows[i : i + 1] for i in range(n)], nsamples=n, seqlen=seqlen,
                       iters=args.iters, batch_size=min(args.batch_size, n), seed=args.seed, device_map="cpu",
                       enable_torch_compile=False)
        qmodel, _ = ar.quantize()
    weights, skipped = {}, {}
    qlinears = dict(qmodel.named_modules())
    for name in linears:
        w = qlinears[name].weight.detach().float()
        if torch.equal(w, original[name]):
            skipped[name] = (f"left unquantized by auto-round (in_features {linears[name].in_features} "
                             f"% group {args.group_size} = {linears[name].in_features % args.group_size})")
        else:
            weights[name] = w
    notes = f"SignRound, {args.iters} iters/block, batch {min(args.batch_size, n)}"
    if skipped:
        notes += f"; {len(skipped)} of {len(linears)} linears silently left float (in_features not divisible)"
    save_result(args.out, weights, calib_seconds=timer.seconds, skipped=skipped, fp_loss0=fp_loss0,
                packages=("auto-round",), notes=notes,
                extra={"iters": args.iters, "batch_size": min(args.batch_size, n)})


if __name__ == "__main__":
    main()
