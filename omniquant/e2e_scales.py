"""End-to-end scale tuning after the block loop (EfficientQAT's E2E-QP), `--e2e-epochs`: the integer codes and zero
points stay fixed and each group's scale takes a learned log-factor, trained so that the whole quantized model's
next-token distribution matches the float model's:

    W = (q - z) * s * exp(a),     q, z fixed integers [N, K] / [N, G];  s [N, G] the block loop's fp16 scale;  a = 0 init
    loss = mean over tokens of KL(p_fp || p_q),   p = softmax(lm_head(h)),  h the model's last hidden state (after
           its final norm), h_fp the float model's: the end of the block loop's fp stream (the float blocks'
           outputs on the same windows, already computed) through the model's unquantized tail

over the calibration windows (the block loop's own, one window per step, in a seeded order), AdamW on a only (the
block loop's betas, (--beta1, 0.999)), the run's schedule (--lr-schedule) and bfloat16 matmuls where --amp gives them
(the weights are then built in bfloat16 directly from bfloat16 q - z, `_ScaledCodes`). At the end s' = fp16(s * exp(a))
and the stored weight is (q - z) * s', so the export stays exact (codes unchanged, `dequantize(pack(w)) == w`). The block
loop fits each block to its float output from quantized inputs; this stage fits what is left between the blocks
(errors that add up through the model), where 2-bit models lose most (bench/README.md, "End-to-end scales").

Distillation, not EfficientQAT's next-token cross-entropy on the text: cross-entropy also fits the model to the
calibration text (W4 fell below the float model's perplexity on other books of the same author), which is
fine-tuning, not fidelity. The embedding and lm_head are not quantized, so lm_head(h_fp) is the float model's logits.

A non-finite loss stops the stage with the last finite scales. It holds the whole model in float32 (plus two bytes
per weight for q - z) on the calibration device: `check_fits` refuses runs that would not fit in memory.
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
from omniquant.capture import final_hidden
from omniquant.config import CalibConfig
from omniquant.errors import UserError
from omniquant.heap import retained_heap
from omniquant.quant.codes import recompute_codes, stored_weight
from omniquant.quant.spec import from_groups, to_groups
from omniquant.streams import memory_budget


def _split(k: int, group_size: int) -> tuple[int, int]:
    """(columns in whole groups, number of whole groups) of a row of k columns."""
    return k // group_size * group_size, k // group_size


def _scaled(cz: torch.Tensor, scale: torch.Tensor, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """W [N, K] in `dtype` with W[:, k] = cz[:, k] * scale[:, k // group_size]; the products are float32, rounded
    once into `dtype` (one pass, no group-padded or float32 weight-sized temporaries)."""
    n, k = cz.shape
    full, g = _split(k, group_size)
    out = torch.empty((n, k), dtype=dtype, device=cz.device)
    torch.mul(cz[:, :full].view(n, g, group_size), scale[:, :g, None], out=out[:, :full].view(n, g, group_size))
    if full < k:  # the ragged last group
        torch.mul(cz[:, full:], scale[:, g:], out=out[:, full:])
    return out


def _group_dot(grad: torch.Tensor, cz: torch.Tensor, group_size: int) -> torch.Tensor:
    """float32 [N, G]: sum over each group's columns of grad * cz (both [N, K]), accumulated in float32."""
    n, k = cz.shape
    full, g = _split(k, group_size)
    parts = [(grad[:, :full].view(n, g, group_size) * cz[:, :full].view(n, g, group_size)).sum(-1, dtype=torch.float32)]
    if full < k:
        parts.append((grad[:, full:] * cz[:, full:]).sum(-1, keepdim=True, dtype=torch.float32))
    return torch.cat(parts, dim=1)


class _ScaledCodes(torch.autograd.Function):
    """W = cz * s per group (`_scaled`); dL/ds[n, g] = sum over the group of dL/dW * cz. Keeps only a reference to
    cz (the module's buffer): autograd's own graph would keep float32 weight-sized products for every linear."""

    @staticmethod
    def forward(ctx, scale, cz, group_size, dtype):
        ctx.cz, ctx.group_size = cz, group_size
        return _scaled(cz, scale, group_size, dtype)

    @staticmethod
    def backward(ctx, grad):
        return _group_dot(grad, ctx.cz, ctx.group_size), None, None, None


class GroupScaleDequant(nn.Module):
    """A linear's weight [N, K] = (q - z) * s * exp(a) per group of `group_size` columns: codes minus zeros cz
    bfloat16 [N, K] (a buffer: integers of at most 9 bits, exact in bfloat16), fp16-exact scales s float32 [N, G]
    (buffer), the learned log-factor a float32 [N, G]. The weight comes out in `dtype` (bfloat16 when the stage's
    matmuls are, so autocast has nothing left to cast)."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.group_size, self.dtype = group_size, dtype
        cz = to_groups(codes, group_size).float() - zeros.float()[..., None]
        self.register_buffer("cz", from_groups(cz, codes.shape[1]).to(torch.bfloat16).contiguous())
        self.register_buffer("scales", scales.float())
        self.log_factor = nn.Parameter(torch.zeros_like(self.scales))

    def scale(self) -> torch.Tensor:
        return self.scales * torch.exp(self.log_factor)

    def weight(self, scale: torch.Tensor) -> torch.Tensor:
        """float32 (q - z) * scale, exact for fp16 scales (an fp16 value times an integer below 2^9)."""
        return _scaled(self.cz, scale, self.group_size, torch.float32)

    def forward(self, _original: torch.Tensor) -> torch.Tensor:
        return _ScaledCodes.apply(self.scale(), self.cz, self.group_size, self.dtype)


def _logits(model: nn.Module, hidden: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The causal LM's logits from its last hidden state (lm_head, then Gemma's final soft-capping where set);
    weight: the lm_head weight to use instead of the module's (its bfloat16 copy under amp)."""
    head = model.get_output_embeddings()
    out = head(hidden) if weight is None else nn.functional.linear(hidden, weight, head.bias)
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    return torch.tanh(out / cap) * cap if cap else out


HEAD_CHUNK = 1 << 22  # logits (tokens x vocabulary) per chunk of the loss: 16 MB of float32 temporaries each


class _HeadKL(torch.autograd.Function):
    """loss = mean over the tokens of h [1, L, H] of KL(p_fp || p_q), with p_q = softmax(logits(h)) and p_fp =
    softmax(logits(target)), evaluated in chunks of tokens: the head's forward and backward run chunk by chunk in
    the forward (each chunk's float32 [tokens, vocabulary] temporaries are freed before the next, so they stay
    cache- and allocator-sized; at a 128k vocabulary and 2048 tokens one unchunked temporary is 1 GB), which keeps
    dloss/dh for the backward. The lm_head is frozen: only h gets a gradient."""

    @staticmethod
    def forward(ctx, h, target, model, amp, head_weight=None):
        vocab = model.get_output_embeddings().weight.shape[0]
        step = max(1, HEAD_CHUNK // vocab)
        with torch.enable_grad():
            hd = h.detach().requires_grad_()
            # [tokens, H] chunks: a 3-D chunk sends the head's matmul through bmm, which makes the transposed lm_head
            # weight contiguous (113 MB for SmolLM2 in float32) at every call: 1.5 of a 3.5 s step on one thread
            flat, ref_h = hd.reshape(-1, hd.shape[-1]), target.reshape(-1, target.shape[-1])
            tokens = flat.shape[0]
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            for s in range(0, tokens, step):
                with torch.autocast(h.device.type, dtype=torch.bfloat16, enabled=amp):
                    logits = _logits(model, flat[s : s + step], head_weight)
                with torch.no_grad():
                    ref = torch.log_softmax(_logits(model, ref_h[s : s + step]).float(), dim=-1)
                logp = torch.log_softmax(logits.float(), dim=-1)
                part = nn.functional.kl_div(logp, ref, log_target=True, reduction="sum") / tokens
                part.backward()
                total += part.detach()
        ctx.save_for_backward(hd.grad)
        return total

    @staticmethod
    def backward(ctx, grad):
        (grad_h,) = ctx.saved_tensors
        return grad * grad_h, None, None, None, None


def _loss(model: nn.Module, ids: torch.Tensor, target: torch.Tensor, amp: bool,
          head_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the tokens of ids [1, L] of KL(p_fp || p_q); target: the float model's hidden states [1, L, H];
    head_weight: the lm_head weight as autocast would cast it, made once (`tune_scales`)."""
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=amp):
        h = model.base_model(ids, use_cache=False).last_hidden_state
    return _HeadKL.apply(h, target, model, amp, head_weight)


def tune_scales(model: nn.Module, qparams: dict[str, tuple[torch.Tensor, torch.Tensor]], windows: torch.Tensor,
                targets: torch.Tensor, cfg: CalibConfig, codes: dict[str, torch.Tensor] | None = None) -> dict:
    """Train the group scales of the quantized linears named in `qparams` {name: (scales [N, G], zeros [N, G])}
    end to end (module docstring) for cfg.e2e_epochs passes over windows [n, L] with the float model's last hidden
    states targets [n, L, H] (`capture.final_hidden` of the block loop's fp stream); the model's weights and qparams'
    scales are updated in place, every other parameter stays as it is. codes: {name: int codes [N, K]} where the
    caller has them (default: recomputed from each weight). Returns a log: lr, loss per epoch, steps, the step of a
    non-finite loss (None)."""
    device = next(model.parameters()).device
    amp = resolve_amp(cfg, device)
    model.requires_grad_(False)
    gs_of = {n: (model.get_submodule(n).weight.shape[1] if cfg.group_size == -1 else cfg.group_size) for n in qparams}
    dequants = {}
    for name, (scales, zeros) in qparams.items():
        lin = model.get_submodule(name)
        q = codes[name] if codes and name in codes else recompute_codes(
            lin.weight.detach().cpu(), scales, zeros, cfg.wbits, gs_of[name], cfg.symmetric)
        dequants[name] = GroupScaleDequant(q, scales, zeros, gs_of[name],
                                           torch.bfloat16 if amp else torch.float32).to(device)
        parametrize.register_parametrization(lin, "weight", dequants[name], unsafe=True)
    params = [dq.log_factor for dq in dequants.values()]
    n_steps = cfg.e2e_epochs * windows.shape[0]
    factors = schedule_factors(n_steps, cfg.lr_schedule)
    lr = peak_lr("e2e", cfg, factors)
    opt = torch.optim.AdamW(params, lr=lr, betas=(cfg.beta1, 0.999), weight_decay=0.0)
    log = {"lr": lr, "epoch_loss": [], "steps": n_steps, "nan": None}
    order = torch.Generator().manual_seed(cfg.seed)
    last_finite = [p.detach().clone() for p in params]
    # the frozen lm_head in bfloat16 once for the stage: autocast casts a weight that needs no gradient again at
    # every call, and each cast is a fresh 57 MB (SmolLM2) allocation, page-faulted in, per chunk of every step
    head_weight = model.get_output_embeddings().weight.detach().to(torch.bfloat16) if amp else None
    step = 0
    try:
        with retained_heap():  # every step frees and reallocates the same temporaries (omniquant/heap.py)
            bar = tqdm(total=n_steps, desc="e2e scales", leave=False)
            for _ in range(cfg.e2e_epochs):
                total = 0.0
                for j in torch.randperm(windows.shape[0], generator=order).tolist():
                    loss = _loss(model, windows[j : j + 1].to(device), targets[j : j + 1].to(device), amp,
                                 head_weight)
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
                qparams[name] = (s.cpu(), qparams[name][1])
    return log


def check_fits(n_params: int, hidden: int, cfg: CalibConfig) -> None:
    """UserError, before any calibration, when --e2e-epochs would hold more than this machine has: the model in
    float32 (4 bytes a parameter) plus q - z (2 more) on the calibration device, and in CPU RAM the float model's
    last-block outputs and last hidden states (float32 [nsamples, seqlen, hidden] each), plus, on a GPU, the float32
    model as it is loaded before it moves there."""
    if not cfg.e2e_epochs:
        return
    device = torch.device(cfg.device)
    free, ram = memory_budget(device)
    states = 8 * cfg.nsamples * cfg.seqlen * hidden
    needs = [("RAM", 6 * n_params + states, ram)] if device.type == "cpu" else \
        [(f"{device.type} memory", 6 * n_params, free), ("RAM", 4 * n_params + states, ram)]
    for where, need, have in needs:
        if need > have:
            raise UserError(f"--e2e-epochs {cfg.e2e_epochs} trains the whole model at once and needs about "
                            f"{need / 2**30:.1f} GiB of {where} (float32 weights, codes, the float model's hidden "
                            f"states); {have / 2**30:.1f} GiB are available. Run with --e2e-epochs 0 (the block "
                            "loop alone keeps one block in memory)")


def refine_checkpoint(directory: Path, windows: torch.Tensor, cfg: CalibConfig, blocks_path: str,
                      fp_out: torch.Tensor) -> dict:
    """Tune the scales of the fake-quant checkpoint in `directory` (written by the block loop, not yet renamed into
    place; fp_out: the block loop's `CalibResult.fp_out`, its decoder blocks at `blocks_path`) and overwrite its
    quantized weights and sidecar scales in place (same names, dtypes, shapes); the log goes into quant_config.json
    under calibration.e2e and the stage's time is added to calibration.wall_time_s. Returns the log."""
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
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).to(cfg.device).eval()
    targets = final_hidden(model, model.get_submodule(blocks_path), windows, fp_out)  # the tail is not quantized
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
