"""HQQ (half-quadratic quantization, hqq 0.2.8): calibration-free weight-only quantization of each linear.

Uses hqq's own ``Quantizer.quantize`` with the settings of its ``hqq_base_quant_config`` (axis=1, optimize=True,
round_zero only at 4 bits). hqq groups the *flattened* weight in runs of ``group_size`` (``W.reshape(-1, gs)``): when
in_features is not a multiple of gs (SmolLM2: 576 = 4.5 x 128) groups straddle two rows. The calibration windows
are read only for the shared loading check.
"""

from __future__ import annotations

import torch
from common import Timer, load_inputs, parse_args, quantizable_linears, save_result
from hqq.core.quantize import Quantizer


def main() -> None:
    args = parse_args()
    model, _windows, fp_loss0 = load_inputs(args)
    timer, weights, straddling = Timer(), {}, 0
    with timer():
        for name, lin in quantizable_linears(model).items():
            w = lin.weight.data
            if w.shape[1] % args.group_size:
                straddling += 1
            wq, meta = Quantizer.quantize(w, nbits=args.wbits, channel_wise=True, group_size=args.group_size,
                                          optimize=True, round_zero=args.wbits == 4, axis=1, bitpack=False,
                                          compute_dtype=torch.float32, device="cpu")
            meta["compute_dtype"] = torch.float32
            weights[name] = Quantizer.dequantize(wq, meta).float()
    notes = ("calibration-free; scale and zero kept as float (zero rounded at 4 bits)"
             + (f"; {straddling} linears have in_features not divisible by {args.group_size}: hqq groups the "
                "flattened weight, so some groups span two rows" if straddling else ""))
    save_result(args.out, weights, calib_seconds=timer.seconds, skipped={}, fp_loss0=fp_loss0,
                packages=("hqq",), notes=notes)


if __name__ == "__main__":
    main()
