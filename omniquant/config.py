"""Calibration settings as data (names follow the official OmniQuant `main.py` flags)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

SUPPORTED_ABITS = (4, 6, 8, 16)


@dataclass
class CalibConfig:
    wbits: int = 4
    abits: int = 16
    kv_bits: int = 16
    group_size: int = 128  # -1: per output channel
    symmetric: bool = False
    lwc: bool = True
    let: bool = False
    recipe: str = "lwc"  # what is learned per quantized linear: lwc, lwc+round, blockap, best (quant/recipes.py)
    norm_gains: bool = False  # the block's pre-linear norms also learn a per-channel gain (quant/norm_gain.py)
    clip_init: str = "auto"  # where learned clipping starts: act / mse (per-group error search, input-weighted or
    #                          not), minmax, or auto (the recipe's own: quant/recipes.py, quant/clip_init.py)
    epochs: int = 20
    nsamples: int = 128
    seqlen: int = 2048
    batch_size: int = 1
    # each calibration window is trained as this many consecutive pieces: more, shorter optimizer steps on the same
    # tokens (bench/README.md, "Window pieces")
    window_split: int = 1
    # peak learning rates; None: budget-aware default, rate / sqrt(sum of the schedule's factors)
    # (quant/recipes.py LR_GROUPS)
    lwc_lr: float | None = None
    round_lr: float | None = None
    scale_lr: float | None = None
    zero_lr: float | None = None
    weight_lr: float | None = None
    norm_lr: float | None = None
    e2e_lr: float | None = None
    let_lr: float = 5e-3
    # passes of end-to-end scale tuning over the calibration windows after the block loop (omniquant/e2e_scales.py)
    e2e_epochs: int = 0
    lr_schedule: str = "linear"  # linear / cosine decay to 0 over the block's steps, or constant
    # keep the parameters of the lowest step loss (AutoRound's rule) instead of those after the last step; off by
    # default: one-window step losses rank windows more than parameters (bench/README.md, "Tuning")
    keep_best: bool = False
    # the matmuls of the training steps, the streams' block forwards and the e2e stage in bfloat16 (autocast;
    # weights, quantizers, the stored streams and targets stay float32): bf16, off, or auto (bf16 on CUDA, and for
    # weight-only runs on CPUs with native bf16 dot products, AVX512-BF16 / AMX; block_train.resolve_amp)
    amp: str = "auto"
    wd: float = 0.0
    # AdamW's first-moment decay in the block loop and the e2e stage: 0.5 averages the last ~2 gradients instead of
    # torch's ~10 (0.9), which a 32-step block training follows better (bench/README.md, "AdamW's beta1"); the
    # second moment keeps 0.999
    beta1: float = 0.5
    alpha: float = 0.5
    act_stats: str | None = None  # LET init statistics file (default: <output>.act_stats.safetensors, reused)
    aug_loss: bool = False
    calib_data: str = "wikitext2"
    seed: int = 2
    device: str = "cpu"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CalibConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def run_identity(self) -> dict:
        """Fields that must match for a resumed run to continue an earlier one (device may differ)."""
        d = self.to_dict()
        d.pop("device")
        return d
