"""MLC-LLM-style quantization schemes, exact packer and loader for OmniQuant fake-quant checkpoints.

Public API: `get_scheme`, `SCHEMES`, `pack_checkpoint`, `load_packed`, `unpack_to_hf`; `write_packed_model` and
`linear_params` write a packed directory from codes you already have (synthetic weights). Bit layout: `packing`.
"""

from mlc_schemes.pack import linear_params, pack_checkpoint, write_packed_model
from mlc_schemes.schemes import SCHEMES, QuantScheme, get_scheme
from mlc_schemes.unpack import load_packed, unpack_to_hf

__all__ = ["SCHEMES", "QuantScheme", "get_scheme", "linear_params", "load_packed", "pack_checkpoint", "unpack_to_hf",
           "write_packed_model"]
