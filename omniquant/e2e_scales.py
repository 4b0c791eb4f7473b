"""End-to-end scale tuning after the block loop (EfficientQAT's E2E-QP), `--e2e-epochs`: the integer codes and zero
points stay fixed and each group's scale takes a learned log-factor, trained so that the whole quantized model's
next-token distribution matches the float model's:

    W = (q - z) * s * exp(a),     q, z fixed integers [N, K] / [N, G];  s [N, G] the block loop's fp16 scale;  a = 0 init
    loss = mean over tokens of KL(p_fp || p_q),   p = softmax(lm_head(h)),  h the model's last hidden state (after
           its final norm), h_fp computed once by the float model on the same windows

over the calibration windows (the block loop's own, one window per step, in a seeded order), AdamW on a only, the
run's schedule (--lr-schedule) and bfloat16 matmuls where --amp gives them. At the end s' = fp16(s * exp(a)) and the
stored weight is (q - z) * s', so the export stays exact (codes unchanged, `dequantize(pack(w)) == w`). The block
loop fits each block to its float output from quantized inputs; this stage fits what is left between the blocks
(errors that add up through the model), where 2-bit models lose most (bench/README.md, "End-to-end scales").

Distillation, not EfficientQAT's next-token cross-entropy on the text: cross-entropy also fits the model to the
calibration text (W4 fell below the float model's perplexity on other books of the same author), which is
fine-tuning, not fidelity. The embedding and lm_head are not quantized, so lm_head(h_fp) is the float model's logits.

A non-finite loss stops the stage with the last finite scales. It holds the whole model in float32 (plus one byte
per weight for the codes) on the calibration device: `check_fits` refuses runs that would not fit in memory.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm import tqdm

from omniquant.block_train import peak_lr, resolve_amp, schedule_factors
from omniquant.config import CalibConfig
from omniquant.errors import UserError
from omniquant.quant.codes import recompute_codes, stored_weight
from omniquant.quant.spec import from_groups, to_groups
from omniquant.streams import memory_budget


class GroupScaleDequant(nn.Module):
    """A linear's weight [N, K] = from_groups((q - z) * s * exp(a)): codes q uint8 [N, G, gs] (edge-padded groups),
    zeros z and fp16-exact scales s float32 [N, G] (buffers), the learned log-factor a float32 [N, G]."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int):
        super().__init__()
        self.k = codes.shape[1]
        self.register_buffer("codes", to_groups(codes, group_size).to(torch.uint8))
        self.register_buffer("scales", scales.float())
        self.register_buffer("zeros", zeros.float())
        self.log_factor = nn.Parameter(torch.zeros_like(self.scales))

    def scale(self) -> torch.Tensor:
        return self.scales * torch.exp(self.log_factor)

    def weight(self, scale: torch.Tensor) -> torch.Tensor:
        return from_groups((self.codes.float() - self.zeros[..., None]) * scale[..., None], self.k)

    def forward(self, _original: torch.Tensor) -> torch.Tensor:
        return self.weight(self.scale())


def _logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The causal LM's logits from its last hidden state (lm_head, then Gemma's final soft-capping where set)."""
    out = model.get_output_embeddings()(hidden)
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    return torch.tanh(out / cap) * cap if cap else out


@torch.no_grad()
def fp_hidden(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """The float model's last hidden states (after its final norm) float32 [n, L, H] on the CPU, window by window."""
    device = next(model.parameters()).device
    return torch.cat([model.base_model(windows[j : j + 1].to(device), use_cache=False).last_hidden_state.float().cpu()
                      for j in range(windows.shape[0])])


def _loss(model: nn.Module, ids: torch.Tensor, target: torch.Tensor, amp: bool) -> torch.Tensor:
    """Mean over the tokens of ids [1, L] of KL(p_fp || p_q); target: the float model's hidden states [1, L, H]."""
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = _logits(model, model.base_model(ids, use_cache=False).last_hidden_state)
    with torch.no_grad():
        ref = torch.log_softmax(_logits(model, target).float(), dim=-1)
    logp = torch.log_softmax(logits.float(), dim=-1)
    return nn.functional.kl_div(logp.flatten(0, 1), ref.flatten(0, 1), log_target=True, reduction="batchmean")


def tune_scales(model: nn.Module, qparams: dict[str, tuple[torch.Tensor, torch.Tensor]], windows: torch.Tensor,
                targets: torch.Tensor, cfg: CalibConfig, codes: dict[str, torch.Tensor] | None = None) -> dict:
    """Train the group scales of the quantized linears named in `qparams` {name: (scales [N, G], zeros [N, G])}
    end to end (module docstring) for cfg.e2e_epochs passes over windows [n, L] with the float model's hidden states
    targets [n, L, H] (`fp_hidden`); the model's weights and qparams' scales are updated in place, every other
    parameter stays as it is. codes: {name: int codes [N, K]} where the caller has them (default: recomputed from
    each weight). Returns a log: lr, loss per epoch, steps,
    the step of a non-finite loss (None)."""
    device = next(model.parameters()).device
    model.requires_grad_(False)
    gs_of = {n: (model.get_submodule(n).weight.shape[1] if cfg.group_size == -1 else cfg.group_size) for n in qparams}
    dequants = {}
    for name, (scales, zeros) in qparams.items():
        lin = model.get_submodule(name)
        q = codes[name] if codes and name in codes else recompute_codes(
            lin.weight.detach().cpu(), scales, zeros, cfg.wbits, gs_of[name], cfg.symmetric)
        dequants[name] = GroupScaleDequant(q, scales, zeros, gs_of[name]).to(device)
        parametrize.register_parametrization(lin, "weight", dequants[name], unsafe=True)
    params = [dq.log_factor for dq in dequants.values()]
    n_steps = cfg.e2e_epochs * windows.shape[0]
    factors = schedule_factors(n_steps, cfg.lr_schedule)
    lr = peak_lr("e2e", cfg, factors)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    amp = resolve_amp(cfg, device)
    log = {"lr": lr, "epoch_loss": [], "steps": n_steps, "nan": None}
    order = torch.Generator().manual_seed(cfg.seed)
    last_finite = [p.detach().clone() for p in params]
    step = 0
    try:
        bar = tqdm(total=n_steps, desc="e2e scales", leave=False)
        for _ in range(cfg.e2e_epochs):
            total = 0.0
            for j in torch.randperm(windows.shape[0], generator=order).tolist():
                loss = _loss(model, windows[j : j + 1].to(device), targets[j : j + 1].to(device), amp)
                if not torch.isfinite(loss):  # the current scales gave it: back to the last finite ones
                    log["nan"] = step
                    break
                for p, keep in zip(params, last_finite):
                    keep.copy_(p.detach())
                for g in opt.param_groups:
                    g["lr"] = lr * factors[step]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item()
                step += 1
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
            if log["nan"] is not None:
                break
            log["epoch_loss"].append(total / windows.shape[0])
        bar.close()
    finally:
        with torch.no_grad():
            if log["nan"] is not None:
                for p, keep in zip(params, last_finite):
                    p.copy_(keep)
            for name, dq in dequants.items():
                lin = model.get_submodule(name)
                s = dq.scale().half().float()  # fp16-exact, as every recipe exports
                parametrize.remove_parametrizations(lin, "weight", leave_parametrized=False)
                lin.weight.data.copy_(dq.weight(s).to(lin.weight.dtype))
                qparams[name] = (s.cpu(), dq.zeros.cpu().to(qparams[name][1].dtype))
    return log


def check_fits(n_params: int, hidden: int, cfg: CalibConfig) -> None:
    """UserError, before any calibration, when --e2e-epochs would hold more than this machine has: the model in
    float32 (4 bytes a parameter) plus codes and gradients (about 2 more) and the float model's hidden states
    (float32 [nsamples, seqlen, hidden]), on CPU against the available RAM."""
    if not cfg.e2e_epochs or cfg.device != "cpu":
        return
    need, have = 6 * n_params + 4 * cfg.nsamples * cfg.seqlen * hidden, memory_budget(torch.device("cpu"))[1]
    if need > have:
        raise UserError(f"--e2e-epochs {cfg.e2e_epochs} trains the whole model at once and needs about "
                        f"{need / 2**30:.1f} GiB of memory (float32 weights, codes, gradients, the float model's "
                        f"hidden states); {have / 2**30:.1f} GiB are available. Run with --e2e-epochs 0 (the block "
                        "loop alone keeps one block in memory)")


def refine_checkpoint(directory: Path, source: Path, windows: torch.Tensor, cfg: CalibConfig) -> dict:
    """Tune the scales of the fake-quant checkpoint in `directory` (written by the block loop from the float model
    `source`, not yet renamed into place) and overwrite its quantized weights and sidecar scales in place (same
    names, dtypes, shapes); the log goes into quant_config.json under calibration.e2e and the stage's time is added
    to calibration.wall_time_s. Returns the log."""
    from transformers import AutoModelForCausalLM

    from omniquant.export import SIDECAR_STEM
    from omniquant.safetensors_io import SafetensorsDir, overwrite_tensor

    t0 = time.time()
    qc_path = directory / "quant_config.json"
    qc = json.loads(qc_path.read_text())
    stored, side = SafetensorsDir(directory), SafetensorsDir(directory, stem=SIDECAR_STEM)
    linears = qc["quantized_linears"]
    gs = {n: stored.shape(f"{n}.weight")[1] if cfg.group_size == -1 else cfg.group_size for n in linears}
    qparams = {n: (side.get(f"{n}.scales"), side.get(f"{n}.zeros")) for n in linears}
    fp = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).to(cfg.device).eval()
    targets = fp_hidden(fp, windows)
    del fp
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).to(cfg.device).eval()
    # the block loop's codes, once (uint8: one byte a weight): from the sidecar where it keeps them, else from the
    # stored weights
    codes = {n: (side.get(f"{n}.codes") if f"{n}.codes" in side else recompute_codes(
        model.get_submodule(n).weight.detach().cpu(), *qparams[n], cfg.wbits, gs[n], cfg.symmetric)).to(torch.uint8)
        for n in linears}
    log = tune_scales(model, qparams, windows, targets, cfg, codes)
    for name in linears:
        w_name, (scales, zeros) = f"{name}.weight", qparams[name]
        overwrite_tensor(directory / stored.file_of[w_name], w_name,
                         stored_weight(codes[name], scales, zeros, gs[name], stored.dtype(w_name)))
        overwrite_tensor(directory / side.file_of[f"{name}.scales"], f"{name}.scales",
                         scales.to(side.dtype(f"{name}.scales")))
    qc["calibration"]["e2e"] = log
    qc["calibration"]["wall_time_s"] = round(qc["calibration"]["wall_time_s"] + time.time() - t0, 2)
    qc_path.write_text(json.dumps(qc, indent=2))
    return log
