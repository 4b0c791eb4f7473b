"""GPTQ export, `checkpoint_format: "gptq_v2"` (raw zeros), read by GPTQModel (and transformers through it).

Quantized linear `<name>` with weight [N, K], b in {2, 3, 4, 8}, G = K / group_size (per-channel: G = 1):

| tensor | dtype | shape | content |
|---|---|---|---|
| `<name>.qweight` | int32 | [K*b/32, N] | codes packed along K, dense LSB-first stream (3-bit: 32 codes in 3 words) |
| `<name>.qzeros` | int32 | [G, N*b/32] | zeros packed along N, same stream |
| `<name>.scales` | float16 | [G, N] | the sidecar's scales, transposed |
| `<name>.g_idx` | int32 | [K] | group of input column k: k // group_size (no act-order) |

`w[n, k] = (q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n]`. v1 checkpoints store `z - 1` (a zero of 0 cannot be
written), so asymmetric grids need v2. A symmetric run is written with GPTQ's symmetric zero `2^(b-1)`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

from omniquant.errors import UserError
from serving_formats.bitstream import pack_stream
from serving_formats.source import FakeQuantCheckpoint, QuantizedLinear, layer_pattern

NAME = "gptq"
BITS = (2, 3, 4, 8)
WORD_ALIGN = 32  # K and N multiples of 32: whole words for 3-bit qweight / qzeros (GPTQModel's packer requires it)


def check(src: FakeQuantCheckpoint) -> None:
    """No partial groups, and every in_features / out_features a multiple of 32."""
    src.check_divisible(NAME)
    bad = sorted({f"{layer_pattern(n)} [{out}, {k}]" for n, (out, k) in src.linears.items()
                  if out % WORD_ALIGN or k % WORD_ALIGN})
    if bad:
        raise UserError(f"{NAME} packs whole 32-bit words along in_features and out_features, which must be multiples "
                        f"of {WORD_ALIGN}; these linears [out, in] are not: {'; '.join(bad)}. Export to "
                        "compressed-tensors instead")


def linear_tensors(src: FakeQuantCheckpoint, name: str, grid: QuantizedLinear) -> Iterator[tuple[str, torch.Tensor]]:
    k = grid.codes.shape[1]
    yield f"{name}.qweight", pack_stream(grid.codes.T, src.bits, dim=0)
    yield f"{name}.qzeros", pack_stream(grid.zeros.T, src.bits, dim=1)
    yield f"{name}.scales", grid.scales.T.to(torch.float16).contiguous()
    yield f"{name}.g_idx", (torch.arange(k, dtype=torch.int32) // src.group_width(k)).to(torch.int32)


def quantization_config(src: FakeQuantCheckpoint, unquantized_linears: list[str]) -> dict:
    """config.json `quantization_config` (also written as quantize_config.json). Linear modules inside the
    decoder that were not quantized are excluded with GPTQModel's `dynamic` negative rules."""
    excluded = [n for n in unquantized_linears if n != "lm_head"]
    config = {
        "quant_method": "gptq",
        "bits": src.bits,
        "group_size": src.group_size,
        "sym": src.symmetric,
        "desc_act": False,
        "lm_head": "lm_head" in src.linears,
        "checkpoint_format": "gptq_v2",
        "format": "gptq_v2",
        "pack_dtype": "int32",
        "true_sequential": True,
        "meta": {"quantizer": ["omniquant-mlc"]},
    }
    if excluded:
        config["dynamic"] = {f"-:^{re.escape(n)}$": {} for n in sorted(excluded)}
    return config


def side_files(src: FakeQuantCheckpoint, quant_config: dict) -> dict[str, dict]:
    """GPTQModel and AutoGPTQ read quantize_config.json beside the weights."""
    return {"quantize_config.json": quant_config}
