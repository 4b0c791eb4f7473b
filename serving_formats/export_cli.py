"""`omniquant export`: fake-quant checkpoint + sidecar -> compressed-tensors or GPTQ v2 checkpoint for serving."""

from __future__ import annotations

import argparse

FORMAT_HELP = {
    "compressed-tensors": "pack-quantized, 1-8 bits (dense layout of compressed-tensors >= 0.18): vLLM serves W4 / W8 "
                          "(Marlin), transformers + compressed-tensors loads every width",
    "gptq": "GPTQ checkpoint_format gptq_v2 (raw zeros), 2/3/4/8 bits: GPTQModel, transformers through GPTQModel",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Export a fake-quant checkpoint (output of `omniquant calibrate`) for a serving engine. Quantized linears "
        "are written from the calibration's own integer codes, scales and zeros (quant_params.safetensors), checked "
        "to reproduce the fake-quant weights bit for bit; nothing is re-quantized. Other tensors keep the "
        "checkpoint's dtype; tokenizer, chat template and generation config are copied. Layers whose in_features "
        "is not a multiple of the group size cannot be stored in these formats and are refused (with the group "
        "sizes that would work), never left in float."
    )
    p.epilog = "formats: " + "; ".join(f"{k}: {v}" for k, v in FORMAT_HELP.items())
    p.add_argument("--input", required=True, help="fake-quant checkpoint directory (with quant_config.json and "
                   "quant_params.safetensors)")
    p.add_argument("--format", required=True, metavar="FORMAT",
                   help=f"output format: {' or '.join(FORMAT_HELP)}")
    p.add_argument("--output", required=True, help="new directory for the exported checkpoint (must not exist)")
    p.add_argument("--max-shard-mb", type=int, default=2048,
                   help="largest safetensors shard in MiB (also the memory held at once; default 2048)")


def run(args: argparse.Namespace) -> int:
    from omniquant.errors import UserError
    from serving_formats.export import export_checkpoint

    if args.max_shard_mb < 1:
        raise UserError(f"--max-shard-mb must be positive, got {args.max_shard_mb}")
    out = export_checkpoint(args.input, args.format, args.output, max_shard_bytes=args.max_shard_mb << 20)
    size = sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors")
    print(f"exported {args.input} as {args.format} -> {out} ({size:,} bytes of safetensors)")
    return 0
