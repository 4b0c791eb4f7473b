"""gptqmodel 7.6 peer: GPTQ (``GPTQModel.load`` + ``quantize``), asymmetric, group ``--group-size``, desc_act off.

Runs on CPU with ``GPTQMODEL_CPU_WORKERS=2``. The quantized model holds packed linears; their
``dequantize_weight()`` gives the weights its own kernels compute with, which is what we score.
"""

from __future__ import annotations

import torch
from common import Timer, load_model, load_windows, parse_args, quantizable_linears, save_result, window_loss


def main() -> None:
    args = parse_args()
    from gptqmodel import GPTQModel, QuantizeConfig

    torch.manual_seed(args.seed)
    windows = load_windows(args.windows)
    base = load_model(args.model)  # gptqmodel loads lazily (meta tensors): the loading check uses a plain copy
    fp_loss0 = window_loss(base, windows[0])
    del base
    # offload_to_disk=False: keep the packed layers in memory (the default moves them to disk, leaving meta tensors)
    qc = QuantizeConfig(bits=args.wbits, group_size=args.group_size, sym=False, desc_act=False, offload_to_disk=False)
    model = GPTQModel.load(str(args.model), qc, device="cpu", dtype=torch.float32)
    linears = quantizable_linears(model.model)
    shapes = {n: tuple(m.weight.shape) for n, m in linears.items()}
    calib = [{"input_ids": w.tolist(), "attention_mask": [1] * w.numel()} for w in windows]
    timer = Timer()
    with timer():
        model.quantize(calib, batch_size=1, calibration_sort=None)
    weights, skipped = {}, {}
    modules = dict(model.model.named_modules())
    for name, (n, k) in shapes.items():
        m = modules[name]
        if not hasattr(m, "dequantize_weight"):
            skipped[name] = f"left unquantized by gptqmodel ({type(m).__name__})"
            continue
        w = m.dequantize_weight().float()
        w = w if tuple(w.shape) == (n, k) else w.T
        weights[name] = w[:n, :k].contiguous()
    notes = "GPTQ, desc_act off, damp default"
    if skipped:
        notes += f"; {len(skipped)} of {len(shapes)} linears left float"
    save_result(args.out, weights, calib_seconds=timer.seconds, skipped=skipped, fp_loss0=fp_loss0,
                packages=("gptqmodel",), notes=notes)


if __name__ == "__main__":
    main()
