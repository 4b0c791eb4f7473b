"""OmniQuant calibration: learn LWC (and LET) block by block, write a fake-quant checkpoint + quant sidecar.

Flag names follow the official OmniQuant main.py: --wbits, --abits, --lwc, --let, --epochs, --nsamples, --symmetric,
--alpha, --wd, --seed, --resume, and its underscore spellings as aliases of ours (--group_size, --lwc_lr, --let_lr,
--aug_loss, --batch_size, --calib_dataset = --calib-data, --save_dir = --output). Its --output_dir (log directory +
omni_parameters.pth) has no counterpart and is refused with a hint; our --resume takes this tool's state directory,
not an omni_parameters.pth file. Prefix abbreviations are off (`--lwc` is never read as `--lwc-lr`).
"""

from __future__ import annotations

import argparse

from omniquant.block_train import AMP_CHOICES, SCHEDULES
from omniquant.config import CalibConfig
from omniquant.hub import add_model_arguments
from omniquant.quant.clip_init import CLIP_INITS
from omniquant.quant.recipes import BEST, LR_GROUPS, RECIPE_CHOICES, RECIPES

D = CalibConfig()


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, "HF checkpoint directory, or `smollm2` (the GGUF-converted real model)")
    p.add_argument("--output", "--save_dir", required=True,
                   help="directory for the fake-quant checkpoint (must not exist)")
    p.add_argument("--output_dir", action=_NotOurs, help=argparse.SUPPRESS)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--calib-data", "--calib_dataset", default=D.calib_data,
                   help="text file, folder of .txt, comma-separated list, or wikitext2/c4/ptb (datasets cache); "
                        "not read when nothing is learned (--epochs 0 or --no-lwc, weight-only, no --let)")
    p.add_argument("--wbits", type=int, default=D.wbits, help="weight bits: 2, 3, 4, 6 or 8")
    p.add_argument("--abits", type=int, default=D.abits, help="activation bits: 4, 6, 8 or 16 (16 = weight-only)")
    p.add_argument("--kv-bits", type=int, default=D.kv_bits, help="KV-cache bits (16 = not quantized)")
    p.add_argument("--group-size", "--group_size", type=int, default=D.group_size,
                   help="weights per quantization group along the input dim; -1 = per output channel")
    p.add_argument("--symmetric", action="store_true", help="symmetric (MLC-style, zero = 2^(b-1)-1)")
    p.add_argument("--lwc", action=argparse.BooleanOptionalAction, default=D.lwc,
                   help="Learnable Weight Clipping (on by default; --no-lwc --epochs 0 = round-to-nearest; with "
                        "--recipe lwc+round, --no-lwc learns the rounding offsets only; blockap has no LWC)")
    p.add_argument("--let", action="store_true", help="Learnable Equivalent Transformation (weight-activation runs)")
    p.add_argument("--alpha", type=float, default=D.alpha, help="SmoothQuant-style LET scale init exponent")
    p.add_argument("--act-stats", default=None, metavar="FILE",
                   help="activation statistics for the LET init (from an earlier run of this model); default: "
                        "collected once into OUTPUT.act_stats.safetensors and reused by later runs on the same windows")
    p.add_argument("--epochs", type=int, default=D.epochs, help="passes over the calibration windows per block (0 = no training)")
    p.add_argument("--nsamples", type=int, default=D.nsamples, help="number of calibration windows")
    p.add_argument("--seqlen", type=int, default=D.seqlen, help="tokens per calibration window")
    p.add_argument("--window-split", type=int, default=D.window_split, metavar="PIECES",
                   help="train each calibration window as PIECES consecutive pieces of --seqlen / PIECES tokens: "
                        "PIECES times the optimizer steps on the same tokens at about the same compute")
    p.add_argument("--batch-size", "--batch_size", type=int, default=D.batch_size,
                   help="calibration windows per optimizer step (--nsamples must be a multiple)")
    p.add_argument("--recipe", default=D.recipe, choices=RECIPE_CHOICES,
                   help="what is learned per quantized linear: lwc (clipping, OmniQuant), lwc+round (+ rounding "
                        "offsets), blockap (scale, zero and the weights, EfficientQAT Block-AP), best (the bench's "
                        "best for --wbits: " + ", ".join(f"W{b} {r}" for b, r in BEST.items()) + "); with --let too")
    p.add_argument("--clip-init", default=D.clip_init, choices=CLIP_INITS,
                   help="where learned clipping starts: per group the shrink of the min/max range (1.0 .. 0.5) with "
                        "the lowest round-to-nearest error, weighted by each input column's mean square over 4 "
                        "calibration windows (act) or unweighted (mse); minmax = the papers' start (LWC 0.982, "
                        "Block-AP round-to-nearest); auto (default) = the recipe's own: " + ", ".join(
                            f"{r.name} {r.clip_init}" for r in RECIPES.values()) + ". With --epochs 0 the start is "
                        "the result (act then acts as mse: no calibration text is read)")
    lr_help = "peak learning rate of the {} in {} (default: budget-aware, {:g} / sqrt(sum of the schedule's factors))"
    for group, what in (("lwc", "LWC clipping logits"), ("round", "rounding offsets (lwc+round)"),
                        ("scale", "Block-AP log-scales"), ("zero", "Block-AP zero points"),
                        ("weight", "Block-AP weights"), ("norm", "Block-AP norm gains"),
                        ("e2e", "end-to-end scale factors (--e2e-epochs)")):
        g = LR_GROUPS[group]
        names = [f"--{group}-lr"] + (["--lwc_lr"] if group == "lwc" else [])  # the official spelling too
        p.add_argument(*names, type=float, default=getattr(D, g.field), help=lr_help.format(what, g.unit, g.rate))
    p.add_argument("--let-lr", "--let_lr", type=float, default=D.let_lr, help="peak learning rate of LET's scales and shifts")
    p.add_argument("--lr-schedule", default=D.lr_schedule, choices=SCHEDULES,
                   help="learning-rate decay over each block's steps: linear / cosine to 0, or constant")
    p.add_argument("--norm-gains", action=argparse.BooleanOptionalAction, default=D.norm_gains,
                   help="also learn a per-channel gain on the norms that feed quantized linears, folded into the norm "
                        "weights at export (Block-AP trains the norms too); measured within W2's seed-to-seed noise "
                        "(bench/README.md, \"Norm gains\"), so off by default")
    p.add_argument("--e2e-epochs", type=int, default=D.e2e_epochs,
                   help="after the block loop, passes over the calibration windows that train every group scale so "
                        "the whole model's next-token distribution matches the float model's (KL), codes and zeros "
                        "fixed (EfficientQAT's E2E-QP; exact export kept). Holds the whole model in float32 in memory: small models. Each pass costs "
                        "about as much as one block-loop epoch (default: %(default)s)")
    p.add_argument("--keep-best", action=argparse.BooleanOptionalAction, default=D.keep_best,
                   help="keep the parameters of the lowest step loss (AutoRound's rule) instead of those after the "
                        "last step (default: off; at one window per step the lowest loss mostly marks the easiest "
                        "window, and the last step scored lower validation perplexity for every recipe tried)")
    p.add_argument("--amp", default=D.amp, choices=AMP_CHOICES,
                   help="the matmuls of the training steps and of the streams' block forwards in bfloat16 "
                        "(autocast; quantizers, loss, optimizer and the stored streams stay float32, the export is "
                        "exact either way): bf16, off (float32), or auto (default: bf16 "
                        "on CUDA, and for weight-only runs on CPUs with native bf16, AVX512-BF16 or AMX, where a "
                        "step takes about half the time; float32 elsewhere, where torch would emulate bf16)")
    p.add_argument("--wd", type=float, default=D.wd, help="AdamW weight decay")
    p.add_argument("--beta1", type=float, default=D.beta1,
                   help="AdamW's first-moment decay in the block loop and the e2e stage (default: %(default)s; 0.9 is "
                        "torch's: at the quick budget of 32 steps per block 0.5 scored lower, bench/README.md "
                        "\"AdamW's beta1\")")
    p.add_argument("--aug-loss", "--aug_loss", action="store_true",
                   help="also match the fp block's output on the quantized input stream")
    p.add_argument("--seed", type=int, default=D.seed)
    p.add_argument("--device", default=D.device, help="cpu or cuda (bf16 autocast + grad scaler on cuda)")
    p.add_argument("--streams", default="auto", choices=("auto", "memory", "disk"),
                   help="where the fp / quantized activation streams live: memory (the device or RAM), disk (files "
                        "in OUTPUT.state/), auto (disk only when they would not fit in memory)")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="continue an interrupted run from its state directory (default location: OUTPUT.state; "
                        "not the official omni_parameters.pth)")


class _NotOurs(argparse.Action):
    """The official --output_dir (its log dir + omni_parameters.pth) means nothing here: refuse it with the mapping."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is the official main.py's log directory, which this tool does not write; the "
                     "fake-quant checkpoint goes to --output (the official --save_dir), the run state to OUTPUT.state")


def run(args: argparse.Namespace) -> int:
    from omniquant.calibrate import calibrate_checkpoint, resolve_model

    settings = {k: getattr(args, k) for k in CalibConfig().to_dict()}
    model = resolve_model(args.model, args.revision)
    out = calibrate_checkpoint(model, args.output, overwrite=args.overwrite, resume=args.resume,
                               streams=args.streams, **settings)
    print(f"wrote fake-quant checkpoint to {out}")
    return 0
