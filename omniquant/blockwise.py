"""Block-wise OmniQuant calibration (OmniQuant §3.1).

For decoder block i, with X_fp the full-precision stream and X_q the quantized stream (outputs of the already
quantized blocks 0..i-1):

    target = F_i(X_fp)                          (full-precision block on the fp stream)
    minimise  MSE(F_i^q(X_q; Θ), target)       (+ MSE(F_i^q(X_q), F_i(X_q)) with aug_loss)
    over Θ = the recipe's quantizer parameters (LWC logits; + rounding offsets; Block-AP's scale, zero and weight
    deltas: --recipe, quant/recipes.py) and LET scales/shifts; AdamW on mini-batches, `epochs` passes (block_train.py).

Then the learned transform is fused into the weights (quantized in place), X_fp <- target, X_q <- F_i^q(X_q).
Learned parameters of each finished block are saved atomically, so a killed run resumes bit for bit.

When nothing is learned (RTN, or LWC at its init: see `learns_nothing`) the weights are quantized directly, without
capturing inputs or running the streams; the result is the same bit for bit.

Memory: blocks come from a block source (`ModelBlocks`: a model in memory; `omniquant.lazy_model.LazyBlocks`: read
from disk in the stored dtype and written out when finished), one block on the calibration device at a time, its
kwargs moved there only while it runs. The streams are float32 [n, L, H] on the device, in RAM or in files
(`omniquant.streams`), advanced in place window by window.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from omniquant.atomic import atomic_write
from omniquant.block_train import (
    LET_ATTR,
    learned_state,
    resolve_amp,
    set_learned,
    train_block,
)
from omniquant.capture import block_forward, capture_block_inputs
from omniquant.config import CalibConfig
from omniquant.errors import UserError
from omniquant.models.base import Adapter
from omniquant.quant.clip_init import STAT_WINDOWS, init_clipping, input_second_moments
from omniquant.quant.norm_gain import attach_norm_gains, bake_norm_gains
from omniquant.quant.qlinear import QuantLinear, replace_linears, restore_linears
from omniquant.quant.recipes import resolve_clip_init, resolve_recipe
from omniquant.quant.spec import WeightQuantSpec
from omniquant.streams import StreamFactory


@dataclass
class CalibResult:
    """Per quantized linear (full module name): (scales float32 [N, G], zeros int32 [N, G]); per block a log;
    with --e2e-epochs the last block's full-precision output float32 [n, L, H] on the CPU (the end of the fp
    stream: the float model's hidden states before its final norm, the e2e stage's targets)."""

    qparams: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    block_log: list[dict] = field(default_factory=list)
    fp_out: torch.Tensor | None = None


class RunState:
    """Resume directory: run.json (settings) + block_XXXX.safetensors (learned parameters of finished blocks)."""

    def __init__(self, path: Path, cfg: CalibConfig, model_path: str):
        self.path = Path(path)
        self.identity = {"model": str(Path(model_path).resolve()), **cfg.run_identity()}

    def open(self, resume: bool) -> int:
        """Create or check the directory; returns the number of finished blocks."""
        run_json = self.path / "run.json"
        if resume:
            if not run_json.exists():
                raise UserError(f"--resume {self.path}: no run.json there (not a calibration state directory)")
            saved = json.loads(run_json.read_text())
            diff = {k: (saved.get(k), v) for k, v in self.identity.items() if saved.get(k) != v}
            if diff:
                raise UserError(f"--resume {self.path} holds a different run; differing settings (saved, now): {diff}")
        else:
            if self.path.exists() and any(self.path.iterdir()):
                raise UserError(
                    f"{self.path} holds the state of an unfinished run: pass --resume {self.path} to continue it, "
                    "or delete the directory"
                )
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write(run_json, lambda p: Path(p).write_text(json.dumps(self.identity, indent=2)))
        done = 0
        while (self.block_file(done)).exists():
            done += 1
        return done

    def block_file(self, i: int) -> Path:
        return self.path / f"block_{i:04d}.safetensors"

    def save_block(self, i: int, tensors: dict[str, torch.Tensor], log: dict) -> None:
        meta = {"log": json.dumps(log)}
        atomic_write(self.block_file(i), lambda p: save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(p), meta))

    def load_block(self, i: int) -> tuple[dict[str, torch.Tensor], dict]:
        from safetensors import safe_open

        with safe_open(str(self.block_file(i)), "pt") as f:
            log = json.loads(f.metadata()["log"])
        return load_file(str(self.block_file(i))), log


@torch.no_grad()
def _fuse(block: nn.Module, qlinears: dict[str, QuantLinear], let, prefix: str, result: CalibResult) -> None:
    """Fold norm gains and LET into weights/norms, quantize every linear in place, record its scales/zeros, restore
    nn.Linear."""
    bake_norm_gains(block)
    if let is not None:
        let.fuse()
        delattr(block, LET_ATTR)
    for name, q in qlinears.items():
        w_fq, scales, zeros = q.wquant.export(q.weight)
        q.linear.weight.data.copy_(w_fq.to(q.linear.weight.dtype))
        if q.temp_bias is not None:
            q.linear.bias = nn.Parameter(q.temp_bias.detach().clone(), requires_grad=False)
        result.qparams[f"{prefix}.{name}"] = (scales.cpu(), zeros.cpu())
    restore_linears(block, qlinears)


@torch.no_grad()
def _run_stream(block, stream, kwargs, amp: bool, out=None) -> None:
    """out[j] = F(stream[j]) window by window (batch 1); in place when `out` is None (windows are independent).
    amp: the matmuls run in bfloat16 as the training steps' do (block_train.resolve_amp); the stream stays float32."""
    out = stream if out is None else out
    with torch.autocast(stream.device.type, dtype=torch.bfloat16, enabled=amp):
        for j in range(stream.shape[0]):
            out[j : j + 1] = block_forward(block, stream[j : j + 1], kwargs).float()


def _to(v, device):
    """Move tensors, also inside tuples (Llama's position_embeddings = (cos, sin)), to device."""
    if isinstance(v, torch.Tensor):
        return v.to(device)
    if isinstance(v, tuple):
        return tuple(_to(x, device) for x in v)
    return v


# Tests set this to False to force the block-wise path where the direct one would apply (they must agree exactly).
_DIRECT_PATH = True


def learns_nothing(cfg: CalibConfig) -> bool:
    """True when calibration has nothing to learn or to apply besides the weight quantizer at its init: no training
    (epochs 0, or recipe lwc with --no-lwc; every recipe starts at LWC's init or round-to-nearest), no LET,
    weight-only (no activation / KV quantizers), no end-to-end stage (--e2e-epochs takes its targets from the end of
    the block loop's fp stream). Then a block's quantized weights depend on its own float weights only (aug_loss
    changes a loss that is never minimised), so the calibration windows are not needed and the block inputs are
    neither captured nor streamed through the blocks."""
    return (_DIRECT_PATH and (cfg.epochs == 0 or (not cfg.lwc and resolve_recipe(cfg.recipe, cfg.wbits).name == "lwc"
                                                  and not cfg.norm_gains))
            and not cfg.let and cfg.abits == 16 and cfg.kv_bits == 16 and not cfg.e2e_epochs)


def _quant_linears(block: nn.Module, adapter: Adapter, spec: WeightQuantSpec, cfg: CalibConfig,
                   act_quantizer_factory=None) -> dict[str, QuantLinear]:
    """Swap the block's linears for QuantLinears with the recipe's weight quantizer (its clipping is started by
    `start_clipping`)."""
    recipe = resolve_recipe(cfg.recipe, cfg.wbits)
    qlinears = replace_linears(block, adapter.linears, lambda lin: QuantLinear(
        lin, spec, quantizer=recipe.make(tuple(lin.weight.shape), spec, lwc=cfg.lwc)))
    if act_quantizer_factory is not None:
        for name, q in qlinears.items():
            q.act_quantizer = act_quantizer_factory(name)
    return qlinears


def start_clipping(block: nn.Module, qlinears: dict[str, QuantLinear], cfg: CalibConfig, inputs=None,
                   kwargs=None, amp: bool = False) -> None:
    """Start every learned clipping of the block at `resolve_clip_init(cfg)` (quant/clip_init.py); `act` weighs
    the search by the linears' input second moments over the first STAT_WINDOWS windows of `inputs` (the block's
    calibration input [n, L, H], on the block's device). This start is what `learns_nothing` quantizes with."""
    if not any(q.wquant.learns_clipping() for q in qlinears.values()):
        return
    kind = resolve_clip_init(cfg)
    moments = {}
    if kind == "act":
        n = min(STAT_WINDOWS, inputs.shape[0])
        with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=amp):
            moments = input_second_moments(
                qlinears, lambda: [block_forward(block, inputs[j : j + 1], kwargs) for j in range(n)])
    for name, q in qlinears.items():
        init_clipping(q.wquant, q.weight, kind, moments.get(name))


class ModelBlocks:
    """The decoder blocks of a model held in memory, each moved to the calibration device while it is calibrated.

    The block loop only calls load(i) -> block on the device (float32), finish(i, block, result) and capture()
    (a context in which block 0's inputs can be captured); omniquant.lazy_model.LazyBlocks reads blocks from disk
    instead and writes each finished one out."""

    def __init__(self, model: nn.Module, adapter: Adapter, device: torch.device):
        self.blocks, self.device = adapter.blocks(model), torch.device(device)

    def __len__(self) -> int:
        return len(self.blocks)

    def load(self, i: int) -> nn.Module:
        return self.blocks[i].to(self.device)

    def finish(self, i: int, block: nn.Module, result: CalibResult) -> None:
        self.blocks[i] = block.to("cpu") if self.device.type != "cpu" else block

    def capture(self):
        return contextlib.nullcontext()


def _kill_hook(i: int) -> None:
    """Test hook: simulate a crash after block i (OMNIQUANT_TEST_KILL_AFTER_BLOCK=i)."""
    kill_after = os.environ.get("OMNIQUANT_TEST_KILL_AFTER_BLOCK")
    if kill_after is not None and int(kill_after) == i:
        os.kill(os.getpid(), signal.SIGKILL)


def calibrate_model(model: nn.Module, adapter: Adapter, windows: torch.Tensor | None, cfg: CalibConfig,
                    state: RunState, resume: bool = False, make_let=None, act_quantizer_factory=None,
                    blockwise: bool = False, blocks=None, streams: str = "auto", fp_observer=None) -> CalibResult:
    """Quantize `model` block by block. windows: LongTensor [nsamples, seqlen] (may be None when
    `learns_nothing(cfg)`: then the weights are quantized directly, with the same result bit for bit, unless
    `blockwise` asks for the block-wise loop anyway, e.g. to time its fixed costs in bench.calib_speed).

    blocks: where the blocks come from and go to (default ModelBlocks: `model`'s own, quantized in place;
    omniquant.lazy_model.LazyBlocks: read from disk, written out, freed). streams: where the activation streams
    live (omniquant.streams: auto / memory / disk). fp_observer(block, i) -> context manager active while block i
    runs on the full-precision stream (activation statistics for LET are collected there).

    make_let(block, qlinears, cfg, block_index) -> LET nn.Module or None. It is attached to the block as
    `LET_ATTR` during calibration and must offer apply_temporary() (set the QuantLinears' temp_weight/temp_bias
    from the current scales/shifts, before each forward) and fuse() (fold into norms/weights for good);
    act_quantizer_factory(name) -> activation quantizer module or None (weight-activation runs).
    """
    blocks = blocks if blocks is not None else ModelBlocks(model, adapter, torch.device(cfg.device))
    if not blockwise and learns_nothing(cfg) and make_let is None and act_quantizer_factory is None:
        return _quantize_directly(blocks, adapter, cfg, state, resume)
    if windows is None:
        raise ValueError("calibrate_model: this configuration learns parameters and needs calibration windows")
    return _calibrate_blockwise(model, blocks, adapter, windows, cfg, state, resume, make_let, act_quantizer_factory,
                                streams, fp_observer)


def _quantize_directly(blocks, adapter: Adapter, cfg: CalibConfig, state: RunState, resume: bool) -> CalibResult:
    """The nothing-learned case (RTN, or LWC at its init): quantize every block's linears from their own weights.

    No per-block state is saved: a killed run redoes all blocks on --resume (cheap, deterministic); the state
    directory is still opened, so a stale or mismatched one is refused exactly as on the block-wise path.
    """
    device = torch.device(cfg.device)
    spec = WeightQuantSpec(cfg.wbits, cfg.group_size, cfg.symmetric)
    state.open(resume)
    result = CalibResult()
    for i in tqdm(range(len(blocks)), desc="blocks (direct)"):
        block = blocks.load(i)
        block.requires_grad_(False)
        qlinears = _quant_linears(block, adapter, spec, cfg)
        block.to(device)
        start_clipping(block, qlinears, cfg)
        _fuse(block, qlinears, None, f"{adapter.blocks_path}.{i}", result)
        # the same log as the block-wise path gives an untrained block
        result.block_log.append({"block": i, "epoch_loss": [], "nan": None})
        blocks.finish(i, block, result)
        _kill_hook(i)
    return result


def _calibrate_blockwise(model, blocks, adapter, windows, cfg, state, resume, make_let, act_quantizer_factory,
                         streams, fp_observer) -> CalibResult:
    """The OmniQuant loop (module docstring): capture block 0's inputs, then train and quantize block by block.

    Streams (float32 [n, L, H]): `fp` holds X_fp and, after block i's full-precision pass, its target F_i(X_fp);
    `q` holds X_q and is advanced in place after block i is quantized; `aug` (aug_loss only) holds F_i(X_q)."""
    device = torch.device(cfg.device)
    amp = resolve_amp(cfg, device)
    spec = WeightQuantSpec(cfg.wbits, cfg.group_size, cfg.symmetric)
    done = state.open(resume)
    shape = (windows.shape[0], windows.shape[1], model.config.get_text_config().hidden_size)
    factory = StreamFactory(shape, device, streams, scratch=state.path / "streams", count=3 if cfg.aug_loss else 2)
    try:
        fp = factory.new()
        with blocks.capture():
            _, block_kwargs = capture_block_inputs(model, adapter.blocks(model), windows, into=fp)
        q = factory.copy(fp)
        aug = factory.new() if cfg.aug_loss else None
        result = CalibResult()
        for i in tqdm(range(len(blocks)), desc="blocks"):
            block = blocks.load(i)
            block.requires_grad_(False)
            kwargs = {k: _to(v, device) for k, v in block_kwargs[i].items()}
            prefix = f"{adapter.blocks_path}.{i}"
            with fp_observer(block, i) if fp_observer is not None else contextlib.nullcontext():
                _run_stream(block, fp, kwargs, amp)  # fp now holds the target F_i(X_fp), the next block's input
            if aug is not None:
                _run_stream(block, q, kwargs, amp, out=aug)
            qlinears = _quant_linears(block, adapter, spec, cfg, act_quantizer_factory)
            let = make_let(block, qlinears, cfg, i) if make_let is not None else None
            if let is not None:
                setattr(block, LET_ATTR, let)
            if cfg.norm_gains:
                attach_norm_gains(block, adapter)
            block.to(device)  # the quantizers' and LET's new parameters too
            if i >= done:  # (a resumed block gets its learned state below)
                start_clipping(block, qlinears, cfg, q, kwargs, amp)
            if i < done:
                learned, log = state.load_block(i)
                set_learned(block, learned)
            else:
                log = train_block(block, q, fp, aug, kwargs, cfg, let, f"block {i}")
            if i >= done:
                state.save_block(i, learned_state(block), log)
            _fuse(block, qlinears, let, prefix, result)
            log = {"block": i, **log}
            result.block_log.append(log)
            _run_stream(block, q, kwargs, amp)
            blocks.finish(i, block, result)
            del block, kwargs
            _kill_hook(i)
        if cfg.e2e_epochs:
            result.fp_out = fp[0 : shape[0]].to("cpu", copy=True)
        return result
    finally:
        factory.close()
