"""Calibrate an HF checkpoint with OmniQuant and write the fake-quant checkpoint (library entry point)."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch

from omniquant.block_train import AMP_CHOICES, SCHEDULES, matmul_dtype
from omniquant.blockwise import RunState, calibrate_model, learns_nothing
from omniquant.capture import final_hidden
from omniquant.config import SUPPORTED_ABITS, CalibConfig
from omniquant.data import load_tokens, sample_windows, split_windows
from omniquant.e2e_scales import check_fits, refine_checkpoint, tune_scales
from omniquant.errors import UserError
from omniquant.hub import resolve_model
from omniquant.models import get_adapter
from omniquant.ppl import config_window_bos
from omniquant.quant.clip_init import CLIP_INITS
from omniquant.quant.recipes import LR_GROUPS, resolve_clip_init, resolve_recipe
from omniquant.quant.spec import SUPPORTED_WBITS


def validate(cfg: CalibConfig) -> None:
    if cfg.wbits not in SUPPORTED_WBITS:
        raise UserError(f"--wbits must be one of {', '.join(map(str, SUPPORTED_WBITS))}, got {cfg.wbits}")
    if cfg.group_size != -1 and cfg.group_size <= 0:
        raise UserError(f"--group-size must be a positive integer (or -1 for per-channel), got {cfg.group_size}")
    if cfg.abits not in SUPPORTED_ABITS:
        raise UserError(f"--abits must be one of {', '.join(map(str, SUPPORTED_ABITS))}, got {cfg.abits}")
    if cfg.kv_bits not in SUPPORTED_ABITS:
        raise UserError(f"--kv-bits must be one of {', '.join(map(str, SUPPORTED_ABITS))}, got {cfg.kv_bits}")
    for name in ("epochs", "nsamples", "seqlen", "batch_size", "window_split"):
        if getattr(cfg, name) < (0 if name == "epochs" else 1):
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    resolve_recipe(cfg.recipe, cfg.wbits)  # UserError for an unknown recipe
    if cfg.clip_init not in CLIP_INITS:
        raise UserError(f"--clip-init must be one of {', '.join(CLIP_INITS)}, got {cfg.clip_init!r}")
    if cfg.amp not in AMP_CHOICES:
        raise UserError(f"--amp must be one of {', '.join(AMP_CHOICES)}, got {cfg.amp!r}")
    if cfg.lr_schedule not in SCHEDULES:
        raise UserError(f"--lr-schedule must be one of {', '.join(SCHEDULES)}, got {cfg.lr_schedule!r}")
    for g in LR_GROUPS.values():
        if getattr(cfg, g.field) is not None and not getattr(cfg, g.field) > 0:
            raise UserError(f"--{g.field.replace('_', '-')} must be positive, got {getattr(cfg, g.field)}")
    if cfg.e2e_epochs < 0:
        raise UserError(f"--e2e-epochs must be >= 0, got {cfg.e2e_epochs}")
    if not 0 <= cfg.beta1 < 1:
        raise UserError(f"--beta1 must be in [0, 1), got {cfg.beta1}")
    if cfg.e2e_epochs and (cfg.abits < 16 or cfg.kv_bits < 16):
        raise UserError("--e2e-epochs tunes weight scales of weight-only runs; it does not combine with --abits / "
                        "--kv-bits below 16")
    if cfg.seqlen % cfg.window_split or cfg.seqlen // cfg.window_split < 2:
        raise UserError(f"--window-split ({cfg.window_split}) must divide --seqlen ({cfg.seqlen}) into pieces of at "
                        "least 2 tokens")
    if cfg.nsamples % cfg.batch_size:
        raise UserError(f"--nsamples ({cfg.nsamples}) must be a multiple of --batch-size ({cfg.batch_size})")


def check_output(output: Path, overwrite: bool) -> None:
    if output.exists():
        qc = output / "quant_config.json"
        what = ""
        if qc.exists():
            try:
                c = json.loads(qc.read_text())
                what = f" (it holds a {c.get('method')} w{c.get('wbits')} g{c.get('group_size')} run)"
            except (OSError, ValueError):
                what = " (with an unreadable quant_config.json)"
        if not overwrite:
            raise UserError(f"output {output} already exists{what}; choose another --output or pass --overwrite")
    parent = output.resolve().parent
    while not parent.exists():
        parent = parent.parent
    try:  # a real probe: permission bits say nothing for root or read-only mounts
        if not parent.is_dir():
            raise NotADirectoryError(f"{parent} is not a directory")
        tempfile.TemporaryDirectory(dir=parent).cleanup()
    except OSError as e:
        raise UserError(f"output {output} is not writable: {e}") from e


def _prepare(model_path, cfg: CalibConfig):
    """(resolved path, HF config, adapter, tokenizer or None, windows or None) of a run; reads the calibration text
    only when something is learned."""
    from transformers import AutoConfig, AutoTokenizer

    validate(cfg)
    model_path = resolve_model(model_path)
    hf_config = AutoConfig.from_pretrained(model_path)
    adapter = get_adapter(hf_config.model_type)
    if cfg.let and not adapter.let_sites:
        raise UserError(f"--let: the {adapter.name} adapter declares no LET sites")
    torch.manual_seed(cfg.seed)
    tokenizer = windows = None  # RTN / LWC at its init quantizes the weights directly: no calibration text is read
    if not learns_nothing(cfg):
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        bos = config_window_bos(hf_config)
        windows = split_windows(sample_windows(load_tokens(tokenizer, cfg.calib_data, split="calib"), cfg.nsamples,
                                               cfg.seqlen, cfg.seed, bos=bos), cfg.window_split, bos)
    return model_path, hf_config, adapter, tokenizer, windows


def _weight_act(model, adapter, windows, cfg: CalibConfig, state_dir: Path):
    if cfg.let or cfg.abits < 16 or cfg.kv_bits < 16:
        from omniquant.weight_act import (
            setup_weight_act,  # LET + activation quantization (its own module)
        )

        return setup_weight_act(model, adapter, windows, cfg, state_dir)
    return None


def _quant_config(cfg: CalibConfig, model_type: str, model_path, result, wall: float, weight_act) -> dict:
    nan_blocks = [b["block"] for b in result.block_log if b.get("nan")]
    quant_config = {
        "wbits": cfg.wbits, "abits": cfg.abits, "kv_bits": cfg.kv_bits, "group_size": cfg.group_size,
        "symmetric": cfg.symmetric, "lwc": cfg.lwc, "let": cfg.let,
        "recipe": resolve_recipe(cfg.recipe, cfg.wbits).name,
        "clip_init": resolve_clip_init(cfg),
        "model_type": model_type, "source_model": str(model_path),
        "calibration": {**cfg.to_dict(), "matmul_dtype": matmul_dtype(cfg, torch.device(cfg.device)),
                        "wall_time_s": round(wall, 2), "nan_blocks": nan_blocks,
                        "block_log": result.block_log},
    }
    if weight_act is not None:
        from omniquant.weight_act import (
            export_entry,  # act-quant settings; offsets go to act_params.safetensors
        )

        quant_config.update(export_entry(cfg))
    return quant_config


def quantize_in_memory(model_path, cfg: CalibConfig, state_dir: Path, resume: bool = False, streams: str = "auto"):
    """Calibrate `model_path` held whole in memory in float32 (small models; the reference the lazy path of
    `calibrate_checkpoint` is tested against). Returns (quantized model, tokenizer, quant_config dict, qparams)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_path, hf_config, adapter, tokenizer, windows = _prepare(model_path, cfg)
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.eval()
    model.config.use_cache = False

    state = RunState(state_dir, cfg, model_path)
    wa = _weight_act(model, adapter, windows, cfg, state.path)
    t0 = time.time()
    result = calibrate_model(model, adapter, windows, cfg, state, resume=resume,
                             make_let=wa and wa.make_let, act_quantizer_factory=wa and wa.act_factory,
                             streams=streams, fp_observer=wa and wa.observe)
    if wa is not None:
        wa.finish()
    e2e = None
    if cfg.e2e_epochs:  # the float model's last hidden states: the end of the block loop's fp stream, then the tail
        targets = final_hidden(model, adapter.blocks(model), windows, result.fp_out)
        e2e = tune_scales(model, result.qparams, windows, targets, cfg)
    quant_config = _quant_config(cfg, hf_config.model_type, model_path, result, time.time() - t0, wa)
    if e2e is not None:
        quant_config["calibration"]["e2e"] = e2e
    model.config.use_cache = True
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer, quant_config, result.qparams


def source_dtypes(model_path) -> dict[str, torch.dtype]:
    """Stored dtype of every tensor of a safetensors checkpoint (for save_fakequant of an in-memory model)."""
    from omniquant.safetensors_io import SafetensorsDir

    reader = SafetensorsDir(resolve_model(model_path))
    return {n: reader.dtype(n) for n in reader.names()}


def calibrate_checkpoint(model_path, output, *, overwrite: bool = False, resume: str | Path | None = None,
                         streams: str = "auto", max_shard_bytes: int | None = None, **settings) -> Path:
    """Calibrate `model_path` with CalibConfig(**settings) and write the fake-quant checkpoint to `output`.

    Bounded memory: the checkpoint is opened lazily (omniquant.lazy_model) and each decoder block is read in its
    stored dtype, calibrated in float32 on cfg.device, written out in its stored dtype and freed before the next;
    the output is planned up front and filled block by block inside a temporary directory, renamed when complete.
    Learned parameters are kept per block in `resume` (default `<output>.state`) until the export succeeds.
    streams: where the activation streams live (auto / memory / disk, see omniquant.streams).
    """
    from omniquant.atomic import atomic_dir, remove_stale_temps
    from omniquant.export import FakeQuantWriter, quant_config_entry, write_metadata
    from omniquant.lazy_model import LazyBlocks, LazyCheckpoint
    from omniquant.safetensors_io import MAX_SHARD_BYTES
    from omniquant.weight_act import collect_offsets

    cfg = CalibConfig(**settings)
    validate(cfg)
    output = Path(output)
    check_output(output, overwrite)
    state_dir = Path(resume) if resume else output.with_name(output.name + ".state")
    model_path, hf_config, adapter, _, windows = _prepare(model_path, cfg)
    ckpt = LazyCheckpoint(model_path)
    check_fits(sum(math.prod(shape) for _, shape in ckpt.specs.values()), hf_config.get_text_config().hidden_size, cfg)
    linears = [f"{adapter.blocks_path}.{i}.{lin}" for i in range(len(adapter.blocks(ckpt.model)))
               for lin in adapter.linears]
    remove_stale_temps(output)
    state = RunState(state_dir, cfg, model_path)
    with atomic_dir(output, overwrite=overwrite) as tmp:
        writer = FakeQuantWriter(tmp, ckpt.specs, linears, cfg.wbits, cfg.group_size, cfg.symmetric,
                                 max_shard_bytes or MAX_SHARD_BYTES)
        try:
            prefix = adapter.blocks_path + "."
            for name in ckpt.specs:  # embeddings, final norm, lm_head: copied as stored, one at a time
                if not name.startswith(prefix):
                    writer.write(name, ckpt.reader.get(name))
            wa = _weight_act(ckpt.model, adapter, windows, cfg, state.path)
            offsets: dict[str, torch.Tensor] = {}

            def sink(i, block_prefix, block, result):
                mine = {n: result.qparams.pop(n) for n in list(result.qparams) if n.startswith(block_prefix + ".")}
                writer.write_module(block_prefix, block, mine)
                offsets.update({f"{block_prefix}.{k}": v for k, v in collect_offsets(block).items()})

            blocks = LazyBlocks(ckpt, adapter, torch.device(cfg.device), sink)
            t0 = time.time()
            result = calibrate_model(ckpt.model, adapter, windows, cfg, state, resume=resume is not None,
                                     make_let=wa and wa.make_let, act_quantizer_factory=wa and wa.act_factory,
                                     blocks=blocks, streams=streams, fp_observer=wa and wa.observe)
            if wa is not None:
                wa.finish()
            writer.close()
        except BaseException:
            writer.abort()
            raise
        quant_config = _quant_config(cfg, hf_config.model_type, model_path, result, time.time() - t0, wa)
        hf_config.use_cache = True
        hf_config.dtype = ckpt.dominant_dtype(adapter)
        write_metadata(tmp, hf_config, quant_config_entry(quant_config, linears, writer), offsets, model_path)
        if cfg.e2e_epochs:
            refine_checkpoint(tmp, windows, cfg, adapter.blocks_path, result.fp_out)
    shutil.rmtree(state_dir, ignore_errors=True)
    return output
