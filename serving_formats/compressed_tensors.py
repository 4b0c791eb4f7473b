"""compressed-tensors "pack-quantized" export (vllm-project/compressed-tensors), read by vLLM and by transformers
with the compressed-tensors package.

Quantized linear `<name>` with weight [N, K], b bits, G = K / group_size groups (per-channel: G = 1):

| tensor | dtype | shape | content |
|---|---|---|---|
| `<name>.weight_packed` | int32 | [N, ceil(K*b/32)] | codes along K, dense LSB-first stream (`bitstream.py`) |
| `<name>.weight_scale` | see below | [N, G] | the sidecar's scales (exact in float16) |
| `<name>.weight_shape` | int64 | [2] | [N, K] |
| `<name>.weight_zero_point` | int32 | [ceil(N*b/32), G] | zeros along N, same stream (asymmetric runs only) |

Codes and zeros are stored unsigned: the library keeps them signed (`q - 2^(b-1)`) and adds `2^(b-1)` when it
packs, so `w = (q - z) * s` either way; a symmetric export has no zero point (z = 2^(b-1)).
The library dequantizes in the scale's dtype, so `weight_scale` keeps the checkpoint's dtype when that is float32 or
float16 (the product rounds exactly as the fake-quant weight did) and is float32 for a bfloat16 checkpoint (bf16
cannot hold the float16 scales; float32 products rounded to bf16 give the fake-quant weights). The dense stream is the
layout of compressed-tensors >= 0.18; 0.17 packed `32 // b` codes per word, which differs at 3, 5, 6 and 7 bits,
and the config cannot say which, so `version` names the release this layout was checked against.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from serving_formats.bitstream import pack_stream
from serving_formats.source import FakeQuantCheckpoint, QuantizedLinear

NAME = "compressed-tensors"
BITS = (1, 2, 3, 4, 5, 6, 7, 8)
LAYOUT_VERSION = "0.20.1"  # compressed-tensors release whose pack_to_int32 / unpack_from_int32 the tests run


def check(src: FakeQuantCheckpoint) -> None:
    """Format limits beyond the bit width: no partial groups."""
    src.check_divisible(NAME)


def linear_tensors(src: FakeQuantCheckpoint, name: str, grid: QuantizedLinear) -> Iterator[tuple[str, torch.Tensor]]:
    yield f"{name}.weight_packed", pack_stream(grid.codes, src.bits, dim=1)
    yield f"{name}.weight_scale", grid.scales.to(torch.float32 if grid.dtype == torch.bfloat16 else grid.dtype)
    yield f"{name}.weight_shape", torch.tensor(list(grid.codes.shape), dtype=torch.int64)
    if not src.symmetric:
        yield f"{name}.weight_zero_point", pack_stream(grid.zeros, src.bits, dim=0)


def quantization_config(src: FakeQuantCheckpoint, unquantized_linears: list[str]) -> dict:
    """config.json `quantization_config`: one group of weight-only int quantization on every Linear, the
    unquantized Linear modules (e.g. lm_head) in `ignore`."""
    per_channel = src.group_size == -1
    weights = {
        "num_bits": src.bits, "type": "int", "symmetric": src.symmetric,
        "strategy": "channel" if per_channel else "group", "group_size": None if per_channel else src.group_size,
        "dynamic": False, "actorder": None, "observer": "minmax", "observer_kwargs": {},
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                      "output_activations": None, "format": "pack-quantized"}},
        "ignore": sorted(unquantized_linears),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "version": LAYOUT_VERSION,
    }


def side_files(src: FakeQuantCheckpoint, quant_config: dict) -> dict[str, dict]:
    """No file beyond config.json."""
    return {}
