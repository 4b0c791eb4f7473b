"""`omniquant pack`: fake-quant checkpoint + sidecar -> packed MLC weights directory (docs/formats.md §2)."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    from mlc_schemes.schemes import SCHEMES

    p.description = (
        "Pack a fake-quant checkpoint (output of `omniquant calibrate`) into MLC-LLM's weights format: "
        "tensor-cache.json + params_shard_*.bin + mlc-chat-config.json + tokenizer. Integer codes come from the "
        "calibration's quant_params.safetensors and must reproduce the fake-quant weights exactly; the scheme's "
        "bits, group size and symmetry must match the calibration run."
    )
    p.epilog = "schemes: " + "; ".join(
        f"{s.name} ({s.bits}-bit, {'per-channel' if s.group_size == -1 else f'group {s.group_size}'}, "
        f"{'sym' if s.symmetric else 'asym'})" for s in SCHEMES.values())
    p.add_argument("--input", required=True, help="fake-quant checkpoint directory (with quant_config.json and "
                   "quant_params.safetensors)")
    p.add_argument("--scheme", required=True, metavar="NAME", help="quantization scheme, e.g. w3a16g128asym, "
                   "q4f16_1 (list below)")
    p.add_argument("--embedding-scheme", metavar="NAME", default=None,
                   help="also quantize the token embedding (and an untied lm_head) with this scheme, round-to-nearest "
                        "(e.g. w8a16g128asym; default: keep them float16). With tied embeddings it is the lm_head too, "
                        "the largest weight read per decoded token")
    p.add_argument("--output", required=True, help="new directory for the packed weights (must not exist)")
    p.add_argument("--report-json", metavar="FILE", help="also write the size report (bytes, bits/weight) here")


def run(args: argparse.Namespace) -> int:
    from mlc_schemes.pack import pack_checkpoint
    from mlc_schemes.size_report import size_report

    out = pack_checkpoint(args.input, args.scheme, args.output, embedding_scheme=args.embedding_scheme)
    rep = size_report(out)
    print(f"packed {args.input} with {rep['scheme']} -> {out}")
    print(f"  files on disk: {rep['dir_bytes']:,} bytes ({rep['shards']} shards, {rep['shard_bytes']:,} bytes)")
    print(f"  quantized linears: {rep['linear_weights']:,} weights in {rep['linear_bytes']:,} bytes = "
          f"{rep['linear_bits_per_weight']:.4f} bits/weight (nominal {rep['nominal_bits_per_weight']:.4f}: "
          f"x{rep['linear_vs_nominal']:.4f}; layout for these shapes {rep['layout_bits_per_weight']:.4f})")
    if rep["embedding_scheme"]:
        print(f"  embedding / lm_head: {rep['embedding_scheme']} (round-to-nearest)")
    print(f"  whole model: {rep['bits_per_param']:.4f} bits/param (BitsPerParam in tensor-cache.json)")
    if args.report_json:
        with open(args.report_json, "w") as f:
            json.dump(rep, f, indent=2)
    return 0
