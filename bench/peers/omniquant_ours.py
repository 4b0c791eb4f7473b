"""This project's methods through its public API: ``omniquant.calibrate.calibrate_checkpoint``.

    --method omniquant   LWC (learnable weight clipping), ``--epochs`` epochs at LWC learning rate ``--lwc-lr``
    --method rtn         plain round-to-nearest: epochs=0, lwc=False (same format, same padding rule; the weights
                         are quantized directly, see ``omniquant.blockwise.learns_nothing``)

Runs in the main environment. The calibration windows are drawn by ``calibrate_checkpoint`` itself from the same
text with the same seed; the script checks they equal the shared windows file before trusting the comparison.
"""

from __future__ import annotations

import json
import shutil
import sys

import torch
from common import load_model, load_windows, parse_args, quantizable_linears, save_result, window_loss


def _extra(ap):
    ap.add_argument("--method", choices=("omniquant", "rtn"), required=True)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lwc-lr", type=float, default=1e-2, help="LWC learning rate (calibrate_checkpoint's lwc_lr)")
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
    base = load_model(args.model)
    fp_loss0 = window_loss(base, windows[0])
    names = list(quantizable_linears(base))
    del base

    ckpt = args.out / "checkpoint"
    rtn = args.method == "rtn"
    calibrate_checkpoint(args.model, ckpt, overwrite=True, wbits=args.wbits, group_size=args.group_size,
                         symmetric=False, lwc=not rtn, epochs=0 if rtn else args.epochs, lwc_lr=args.lwc_lr,
                         nsamples=n, seqlen=seqlen, calib_data=args.calib_data, seed=args.seed)
    qc = json.loads((ckpt / "quant_config.json").read_text())
    state = load_file(str(ckpt / "model.safetensors"))
    weights = {name: state[f"{name}.weight"] for name in names}
    if not args.keep_checkpoint:
        shutil.rmtree(ckpt)
    what = "round-to-nearest, asymmetric integer zero" if rtn else f"LWC, {args.epochs} epochs, lr {args.lwc_lr:g}"
    padding = "in_features not divisible by the group size: ragged last group, edge padding (docs/formats.md)"
    save_result(args.out, weights, calib_seconds=qc["calibration"]["wall_time_s"], skipped={}, fp_loss0=fp_loss0,
                packages=("omniquant-mlc",), notes=f"{what}; {padding}",
                extra={"calibration_settings": {k: qc["calibration"].get(k) for k in
                                                ("epochs", "nsamples", "seqlen", "lwc", "let", "lwc_lr", "seed")}})


if __name__ == "__main__":
    main()
