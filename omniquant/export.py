"""Write the fake-quant checkpoint + sidecar (docs/formats.md §1) atomically, after checking it is exact."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch
from safetensors.torch import save_file

from omniquant.atomic import atomic_dir
from omniquant.quant.codes import dequantize, recompute_codes
from omniquant.quant.spec import PADDING_RULE

FORMAT_VERSION = 1


def library_versions() -> dict:
    import safetensors
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}


def check_exact(model, qparams, bits: int, group_size: int, symmetric: bool) -> None:
    """Every quantized weight must equal dequantize(recompute_codes(...)) bit for bit."""
    modules = dict(model.named_modules())
    for name, (scales, zeros) in qparams.items():
        w = modules[name].weight.detach().float().cpu()
        codes = recompute_codes(w, scales, zeros, bits, group_size, symmetric)
        if not torch.equal(dequantize(codes, scales, zeros, group_size), w):
            raise RuntimeError(f"internal error: {name} is not exactly representable by its scales/zeros")


def save_fakequant(model, tokenizer, qparams: dict, quant_config: dict, output: Path, overwrite: bool = False) -> Path:
    """qparams: {linear name: (scales float32 [N,G], zeros int32 [N,G])}; quant_config: the run's settings."""
    check_exact(model, qparams, quant_config["wbits"], quant_config["group_size"], quant_config["symmetric"])
    config = {
        "method": "omniquant",
        "format_version": FORMAT_VERSION,
        **quant_config,
        "padding": PADDING_RULE,
        "scale_dtype": "float16",
        "quantized_linears": sorted(qparams),
        "versions": library_versions(),
    }
    tensors = {}
    for name, (scales, zeros) in qparams.items():
        tensors[f"{name}.scales"] = scales.float().contiguous()
        tensors[f"{name}.zeros"] = zeros.to(torch.int32).contiguous()
    with atomic_dir(Path(output), overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(tensors, str(tmp / "quant_params.safetensors"))
        if (quant_config.get("act_quant") or {}).get("offsets_file"):
            from omniquant.weight_act import collect_offsets  # LET shifts carried by the activation quantizers

            save_file(collect_offsets(model), str(tmp / quant_config["act_quant"]["offsets_file"]))
        (tmp / "quant_config.json").write_text(json.dumps(config, indent=2))
    return Path(output)
