"""Glue between the block loop and weight-activation quantization: LET, activation and KV quantizers, export, load.

Activation quantization (abits < 16): the input of every quantized linear, per token, dynamic asymmetric
(quant/act.py). KV quantization (kv_bits < 16): post-RoPE q, k and v per token and head (quant/kv.py). LET:
let.py. Activation statistics for the LET init: act_stats.py, cached in `<output>.act_stats.safetensors`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from omniquant.errors import UserError
from omniquant.models import get_adapter
from omniquant.models.base import Adapter
from omniquant.quant import kv
from omniquant.quant.act import INPUT_QUANT_ATTR, ActQuantizer, attach_input_quantizer

ACT_PARAMS_FILE = "act_params.safetensors"
ACT_SCHEME = "per-token dynamic asymmetric (range min..max of each token over the channels)"
KV_SCHEME = "post-RoPE q, k and v per token and head over head_dim, dynamic asymmetric; softmax output full precision"


def attention_path(adapter: Adapter) -> str:
    """Dotted path (in a block) of the attention module: the parent of q_proj."""
    q = adapter.qk[0] if adapter.qk else adapter.linears[0]
    return q.rpartition(".")[0]


def default_stats_path(state_dir: Path) -> Path:
    state_dir = Path(state_dir)
    base = state_dir.name.removesuffix(".state")
    return state_dir.with_name(f"{base}.act_stats.safetensors")


@dataclass
class WeightActSetup:
    """What the block loop needs for a weight-activation / LET run (see calibrate_model)."""

    make_let: Callable
    act_factory: Callable | None
    stats: object | None  # act_stats.BlockStats (LET) or None

    def observe(self, block: nn.Module, i: int):
        """Context while block i runs on the full-precision stream: its activation statistics are collected."""
        return self.stats.observe(block, i) if self.stats is not None else contextlib.nullcontext()

    def finish(self) -> None:
        if self.stats is not None:
            self.stats.save()


def setup_weight_act(model: nn.Module, adapter: Adapter, windows: torch.Tensor, cfg, state_dir) -> WeightActSetup:
    """LET factory, activation quantizer factory and the LET-init statistics (read from a file, or collected block by
    block during calibration) for calibrate_model. `model` may live on the meta device (lazy calibration)."""
    from omniquant.act_stats import BlockStats
    from omniquant.let import make_block_let

    if cfg.let and not adapter.let_sites:
        raise UserError(f"--let: the {adapter.name} adapter declares no LET sites")
    stats = None
    if cfg.let:
        given = getattr(cfg, "act_stats", None)
        path = Path(given) if given else default_stats_path(state_dir)
        stats = BlockStats(path, model, adapter, windows, given=bool(given))
    if cfg.kv_bits < 16:
        kv.enable(model)
    attn_path = attention_path(adapter)

    def make_let(block, qlinears, cfg_, i):
        if cfg_.kv_bits < 16:
            kv.attach(block.get_submodule(attn_path), ActQuantizer(cfg_.kv_bits))
        if not cfg_.let:
            return None
        dev = next(block.parameters()).device  # statistics are kept on the CPU; the block may be on a GPU
        block_stats = {n: (a.to(dev), b.to(dev)) for n, (a, b) in stats.block(i).items()}
        return make_block_let(block, qlinears, adapter, model.config, cfg_.alpha, block_stats,
                              use_shift=cfg_.abits < 16)

    act_factory = (lambda name: ActQuantizer(cfg.abits)) if cfg.abits < 16 else None
    return WeightActSetup(make_let, act_factory, stats)


def collect_offsets(model: nn.Module) -> dict[str, torch.Tensor]:
    """{"<linear>.act_offset": float32 [K]} of every linear whose activation quantizer carries a LET shift."""
    out = {}
    for name, mod in model.named_modules():
        q = getattr(mod, INPUT_QUANT_ATTR, None)
        if isinstance(mod, nn.Linear) and isinstance(q, ActQuantizer) and q.offset is not None:
            out[f"{name}.act_offset"] = q.offset.detach().float().cpu().contiguous()
    return out


def export_entry(cfg) -> dict:
    """quant_config.json entries of a weight-activation / LET run (what load_quantized needs to rebuild it)."""
    shifts = cfg.let and cfg.abits < 16
    return {
        "act_quant": {
            "abits": cfg.abits, "scheme": ACT_SCHEME if cfg.abits < 16 else None,
            "sites": "input of every linear in quantized_linears" if cfg.abits < 16 else None,
            "kv_bits": cfg.kv_bits, "kv_scheme": KV_SCHEME if cfg.kv_bits < 16 else None,
            "offsets_file": ACT_PARAMS_FILE if shifts else None,
            "offset_rule": "x_q = Q(x - d) + d, d = <linear>.act_offset [K] = LET shift / LET scale" if shifts else None,
        },
    }


def attach_act_quantizers(model: nn.Module, quant_config: dict, checkpoint_dir: str | Path | None = None) -> nn.Module:
    """Re-attach activation (and KV) quantizers described by `quant_config` to a plain transformers `model`."""
    from safetensors.torch import load_file

    abits = int(quant_config.get("abits", 16))
    kv_bits = int(quant_config.get("kv_bits", 16))
    offsets = {}
    files = (quant_config.get("act_quant") or {}).get("offsets_file")
    if files:
        base = Path(checkpoint_dir or model.config._name_or_path)
        path = base / files
        if not path.exists():
            raise UserError(f"{base}: quant_config.json names {files} but the file is missing (incomplete checkpoint)")
        offsets = load_file(str(path))
    modules = dict(model.named_modules())
    if abits < 16:
        for name in quant_config["quantized_linears"]:
            q = ActQuantizer(abits)
            d = offsets.get(f"{name}.act_offset")
            if d is not None:
                q.offset = d.to(modules[name].weight.device)
            attach_input_quantizer(modules[name], q)
    if kv_bits < 16:
        adapter = get_adapter(model.config.model_type)
        kv.enable(model)
        for block in adapter.blocks(model):
            kv.attach(block.get_submodule(attention_path(adapter)), ActQuantizer(kv_bits))
    return model
