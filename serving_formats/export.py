"""Fake-quant checkpoint + sidecar -> a serving-engine checkpoint (compressed-tensors or GPTQ v2), exact.

Quantized linears are written from their integer grid (codes recovered from the sidecar's scales / zeros and
checked to reproduce the fake-quant weights bit for bit; never re-quantized); every other tensor is copied in the
checkpoint's own dtype. config.json gets the format's `quantization_config`; the tokenizer, chat template and
generation config are copied; `omniquant_export.json` records where it came from. One shard is held in memory at a
time, and the output directory appears only when complete (omniquant/atomic.py).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from omniquant.atomic import atomic_dir
from omniquant.errors import UserError
from serving_formats.source import FakeQuantCheckpoint
from serving_formats.writer import ShardedWriter, copy_side_files, write_json

FORMATS = {"compressed-tensors": "serving_formats.compressed_tensors", "gptq": "serving_formats.gptq"}
DEFAULT_MAX_SHARD_BYTES = 2 << 30
PROVENANCE = "omniquant_export.json"


def get_format(name: str) -> ModuleType:
    if name not in FORMATS:
        raise UserError(f"unknown export format {name!r}; choose one of {', '.join(FORMATS)}")
    return importlib.import_module(FORMATS[name])


def linear_modules(hf_config: dict) -> list[str]:
    """Names of every torch.nn.Linear of the architecture (built on the meta device: no memory, no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(hf_config)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def export_checkpoint(input_dir: str | Path, fmt: str, output_dir: str | Path,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True) -> Path:
    """Write `input_dir` (a fake-quant checkpoint, docs/formats.md §1) in format `fmt` into the new `output_dir`.

    UserError (and nothing at `output_dir`) for: an existing output, an unknown format, a checkpoint without the
    sidecar, bits the format cannot hold, layers the format cannot store (partial groups, GPTQ word alignment), a
    sidecar whose symmetry or grid does not match the weights, activation-quantized checkpoints.
    """
    from tqdm import tqdm

    output_dir = Path(output_dir)
    if output_dir.exists():
        raise UserError(f"output {output_dir} already exists; choose a new path or remove it")
    module = get_format(fmt)
    src = FakeQuantCheckpoint(input_dir)
    if src.bits not in module.BITS:
        other = [f for f in FORMATS if src.bits in get_format(f).BITS]
        raise UserError(f"{fmt} cannot hold {src.bits}-bit weights (it stores {', '.join(map(str, module.BITS))} "
                        f"bits)" + (f"; export to {' or '.join(other)} instead" if other else ""))
    module.check(src)
    linears = linear_modules(src.hf_config)
    if stray := sorted(set(src.linears) - set(linears)):
        raise UserError(f"the sidecar quantizes {stray[0]}, which is not a Linear module of "
                        f"{src.hf_config.get('model_type')}")
    qconfig = module.quantization_config(src, [n for n in linears if n not in src.linears])
    with atomic_dir(output_dir) as tmp:
        writer = ShardedWriter(tmp, max_shard_bytes)
        for name, tensor in tqdm(src.tensors(), total=len(src.shapes), desc=f"export {fmt}", unit="tensor",
                                 disable=not progress):
            linear = name.removesuffix(".weight")
            if name.endswith(".weight") and linear in src.linears:
                for out_name, out in module.linear_tensors(src, linear, src.grid(linear, tensor)):
                    writer.add(out_name, out)
            else:
                writer.add(name, tensor)
        writer.close()
        write_json(tmp / "config.json", src.hf_config | {"quantization_config": qconfig})
        copy_side_files(src.dir, tmp)
        for file_name, data in module.side_files(src, qconfig).items():
            write_json(tmp / file_name, data)
        write_json(tmp / PROVENANCE, {"format": fmt, "source": str(src.dir.resolve()),
                                      "quantized_linears": len(src.linears), "calibration": src.qconfig})
    return output_dir
