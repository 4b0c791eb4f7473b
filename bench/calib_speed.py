"""Calibration speed of our OmniQuant (LWC) per decoder block per epoch, at the paper's shape (seqlen 2048).

    python -m bench.calib_speed --preset smollm2 --device cpu --nsamples 8          # this machine (CPU)
    python -m bench.calib_speed --preset llama2-7b --device cuda                     # GPU machine (A100/H100)

One decoder block with random weights (std 0.02) and random token windows; ``omniquant.blockwise.calibrate_model``
is timed with ``--epochs`` E and with 0 epochs, so s/epoch/block = (T(E) - T(0)) / E excludes input capture, the
full-precision target pass and the final fuse. The time is scaled linearly to 128 samples when fewer are measured,
and extrapolated to the paper's run (``blocks`` x 20 epochs; the OmniQuant paper reports 1.1 h for LLaMA-7B W-only
on one A100). Prints a table and writes JSON (default build/bench/calib_speed-<preset>-<device>.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

# name -> (hidden, intermediate, heads, kv heads, blocks of the full model, vocab)
PRESETS = {
    "llama2-7b": (4096, 11008, 32, 32, 32, 32000),
    "smollm2": (576, 1536, 9, 3, 30, 49152),
}
PAPER_HOURS = {"llama2-7b": 1.1}  # OmniQuant paper, LLaMA-7B weight-only, 20 epochs, 128 x 2048, one A100


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.calib_speed", description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=PRESETS, default="smollm2")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--nsamples", type=int, default=128, help="windows per epoch measured (scaled to 128)")
    p.add_argument("--epochs", type=int, default=2, help="epochs timed (default: %(default)s)")
    p.add_argument("--wbits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--full-epochs", type=int, default=20, help="epochs of the extrapolated full run")
    p.add_argument("--json", type=Path, default=None)
    return p


def _model(preset: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, heads, kv, _, vocab = PRESETS[preset]
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                      num_key_value_heads=kv, num_hidden_layers=1, vocab_size=vocab, max_position_embeddings=4096,
                      initializer_range=0.02, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float().eval()
    model.config.use_cache = False
    return model


def _time_calibration(preset, windows, epochs: int, args) -> float:
    import torch

    from omniquant.blockwise import RunState, calibrate_model
    from omniquant.config import CalibConfig
    from omniquant.models import get_adapter

    model = _model(preset)
    cfg = CalibConfig(wbits=args.wbits, group_size=args.group_size, epochs=epochs, nsamples=windows.shape[0],
                      seqlen=windows.shape[1], device=args.device, lwc=True)
    with tempfile.TemporaryDirectory() as d:
        state = RunState(Path(d) / "state", cfg, d)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        # blockwise: with 0 epochs nothing is learned and calibrate_model would skip the capture and the streams,
        # which T(0) must include
        calibrate_model(model, get_adapter("llama"), windows, cfg, state, blockwise=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def run(args) -> dict:
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA device")
    hidden, inter, heads, kv, blocks, vocab = PRESETS[args.preset]
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, vocab, (args.nsamples, args.seqlen), generator=g)
    _time_calibration(args.preset, windows[:1], 1, args)  # warm-up (allocator, kernels)
    t0 = _time_calibration(args.preset, windows, 0, args)
    te = _time_calibration(args.preset, windows, args.epochs, args)
    per_epoch = (te - t0) / args.epochs * (128 / args.nsamples)
    full_h = per_epoch * args.full_epochs * blocks / 3600
    res = {
        "preset": args.preset, "shape": {"hidden": hidden, "intermediate": inter, "heads": heads, "kv_heads": kv},
        "device": args.device, "device_name": (torch.cuda.get_device_name() if args.device.startswith("cuda")
                                               else f"{platform.processor() or platform.machine()}, "
                                                    f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}"),
        "seqlen": args.seqlen, "nsamples_measured": args.nsamples, "epochs_timed": args.epochs,
        "wbits": args.wbits, "group_size": args.group_size,
        "seconds_overhead_per_block": t0, "seconds_per_epoch_per_block_128_samples": per_epoch,
        "extrapolated_hours": {"blocks": blocks, "epochs": args.full_epochs, "hours": full_h},
        "paper_hours": PAPER_HOURS.get(args.preset),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_1_5_15": os.getloadavg(),
    }
    if args.device.startswith("cuda"):
        res["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return res


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    res = run(args)
    out = args.json or Path(f"build/bench/calib_speed-{args.preset}-{args.device.split(':')[0]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    os.replace(tmp, out)
    paper = f"{res['paper_hours']} h (paper, A100)" if res["paper_hours"] else "n/a"
    print("| preset | device | seqlen | s/epoch/block (128 samples) | full run (blocks x epochs) | paper |")
    print("|---|---|---|---|---|---|")
    print(f"| {res['preset']} | {res['device_name']} | {res['seqlen']} | {res['seconds_per_epoch_per_block_128_samples']:.1f}"
          f" | {res['extrapolated_hours']['hours']:.2f} h ({res['extrapolated_hours']['blocks']} x "
          f"{res['extrapolated_hours']['epochs']}) | {paper} |")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
