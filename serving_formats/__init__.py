"""Export a calibrated (fake-quant + sidecar) checkpoint for serving engines: compressed-tensors "pack-quantized"
(vLLM, transformers) and GPTQ v2 (GPTQModel, transformers), bit-exact from the sidecar's integer grid.

Public API: `export_checkpoint(input_dir, fmt, output_dir)`, `FORMATS`. One module per format
(`compressed_tensors.py`, `gptq.py`); the shared reader of the sidecar is `source.py`, the bit packing `bitstream.py`.
"""

from serving_formats.export import FORMATS, export_checkpoint

__all__ = ["FORMATS", "export_checkpoint"]
