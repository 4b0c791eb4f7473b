"""Optimise one decoder block's learnable parameters (LWC logits, LET scales/shifts) against its target output.

    loss = MSE(F^q(X_q), target)  (+ MSE(F^q(X_q), aug_target) with aug_loss),  AdamW, `batch_size` windows a step.

A non-finite loss restores the last finite parameters and stops this block's training (recorded in the log).
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from omniquant.capture import block_forward
from omniquant.config import CalibConfig

# A block's LET module is attached under this attribute while it is calibrated, so its parameters are saved,
# restored and optimised together with the LWC logits (second AdamW group, lr let_lr).
LET_ATTR = "omniquant_let"


def learned_state(block: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in block.named_parameters() if p.requires_grad}


def set_learned(block: nn.Module, values: dict[str, torch.Tensor]) -> None:
    params = dict(block.named_parameters())
    with torch.no_grad():
        for n, v in values.items():
            params[n].copy_(v)


def train_block(block, q_inps, fp_outs, aug_outs, kwargs, cfg: CalibConfig, let, bar_desc: str) -> dict:
    """Optimise the block's learnable parameters in place; returns a log (losses, NaN event)."""
    learnable = [(n, p) for n, p in block.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in learnable if not n.startswith(LET_ATTR)], "lr": cfg.lwc_lr},
        {"params": [p for n, p in learnable if n.startswith(LET_ATTR)], "lr": cfg.let_lr},
    ]
    groups = [g for g in groups if g["params"]]
    log = {"epoch_loss": [], "nan": None}
    if not groups or cfg.epochs == 0:
        return log
    opt = torch.optim.AdamW(groups, weight_decay=cfg.wd)
    cuda = q_inps.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if cuda else None
    last_good = learned_state(block)
    n_steps = q_inps.shape[0] // cfg.batch_size
    bar = tqdm(range(cfg.epochs), desc=bar_desc, leave=False)
    for epoch in bar:
        total = 0.0
        for j in range(n_steps):
            sl = slice(j * cfg.batch_size, (j + 1) * cfg.batch_size)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                if let is not None:
                    let.apply_temporary()
                out = block_forward(block, q_inps[sl], kwargs)
                loss = torch.nn.functional.mse_loss(out.float(), fp_outs[sl])
                if aug_outs is not None:
                    loss = loss + torch.nn.functional.mse_loss(out.float(), aug_outs[sl])
            if not torch.isfinite(loss):
                set_learned(block, last_good)
                log["nan"] = {"epoch": epoch, "step": j}
                tqdm.write(f"{bar_desc}: non-finite loss at epoch {epoch} step {j}; restored last finite parameters")
                return log
            last_good = learned_state(block)
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            total += float(loss.detach())
        log["epoch_loss"].append(total / max(n_steps, 1))
        bar.set_postfix(loss=f"{log['epoch_loss'][-1]:.3e}")
    # the parameters after the last step were never evaluated; check them once
    with torch.no_grad():
        if let is not None:
            let.apply_temporary()
        probe = block_forward(block, q_inps[: cfg.batch_size], kwargs)
    if not torch.isfinite(probe).all():
        set_learned(block, last_good)
        log["nan"] = {"epoch": cfg.epochs, "step": "final"}
    return log
