"""Write the fake-quant checkpoint + sidecar (docs/formats.md §1), tensor by tensor, in the source dtypes.

Every tensor keeps the dtype it had in the source checkpoint (float16 / bfloat16 / float32). A quantized linear is
written as  round_D((q - z) * s)  (the calibration's exact float32 grid value, rounded once to its dtype D); before
it is written the export checks that its codes are exact on the grid and are recovered from the stored weight
(`omniquant.quant.codes`); where D cannot hold them (bfloat16 with 8-bit asymmetric codes) the sidecar also stores
the codes (`<name>.codes`, uint8 [N, K]). The files are planned before the first tensor is written and filled as
blocks finish (`omniquant.safetensors_io.ShardedWriter`), so the export holds one block at a time; the caller
writes into a temporary directory and renames it when complete (`omniquant.atomic.atomic_dir`).
"""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from omniquant.atomic import atomic_dir
from omniquant.errors import UserError
from omniquant.quant.codes import (
    codes_recoverable,
    recompute_codes,
    recover_codes,
    stored_weight,
)
from omniquant.quant.spec import PADDING_RULE
from omniquant.safetensors_io import MAX_SHARD_BYTES, ShardedWriter

FORMAT_VERSION = 2
SIDECAR_STEM = "quant_params"
# Besides the weights: what from_pretrained / AutoTokenizer read (copied from the source when present).
SOURCE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                "chat_template.json")


def library_versions() -> dict:
    import safetensors
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class FakeQuantWriter:
    """The tensors of a fake-quant checkpoint, written into `directory` as they become ready.

    specs: name -> (stored dtype, shape) of every model tensor (checkpoint order); linears: quantized linear names.
    """

    def __init__(self, directory: Path, specs: dict[str, tuple[torch.dtype, list[int]]], linears: list[str],
                 wbits: int, group_size: int, symmetric: bool, max_shard_bytes: int = MAX_SHARD_BYTES):
        self.specs, self.linears = specs, set(linears)
        self.bits, self.group_size, self.symmetric = wbits, group_size, symmetric
        side: dict[str, tuple[torch.dtype, list[int]]] = {}
        self.with_codes: set[str] = set()
        for lin in sorted(linears):
            dtype, (n, k) = specs[f"{lin}.weight"]
            g = 1 if group_size == -1 else -(-k // group_size)
            side[f"{lin}.scales"] = (torch.float32, [n, g])
            side[f"{lin}.zeros"] = (torch.int32, [n, g])
            if not codes_recoverable(dtype, wbits, symmetric):
                side[f"{lin}.codes"] = (torch.uint8, [n, k])
                self.with_codes.add(lin)
        self.model = ShardedWriter(directory, specs, "model", max_shard_bytes)
        try:
            self.sidecar = ShardedWriter(directory, side, SIDECAR_STEM, max_shard_bytes=1 << 62)
        except BaseException:
            self.model.abort()
            raise
        self.offsets: dict[str, torch.Tensor] = {}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """A tensor that is not a quantized weight, cast to its stored dtype (a clear error if it overflows)."""
        dtype = self.specs[name][0]
        t = tensor.detach().to("cpu", dtype)
        if tensor.is_floating_point() and dtype != tensor.dtype and torch.isfinite(tensor).all() \
                and not torch.isfinite(t).all():
            raise UserError(f"{name} overflows {dtype_name(dtype)} (max |x| {tensor.abs().max():.3g}); "
                            "the calibrated model cannot be stored in the source dtype")
        self.model.write(name, t)

    def write_linear(self, name: str, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> None:
        """A quantized linear: `weight` the exact float32 fake-quant weight [N, K], scales/zeros [N, G].

        Checks that the stored weight is what the sidecar says (round_D of the grid value of its codes) and, where
        the codes are not stored, that they are recovered from it."""
        dtype = self.specs[f"{name}.weight"][0]
        w = weight.detach().float().cpu()
        scales, zeros = scales.float().cpu().contiguous(), zeros.to(torch.int32).cpu().contiguous()
        codes = recompute_codes(w, scales, zeros, self.bits, self.group_size, self.symmetric)
        stored = w.to(dtype)
        if not torch.isfinite(stored).all():
            raise UserError(f"{name}: the quantized weight overflows {dtype_name(dtype)} (max |w| "
                            f"{w.abs().max():.3g}); the calibrated model cannot be stored in the source dtype")
        if not torch.equal(stored_weight(codes, scales, zeros, self.group_size, dtype), stored):
            raise RuntimeError(f"internal error: {name} is not exactly representable by its scales/zeros")
        if name in self.with_codes:
            self.sidecar.write(f"{name}.codes", codes.to(torch.uint8))
        elif dtype != torch.float32:  # float32 stores the grid itself: the check above was the recovery
            back = recover_codes(stored, scales, zeros, self.bits, self.group_size, self.symmetric, verify=False)
            if not torch.equal(back, codes):
                raise RuntimeError(f"internal error: codes of {name} not recoverable from {dtype_name(dtype)}")
        self.model.write(f"{name}.weight", stored)
        self.sidecar.write(f"{name}.scales", scales)
        self.sidecar.write(f"{name}.zeros", zeros)

    def write_module(self, prefix: str, module: torch.nn.Module, qparams: dict) -> None:
        """Every planned tensor of `module` (full names `prefix.<name>`); quantized linears with their
        qparams[linear name] = (scales, zeros)."""
        for rel, t in module.state_dict().items():
            name = f"{prefix}.{rel}" if prefix else rel
            lin = name.removesuffix(".weight")
            if name.endswith(".weight") and lin in self.linears:
                self.write_linear(lin, t, *qparams[lin])
            elif name in self.specs:
                self.write(name, t)

    def close(self) -> None:
        self.model.close()
        self.sidecar.close()

    def abort(self) -> None:
        self.model.abort()
        self.sidecar.abort()


def quant_config_entry(quant_config: dict, qparams_names, writer: FakeQuantWriter) -> dict:
    """quant_config.json: the run's settings plus what a reader of the files needs."""
    dtypes = sorted({dtype_name(writer.specs[f"{n}.weight"][0]) for n in qparams_names})
    return {
        "method": "omniquant",
        "format_version": FORMAT_VERSION,
        **quant_config,
        "padding": PADDING_RULE,
        "scale_dtype": "float16",
        "weight_dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "stored_weight": "round_to(weight_dtype, (q - zeros) * scales computed in float32)",
        "codes_in_sidecar": sorted(writer.with_codes) != [],
        "quantized_linears": sorted(qparams_names),
        "versions": library_versions(),
    }


def write_metadata(directory: Path, hf_config, quant_config: dict, offsets: dict[str, torch.Tensor],
                   source_dir: Path | None = None, tokenizer=None) -> None:
    """config.json (model dtype = the weights' dtype), tokenizer / generation config files, quant_config.json and
    (LET shifts) act_params.safetensors."""
    hf_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    if source_dir is not None:
        for f in SOURCE_FILES:
            if (Path(source_dir) / f).is_file() and not (directory / f).exists():
                shutil.copy2(Path(source_dir) / f, directory / f)
    offsets_file = (quant_config.get("act_quant") or {}).get("offsets_file")
    if offsets_file:
        save_file({k: v.float().contiguous() for k, v in offsets.items()}, str(directory / offsets_file))
    (directory / "quant_config.json").write_text(json.dumps(quant_config, indent=2))


def save_fakequant(model, tokenizer, qparams: dict, quant_config: dict, output: Path, overwrite: bool = False,
                   dtypes: dict[str, torch.dtype] | None = None, source_dir: Path | None = None,
                   max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Export a model held in memory. qparams: {linear name: (scales float32 [N,G], zeros int32 [N,G])};
    dtypes: stored dtype per tensor name (default float32: a float32 source)."""
    from omniquant.lazy_model import state_names
    from omniquant.weight_act import collect_offsets

    state = model.state_dict()
    dtypes = dtypes or {}
    specs = {n: (dtypes.get(n, torch.float32), list(state[n].shape)) for n in state_names(model)}
    with atomic_dir(Path(output), overwrite=overwrite) as tmp:
        writer = FakeQuantWriter(tmp, specs, sorted(qparams), quant_config["wbits"], quant_config["group_size"],
                                 quant_config["symmetric"], max_shard_bytes)
        try:
            writer.write_module("", model, qparams)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        config = model.config
        config.dtype = _dominant(specs, qparams)
        write_metadata(tmp, config, quant_config_entry(quant_config, qparams, writer), collect_offsets(model),
                       source_dir, tokenizer)
    return Path(output)


def _dominant(specs, linears) -> torch.dtype:
    dt = {specs[f"{n}.weight"][0] for n in linears}
    return dt.pop() if len(dt) == 1 else torch.float32
