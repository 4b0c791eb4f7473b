"""An HF checkpoint opened without loading it: the model built on the meta device, tensors read when needed.

Calibration holds at most one decoder block in memory (the compute dtype, float32, on the calibration device) plus
the input embedding while block 0's inputs are captured; every other tensor stays on disk until it is copied to the
output in its stored dtype. Buffers that are not in the checkpoint (RoPE's `inv_freq`) are computed by the model's
own constructor on the CPU (`init_empty_weights(include_buffers=False)` puts only the parameters on meta).

Stored dtypes: float16, bfloat16 and float32 are read; anything else (fp8, integer-quantized checkpoints) is refused
with the tensor's name, as is a checkpoint that already carries a `quantization_config`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from omniquant.errors import UserError
from omniquant.heap import release_freed_memory
from omniquant.models.base import Adapter
from omniquant.safetensors_io import SafetensorsDir

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
COMPUTE_DTYPE = torch.float32


def state_names(model: nn.Module) -> list[str]:
    """State-dict names of `model`, a tied tensor counted once (under its first name, as save_pretrained does)."""
    seen, out = set(), []
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            out.append(name)
    return out


def assign_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace parameter / buffer `name` of `model` by `tensor` (no copy, no dtype change)."""
    owner, _, attr = name.rpartition(".")
    mod = model.get_submodule(owner) if owner else model
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    else:
        mod._buffers[attr] = tensor


def checkpoint_renames(model: nn.Module, stored_names) -> dict[str, str]:
    """stored name -> the model's name, under transformers' own load-time renames for this model class (Gemma 3
    checkpoints store `language_model.model.*`, the model calls it `model.language_model.*`). Weight converters
    (tensors fused or split at load) are not applied: a checkpoint that needs one is refused, naming the tensor."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    meta = model.state_dict()
    return {n: rename_source_key(n, renamings, [], model.base_model_prefix, meta)[0] for n in stored_names}


class LazyCheckpoint:
    """`model_path`'s config, a meta-device model of it, and its tensors on disk.

    `specs`: name -> (stored dtype, shape) of every tensor the model needs, in state-dict order (a tied tensor once).
    """

    def __init__(self, model_path: str | Path):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.path = Path(model_path)
        self.config = AutoConfig.from_pretrained(self.path)
        if getattr(self.config, "quantization_config", None):
            method = self.config.quantization_config
            method = method.get("quant_method", "?") if isinstance(method, dict) else type(method).__name__
            raise UserError(f"{self.path} is already quantized ({method}); calibrate a float16/bfloat16/float32 "
                            "checkpoint")
        self.reader = SafetensorsDir(self.path)
        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=COMPUTE_DTYPE)
        self.model.tie_weights()
        self.model.eval()
        self.model.config.use_cache = False
        meta = self.model.state_dict(keep_vars=True)
        names = state_names(self.model)
        if any(n not in self.reader for n in names):
            self.reader.rename(checkpoint_renames(self.model, self.reader.names()))
        self.specs: dict[str, tuple[torch.dtype, list[int]]] = {}
        for name in names:
            if name not in self.reader:
                raise UserError(f"{self.path}: the checkpoint has no tensor {name}, which transformers' "
                                f"{type(self.model).__name__} needs (a different layout or an incomplete checkpoint)")
            dtype, shape = self.reader.dtype(name), self.reader.shape(name)
            if dtype not in FLOAT_DTYPES:
                raise UserError(f"{self.path}: {name} is stored as {str(dtype).removeprefix('torch.')}; only float16, "
                                "bfloat16 and float32 checkpoints can be calibrated")
            if list(meta[name].shape) != shape:
                raise UserError(f"{self.path}: {name} has shape {shape}, the config implies {list(meta[name].shape)}")
            self.specs[name] = (dtype, shape)

    def load(self, names, device="cpu", dtype: torch.dtype | None = None) -> None:
        """Materialise tensors `names` of the model from disk (stored dtype unless `dtype`)."""
        for name in names:
            t = self.reader.get(name)
            assign_tensor(self.model, name, t.to(device=device, dtype=dtype or t.dtype))

    def unload(self, names) -> None:
        """Put tensors `names` back on the meta device (frees them)."""
        meta = self.model.state_dict(keep_vars=True)
        for name in names:
            assign_tensor(self.model, name, torch.empty(meta[name].shape, dtype=meta[name].dtype, device="meta"))

    def capture_names(self, adapter: Adapter) -> list[str]:
        """Tensors outside the decoder blocks that run before them (embeddings; not the final norm / lm_head when
        the capture stops at the last block, but they are small or tied to the embedding)."""
        out_emb = self.model.get_output_embeddings()
        head = {id(p) for p in out_emb.parameters()} if out_emb is not None else set()
        inp = {id(p) for p in self.model.get_input_embeddings().parameters()}
        params = dict(self.model.state_dict(keep_vars=True))
        prefix = adapter.blocks_path + "."
        return [n for n in self.specs if not n.startswith(prefix) and (id(params[n]) not in head or id(params[n]) in inp)]

    def block_names(self, adapter: Adapter, i: int) -> list[str]:
        prefix = f"{adapter.blocks_path}.{i}."
        return [n for n in self.specs if n.startswith(prefix)]

    def dominant_dtype(self, adapter: Adapter) -> torch.dtype:
        """The dtype most bytes of the decoder blocks are stored in (written into config.json as the model dtype)."""
        count: dict[torch.dtype, int] = {}
        for name, (dtype, shape) in self.specs.items():
            if name.startswith(adapter.blocks_path + "."):
                count[dtype] = count.get(dtype, 0) + int(torch.Size(shape).numel()) * dtype.itemsize
        return max(count, key=count.get) if count else torch.float32


class LazyBlocks:
    """Decoder blocks read from disk one at a time for the block loop (same interface as blockwise.ModelBlocks).

    load(i): block i in the compute dtype on `device`; finish(i, block, result): hand the quantized block to
    `sink(i, prefix, block, result)` (which writes it in its stored dtype), then free it (back to meta) and give the
    freed heap back (`heap.release_freed_memory`: without it a Llama-2-7B-shaped RTN run peaked at 3.30 GiB, LWC at
    3.96, growing ~60 MB per block).
    """

    def __init__(self, ckpt: LazyCheckpoint, adapter: Adapter, device: torch.device, sink):
        self.ckpt, self.adapter, self.device, self.sink = ckpt, adapter, torch.device(device), sink
        self.blocks = adapter.blocks(ckpt.model)

    def __len__(self) -> int:
        return len(self.blocks)

    def load(self, i: int) -> nn.Module:
        prefix = f"{self.adapter.blocks_path}.{i}."
        block = self.blocks[i]
        state = {n[len(prefix):]: self.ckpt.reader.get(n) for n in self.ckpt.block_names(self.adapter, i)}
        block.load_state_dict(state, strict=True, assign=True)
        del state
        return block.to(device=self.device, dtype=COMPUTE_DTYPE)

    def finish(self, i: int, block: nn.Module, result) -> None:
        self.sink(i, f"{self.adapter.blocks_path}.{i}", block, result)
        block.to("meta")
        release_freed_memory()

    def capture(self):
        """Context manager: the tensors that run before block 0 are loaded (stored dtype, CPU) inside it."""
        import contextlib

        names = self.ckpt.capture_names(self.adapter)

        @contextlib.contextmanager
        def ctx():
            self.ckpt.load(names)
            try:
                yield
            finally:
                self.ckpt.unload(names)

        return ctx()
