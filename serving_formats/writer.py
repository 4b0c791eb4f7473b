"""Write an exported checkpoint: sharded safetensors (HF names and index), config.json, tokenizer and generation
config copied from the source. Memory stays bounded by one shard: tensors are buffered until `max_shard_bytes`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from mlc_schemes.chat_config import TOKENIZER_FILES
from omniquant.safetensors_io import INDEX, SINGLE

# The tokenizer (with its chat template) and the generation settings that loaders read beside the weights.
COPIED_FILES = (*TOKENIZER_FILES, "chat_template.json", "generation_config.json")


class ShardedWriter:
    """`add(name, tensor)` in any order; `close()` names the shards `model-0000i-of-0000n.safetensors` and writes
    `model.safetensors.index.json` (a single shard is written as `model.safetensors`, no index)."""

    def __init__(self, directory: Path, max_shard_bytes: int):
        self.dir = Path(directory)
        self.max = max_shard_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffered = 0
        self.shards: list[list[str]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.buffer or any(name in s for s in self.shards):
            raise ValueError(f"tensor {name} written twice")
        size = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffered + size > self.max:
            self._flush()
        self.buffer[name] = tensor.contiguous()
        self.buffered += size
        self.total += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(self.buffer, str(self.dir / f".shard-{len(self.shards)}.safetensors"), metadata={"format": "pt"})
        self.shards.append(list(self.buffer))
        self.buffer, self.buffered = {}, 0

    def close(self) -> None:
        if self.buffer or not self.shards:
            self._flush()
        n = len(self.shards)
        if n == 1:
            (self.dir / ".shard-0.safetensors").rename(self.dir / SINGLE)
            return
        weight_map = {}
        for i, names in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.dir / f".shard-{i}.safetensors").rename(self.dir / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def copy_side_files(source: Path, dest: Path) -> list[str]:
    """Copy the tokenizer, chat template and generation config files that exist in `source`; returns their names."""
    copied = [f for f in COPIED_FILES if (source / f).is_file()]
    for f in copied:
        shutil.copy2(source / f, dest / f)
    return copied


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
