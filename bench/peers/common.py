"""Helpers shared by the per-method scripts; imports only torch, safetensors and transformers (any version), since
each script runs in its own peer venv.

Contract of a method script (``bench.quality`` runs it):
    python bench/peers/<method>.py --model HF_DIR --windows WINDOWS.safetensors --wbits B --group-size G --out DIR
writes ``DIR/weights.safetensors`` ({"<linear>.weight": float32 [N, K]}: the dequantized weights of every linear it
quantized) and ``DIR/meta.json`` (calibration seconds, peak RSS, quantized / skipped linears, versions, notes).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from contextlib import contextmanager
from pathlib import Path

import torch

# The decoder linears every method quantizes (lm_head / embeddings stay float, as in the OmniQuant paper).
LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_args(extra=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, type=Path, help="base HF checkpoint dir")
    ap.add_argument("--windows", required=True, type=Path, help="safetensors with 'calib' LongTensor [n, seqlen]")
    ap.add_argument("--wbits", required=True, type=int)
    ap.add_argument("--group-size", required=True, type=int)
    ap.add_argument("--abits", type=int, default=16, help="activation bits (< 16: weight-activation setting)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    if extra:
        extra(ap)
    return ap.parse_args()


def load_windows(path: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(path))["calib"].long()


def load_config(model_dir: Path):
    """AutoConfig, made consistent across transformers versions: 5.x writes ``rope_parameters``; 4.x ignores it
    and would silently fall back to rope_theta=10000 (SmolLM2 uses 100000)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(model_dir))
    rp = json.loads((Path(model_dir) / "config.json").read_text()).get("rope_parameters")
    if isinstance(rp, dict) and "rope_theta" in rp:
        cfg.rope_theta = rp["rope_theta"]
    return cfg


def load_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    cfg = load_config(model_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), config=cfg, dtype=torch.float32)
    except TypeError:  # transformers < 4.56 names it torch_dtype
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), config=cfg, torch_dtype=torch.float32)
    model.eval()
    return model


@torch.no_grad()
def window_loss(model, ids: torch.Tensor) -> float:
    """Mean next-token NLL of one window [L]: the evaluator compares it with its own to catch loading mismatches."""
    logits = model(ids[None], use_cache=False).logits[0].float()
    return float(torch.nn.functional.cross_entropy(logits[:-1], ids[1:]))


def load_inputs(args: argparse.Namespace):
    """Seeded start of a peer script: (model, windows [n, L], float loss on window 0 for the loading check)."""
    torch.manual_seed(args.seed)
    model = load_model(args.model)
    windows = load_windows(args.windows)
    return model, windows, window_loss(model, windows[0])


def snapshot_params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed_params(model, before: dict[str, torch.Tensor], exclude: set[str]) -> dict[str, torch.Tensor]:
    """Parameters of the original model (same name and shape) whose values changed, except ``exclude``."""
    out = {}
    for n, p in model.named_parameters():
        if n in before and n not in exclude and p.shape == before[n].shape and not torch.equal(p.detach(), before[n]):
            out[n] = p.detach().float()
    return out


def quantizable_linears(model) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in LINEAR_SUFFIXES}


class Timer:
    """Wall time of the quantization call only (model loading and saving excluded)."""

    seconds = 0.0

    @contextmanager
    def __call__(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - t0


def peak_rss_mib() -> float:
    """Peak RSS of this process in MiB: VmHWM of /proc/self/status. Not getrusage's ru_maxrss, which Linux carries
    over exec from the parent (the benchmark driver holds a model, so every method would report at least its size)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def versions(*packages: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in ("torch", "transformers", *packages):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = "not installed"
    return out


def save_result(out: Path, weights: dict[str, torch.Tensor], *, calib_seconds: float, skipped: dict[str, str],
                fp_loss0: float, packages: tuple[str, ...] = (), notes: str = "", extra: dict | None = None,
                other_params: dict[str, torch.Tensor] | None = None,
                act_offsets: dict[str, torch.Tensor] | None = None) -> None:
    """Write weights.safetensors (+ act_offsets.safetensors) + meta.json to ``out`` atomically (temp, then rename).

    ``weights``: {linear name: dequantized weight [N, K]}; ``other_params``: {parameter name: tensor} for float
    parameters a method changed besides the quantized weights (AWQ / SmoothQuant / LET fold scales into the norm
    weights); ``act_offsets``: {linear name: [K]} offset d of its input quantizer, Q(x - d) + d (OmniQuant's LET
    shift; weight-activation settings only).
    """
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"{k}.weight": v.detach().float().contiguous() for k, v in weights.items()}
    tensors.update({k: v.detach().float().contiguous() for k, v in (other_params or {}).items()})
    files = {"weights.safetensors": tensors}
    if act_offsets:
        files["act_offsets.safetensors"] = {k: v.detach().float().contiguous() for k, v in act_offsets.items()}
    for name, content in files.items():
        tmp = out / (name + ".tmp")
        save_file(content, str(tmp))
        os.replace(tmp, out / name)
    meta = {
        "calib_seconds": calib_seconds,
        "peak_rss_mib": peak_rss_mib(),
        "quantized": sorted(weights),
        "other_params_changed": sorted(other_params or {}),
        "skipped": skipped,
        "fp_loss_window0": fp_loss0,
        "versions": versions(*packages),
        "torch_threads": torch.get_num_threads(),
        "notes": notes,
        **(extra or {}),
    }
    tmpm = out / "meta.json.tmp"
    tmpm.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmpm, out / "meta.json")
