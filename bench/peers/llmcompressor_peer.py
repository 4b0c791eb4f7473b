"""llm-compressor 0.14 peers: GPTQ (``GPTQModifier``) and AWQ (``AWQModifier`` + round-to-nearest
``QuantizationModifier``), weight-only, asymmetric integer, group ``--group-size``; lm_head left float. For
weight-activation settings (``--abits`` < 16): ``--method smoothquant`` = ``SmoothQuantModifier`` (strength 0.8, its
default Llama mappings) + GPTQ with per-channel asymmetric weights and per-token dynamic asymmetric activations,
llm-compressor's W8A8-style recipe at 4 / 6 bits. Its smoothing scales are folded into the norm weights, which travel
with the linears; the evaluator quantizes the activations itself (the same quantizer for every method).

llm-compressor refuses group quantization of layers whose in_features is not a multiple of the group size; with
``bypass_divisibility_checks=True`` it passes the check but then crashes in its weight observer (``unflatten`` of
576 columns into groups of 128, measured with 0.14.0.1). So we do what its error message recommends: such layers go
to ``ignore`` and stay float; they are recorded as skipped. The result is read back through compressed-tensors' own fake-quant op (``forward_quantize``),
i.e. exactly the weights its quantized forward uses. AWQ on CPU needs ``IntermediatesCache.pin_memory`` made a no-op
(it pins CPU tensors for GPU transfers, which fails without CUDA).
"""

from __future__ import annotations

import torch
from common import Timer, changed_params, load_inputs, parse_args, quantizable_linears, save_result, snapshot_params


def _extra(ap):
    ap.add_argument("--method", choices=("gptq", "awq", "smoothquant"), required=True)


def main() -> None:
    args = parse_args(_extra)
    import datasets
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from transformers import AutoTokenizer

    model, windows, fp_loss0 = load_inputs(args)
    tok = AutoTokenizer.from_pretrained(str(args.model))
    n, seqlen = windows.shape
    ds = datasets.Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
    per_channel = args.group_size == -1
    weights_args = {"num_bits": args.wbits, "type": "int", "symmetric": False,
                    **({"strategy": "channel"} if per_channel else {"strategy": "group", "group_size": args.group_size})}
    scheme = {"targets": ["Linear"], "weights": weights_args}
    if args.abits < 16:
        scheme["input_activations"] = {"num_bits": args.abits, "type": "int", "symmetric": False,
                                       "strategy": "token", "dynamic": True}
    linears = quantizable_linears(model)
    ragged = [] if per_channel else [name for name, m in linears.items() if m.in_features % args.group_size]
    quant_kw = {"config_groups": {"group_0": scheme}, "ignore": ["lm_head", *ragged]}
    if args.method == "smoothquant":
        from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

        recipe = [SmoothQuantModifier(smoothing_strength=0.8), GPTQModifier(**quant_kw)]
    elif args.method == "gptq":
        recipe = [GPTQModifier(**quant_kw)]
    else:
        from llmcompressor.modifiers.transform.awq import AWQModifier
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *a, **k: None  # CPU only: nothing to pin for
        recipe = [AWQModifier(), QuantizationModifier(**quant_kw)]
    before = snapshot_params(model)
    timer = Timer()
    with timer():
        oneshot(model=model, processor=tok, dataset=ds, recipe=recipe, num_calibration_samples=n,
                max_seq_length=seqlen, shuffle_calibration_samples=False)
    weights = {}
    with torch.no_grad():
        for name, m in linears.items():
            if name in ragged:
                continue
            w_scheme = getattr(getattr(m, "quantization_scheme", None), "weights", None)
            if w_scheme is None:
                raise SystemExit(f"llm-compressor left {name} unquantized")
            weights[name] = forward_quantize(m, m.weight.data.float(), "weight", w_scheme).float()
    notes = {"gptq": "GPTQ (actorder static, dampening 0.01, block 128)", "awq": "AWQ + RTN",
             "smoothquant": f"SmoothQuant (0.8) + GPTQ, per-channel weights, activations {args.abits}-bit per token"
             }[args.method]
    if ragged:
        notes += (f"; {len(ragged)} of {len(linears)} linears have in_features % {args.group_size} != 0: rejected "
                  "by llm-compressor (bypass crashes), left float via ignore")
    skipped = {name: f"in_features {linears[name].in_features} not divisible by {args.group_size}" for name in ragged}
    # AWQ / SmoothQuant fold their per-channel scales into the preceding RMSNorm weights: those travel with the linears.
    other = changed_params(model, before, exclude={f"{n}.weight" for n in weights})
    save_result(args.out, weights, calib_seconds=timer.seconds, skipped=skipped, fp_loss0=fp_loss0,
                other_params=other,
                packages=("llmcompressor", "compressed-tensors"), notes=notes,
                extra={"ragged_group_layers": len(ragged), "abits": args.abits})


if __name__ == "__main__":
    main()
