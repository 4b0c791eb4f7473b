"""This project's methods through its public API: ``omniquant.calibrate.calibrate_checkpoint``.

    --method omniquant   the block loop with ``--recipe`` (lwc, lwc+round, blockap), ``--epochs`` passes over the
                         windows in mini-batches of ``--batch-size``, budget-aware learning rates (``--lwc-lr``
                         etc. override the peak rate); ``--cli-defaults``: a new user's run, ``omniquant calibrate``
                         defaults with 2 epochs x 16 windows of 256 tokens drawn by itself (seed 2), not the shared
                         windows
    --method rtn         plain round-to-nearest: epochs=0, lwc=False (same format, same padding rule; the weights
                         are quantized directly, see ``omniquant.blockwise.learns_nothing``)

With ``--abits`` < 16 (W4A4, W6A6: per-channel weights) OmniQuant is LWC + LET and RTN stays RTN; both write the
norm weights LET changed and LET's activation offsets, and the evaluator quantizes the linears' inputs.

Runs in the main environment. The calibration windows are drawn by ``calibrate_checkpoint`` itself from the same
text with the same seed; the script checks they equal the shared windows file before trusting the comparison.
"""

from __future__ import annotations

import json
import shutil
import sys

import torch
from common import (
    load_model,
    load_windows,
    parse_args,
    quantizable_linears,
    save_result,
    snapshot_params,
    window_loss,
)


def _extra(ap):
    ap.add_argument("--method", choices=("omniquant", "rtn"), required=True)
    ap.add_argument("--recipe", default="lwc")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=1, help="calibration windows per optimizer step")
    ap.add_argument("--e2e-epochs", type=int, default=0,
                    help="end-to-end scale tuning passes after the block loop (each pass: one more window-pass per "
                         "window through every block)")
    ap.add_argument("--window-split", type=int, default=1,
                    help="train each shared window as this many consecutive pieces (same tokens, more steps)")
    ap.add_argument("--lwc-lr", type=float, default=None, help="peak LWC learning rate (default: budget-aware)")
    ap.add_argument("--cli-defaults", action="store_true",
                    help="omniquant calibrate's defaults at the small budget 2 epochs x 16 x 256 (own windows)")
    ap.add_argument("--calib-data", required=True, help="the text source the windows were cut from")
    ap.add_argument("--keep-checkpoint", action="store_true")


def main() -> None:
    args = parse_args(_extra)
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from omniquant.calibrate import calibrate_checkpoint
    from omniquant.data import load_tokens, sample_windows

    windows = load_windows(args.windows)
    n, seqlen = windows.shape
    tok = AutoTokenizer.from_pretrained(str(args.model))
    ours = sample_windows(load_tokens(tok, args.calib_data), n, seqlen, args.seed)
    if not torch.equal(ours, windows):
        sys.exit("calibrate_checkpoint would draw different calibration windows than the shared file")
    settings = {"recipe": args.recipe, "epochs": args.epochs, "batch_size": args.batch_size, "lwc_lr": args.lwc_lr,
                "e2e_epochs": args.e2e_epochs, "window_split": args.window_split, "nsamples": n, "seqlen": seqlen,
                "seed": args.seed}
    if args.cli_defaults:  # only what a new user types: everything else (seed, batch size, rates) is the default
        settings = {"recipe": args.recipe, "epochs": 2, "nsamples": 16, "seqlen": 256}
    base = load_model(args.model)
    fp_loss0 = window_loss(base, windows[0])
    names = list(quantizable_linears(base))
    before = snapshot_params(base)
    del base

    ckpt = args.out / "checkpoint"
    rtn = args.method == "rtn"
    weight_act = args.abits < 16  # OmniQuant's W4A4 / W6A6 recipe: LWC + LET, per-token activations
    if rtn:
        settings.update(epochs=0, recipe="lwc")
    calibrate_checkpoint(args.model, ckpt, overwrite=True, wbits=args.wbits, group_size=args.group_size,
                         symmetric=False, lwc=not rtn, let=weight_act and not rtn, abits=args.abits,
                         calib_data=args.calib_data, **settings)
    qc = json.loads((ckpt / "quant_config.json").read_text())
    state = load_file(str(ckpt / "model.safetensors"))
    weights = {name: state[f"{name}.weight"] for name in names}
    # LET folds its scales into the norms: they travel with the linears (tied lm_head / embedding never change)
    other = {k: v for k, v in state.items()
             if k not in {f"{n}.weight" for n in names} and k in before and not torch.equal(v, before[k])}
    offsets_file = ckpt / "act_params.safetensors"
    offsets = {k.removesuffix(".act_offset"): v for k, v in load_file(str(offsets_file)).items()} \
        if offsets_file.exists() else None
    if not args.keep_checkpoint:
        shutil.rmtree(ckpt)
    cal = qc["calibration"]
    first_lr = next((b["lr"] for b in cal.get("block_log") or [] if b.get("lr")), {})  # RTN: none
    lrs = ", ".join(f"{g} {lr:.3g}" for g, lr in first_lr.items())
    pieces = cal.get("window_split", 1)
    split = f" (each window trained as {pieces} pieces of {cal['seqlen'] // pieces})" if pieces > 1 else ""
    what = "round-to-nearest, asymmetric integer zero" if rtn else (
        f"{qc['recipe']}{' + LET' if weight_act else ''}, {cal['epochs']} epochs x {cal['nsamples']} x "
        f"{cal['seqlen']} tokens{split}, batch {cal['batch_size']}, {cal['lr_schedule']} lr: {lrs}, clipping from "
        f"{qc.get('clip_init', 'minmax')}"
        + (" (CLI defaults, own windows, seed 2)" if args.cli_defaults else ""))
    if weight_act:
        what += f"; activations {args.abits}-bit per-token dynamic asymmetric"
    padding = "in_features not divisible by the group size: ragged last group, edge padding (docs/formats.md)"
    save_result(args.out, weights, calib_seconds=qc["calibration"]["wall_time_s"], skipped={}, fp_loss0=fp_loss0,
                packages=("omniquant-mlc",), notes=f"{what}; {padding}", other_params=other, act_offsets=offsets,
                extra={"abits": args.abits,
                       "calibration_settings": {k: qc["calibration"].get(k) for k in
                                                ("recipe", "epochs", "nsamples", "seqlen", "window_split",
                                                 "batch_size", "lwc",
                                                 "let", "lwc_lr", "lr_schedule", "keep_best", "seed")},
                       "learning_rates": first_lr or None})


if __name__ == "__main__":
    main()
