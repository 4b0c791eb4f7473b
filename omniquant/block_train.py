"""Optimise one decoder block's learnable parameters (the recipe's quantizer parameters, LET scales/shifts) against
its target output:

    loss = MSE(F^q(X_q[b]), target[b])  (+ MSE(F^q(X_q[b]), aug_target[b]) with aug_loss)

over mini-batches b of `batch_size` windows (fixed consecutive slices, `epochs` passes), AdamW (betas (beta1,
0.999), beta1 0.5 by default) with one parameter group per learning-rate group (quant/recipes.py LR_GROUPS).
Budget-aware rates: with S = epochs * nsamples / batch_size steps and schedule factors f_t (linear: 1 - t/S,
cosine: (1 + cos(pi t / S)) / 2, constant: 1), a group with rate constant c gets the peak rate c / sqrt(sum_t f_t)
unless its --<group>-lr is given.

The block keeps the parameters after the last step (the rate has decayed to 0 there). Keep-best (AutoRound's rule,
opt-in): the parameters that gave the lowest step loss are kept instead, the state after the last step scored on
the first batch; off by default, because a step's loss on its own batch ranks the batches' difficulty as much as
the parameters (at one window per step it mostly picks a step on the easiest window). A non-finite loss stops this
block's training and restores the last finite parameters (the best finite ones with keep-best); both are recorded
in the log. Optimizer state lives and dies with the block.

Mixed precision (`amp`, resolve_amp): the forward and backward matmuls of a step run in bfloat16 under autocast, as
AutoRound's CPU default does, and so do the block forwards that advance the fp and q streams (blockwise._run_stream:
the targets are then the float block computed with bfloat16 matmuls, as AutoRound's bfloat16 model computes its
own); the fake-quantizers, the loss, the optimizer state and the stored streams stay float32, so the export is
exact either way. On a CPU with native bf16 dot products a step takes about half the time (SmolLM2 block at
W3g128, Zen 5, 1 thread: 0.17-0.20 -> 0.09-0.12 s); validation perplexity in bench/README.md "Mixed precision on
CPU" and "Calibration time".
"""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm import tqdm

from omniquant.capture import block_forward
from omniquant.config import CalibConfig
from omniquant.quant.recipes import LR_GROUPS, lr_group

# A block's LET module is attached under this attribute while it is calibrated, so its parameters are saved,
# restored and optimised together with the quantizers' (its own AdamW group, lr let_lr).
LET_ATTR = "omniquant_let"
SCHEDULES = ("linear", "cosine", "constant")
AMP_CHOICES = ("auto", "bf16", "off")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX); elsewhere torch emulates it, slower
    than float32."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_amp(cfg: CalibConfig, device: torch.device) -> bool:
    """True when a block's training matmuls run in bfloat16: `bf16`, or `auto` on CUDA, or on a native-bf16 CPU
    for a weight-only run (activation quantizers would see bfloat16 inputs; measured for weight-only runs only)."""
    if cfg.amp not in AMP_CHOICES:
        raise ValueError(f"amp must be one of {AMP_CHOICES}, got {cfg.amp!r}")
    if cfg.amp == "auto":
        weight_only = cfg.abits == 16 and cfg.kv_bits == 16
        return device.type == "cuda" or (device.type == "cpu" and weight_only and cpu_has_native_bf16())
    return cfg.amp == "bf16"


def matmul_dtype(cfg: CalibConfig, device: torch.device) -> str:
    """The training matmuls' dtype as recorded in the block log and quant_config.json."""
    return "bfloat16" if resolve_amp(cfg, device) else "float32"


def learned_state(block: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in block.named_parameters() if p.requires_grad}


def set_learned(block: nn.Module, values: dict[str, torch.Tensor]) -> None:
    params = dict(block.named_parameters())
    with torch.no_grad():
        for n, v in values.items():
            params[n].copy_(v)


def schedule_factors(n_steps: int, kind: str) -> list[float]:
    """Learning-rate factor of each step t = 0..n_steps-1 (1 at t = 0; linear/cosine reach 0 after the last)."""
    if kind not in SCHEDULES:
        raise ValueError(f"lr schedule must be one of {SCHEDULES}, got {kind!r}")
    if kind == "linear":
        return [1 - t / n_steps for t in range(n_steps)]
    if kind == "cosine":
        return [0.5 * (1 + math.cos(math.pi * t / n_steps)) for t in range(n_steps)]
    return [1.0] * n_steps


def peak_lr(group: str, cfg: CalibConfig, factors: list[float]) -> float:
    """The group's --<group>-lr when given, else its rate constant / sqrt(sum of the schedule factors)."""
    g = LR_GROUPS[group]
    explicit = getattr(cfg, g.field)
    if explicit is not None:
        return float(explicit)
    return g.default_lr if g.rate is None else g.rate / math.sqrt(sum(factors))


def param_groups(block: nn.Module, cfg: CalibConfig, factors: list[float]) -> list[dict]:
    """AdamW parameter groups: one per learning-rate group present in the block, with its peak lr."""
    by_group: dict[str, list] = {}
    for n, p in block.named_parameters():
        if p.requires_grad:
            by_group.setdefault("let" if n.startswith(LET_ATTR) else lr_group(n), []).append(p)
    return [{"params": ps, "lr": peak_lr(g, cfg, factors), "name": g} for g, ps in by_group.items()]


def _loss(block, x, target, aug, kwargs, let, amp: bool) -> torch.Tensor:
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        if let is not None:
            let.apply_temporary()
        out = block_forward(block, x, kwargs)
        loss = torch.nn.functional.mse_loss(out.float(), target)
        if aug is not None:
            loss = loss + torch.nn.functional.mse_loss(out.float(), aug)
    return loss


def train_block(block, q_inps, fp_outs, aug_outs, kwargs, cfg: CalibConfig, let, bar_desc: str) -> dict:
    """Optimise the block's learnable parameters in place; returns a log (epoch losses, peak lrs, best step, NaN)."""
    log = {"epoch_loss": [], "nan": None}
    amp = resolve_amp(cfg, q_inps.device)
    batches_per_epoch = q_inps.shape[0] // cfg.batch_size
    n_steps = cfg.epochs * batches_per_epoch
    if n_steps == 0 or not any(p.requires_grad for p in block.parameters()):
        return log
    factors = schedule_factors(n_steps, cfg.lr_schedule)
    groups = param_groups(block, cfg, factors)
    log["lr"] = {g["name"]: g["lr"] for g in groups}
    log["matmul_dtype"] = matmul_dtype(cfg, q_inps.device)
    # fused: one kernel per step over all parameters; torch's default on CPU loops over tensors with ~10 ops each
    # (SmolLM2 Block-AP step: 14 -> 5 ms of a 70-110 ms step)
    opt = torch.optim.AdamW(groups, betas=(cfg.beta1, 0.999), weight_decay=cfg.wd, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: factors[t] if t < n_steps else 0.0)
    scaler = torch.amp.GradScaler("cuda") if amp and q_inps.device.type == "cuda" else None

    def batch(j):
        sl = slice(j * cfg.batch_size, (j + 1) * cfg.batch_size)
        return q_inps[sl], fp_outs[sl], None if aug_outs is None else aug_outs[sl]

    kept, kept_loss, kept_step = None, math.inf, None  # keep-best: best so far; else: last finite

    def keep(loss: float, step) -> None:
        nonlocal kept, kept_loss, kept_step
        if not cfg.keep_best or loss <= kept_loss:
            kept, kept_loss, kept_step = learned_state(block), loss, step

    def stop(where) -> dict:
        set_learned(block, kept)
        log["nan"] = where
        tqdm.write(f"{bar_desc}: non-finite loss at {where}; restored the "
                   f"{'best' if cfg.keep_best else 'last'} finite parameters (step {kept_step})")
        return log

    step = 0
    bar = tqdm(range(cfg.epochs), desc=bar_desc, leave=False)
    for epoch in bar:
        total = 0.0
        for j in range(batches_per_epoch):
            loss = _loss(block, *batch(j), kwargs, let, amp)
            if not torch.isfinite(loss):
                if kept is None:  # the very first loss: nothing finite to go back to but the start
                    kept, kept_step = learned_state(block), 0
                return stop({"epoch": epoch, "step": j})
            keep(float(loss.detach()), step)
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            sched.step()
            step += 1
            total += float(loss.detach())
        log["epoch_loss"].append(total / batches_per_epoch)
        bar.set_postfix(loss=f"{log['epoch_loss'][-1]:.3e}")
    # the parameters after the last step were never evaluated: score them on the first batch
    with torch.no_grad():
        final = _loss(block, *batch(0), kwargs, let, amp)
    if not torch.isfinite(final):
        return stop({"epoch": cfg.epochs, "step": "final"})
    keep(float(final), step)
    set_learned(block, kept)
    if cfg.keep_best:
        log["best"] = {"step": kept_step, "of": n_steps, "loss": kept_loss}
    return log
