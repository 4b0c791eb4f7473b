"""Weight recipes as data: what the block loop learns (`--recipe`), their learning-rate groups and `best`.

    recipe      learns (per quantized linear)                              module             clipping starts at
    lwc         clipping logits gamma, beta per group (OmniQuant, default)  quant/lwc.py       minmax (LWC's 0.982)
    lwc+round   LWC + a rounding offset v per weight (AutoRound's V)        quant/rounding.py  minmax (LWC's 0.982)
    blockap     scale and zero per group + every weight (EfficientQAT)      quant/blockap.py   act (per-group search)
    best        the recipe the quality bench measured best for --wbits      (BEST below)

Each combines with --let (LET is a separate module attached to the block) and exports the same integer codes +
fp16 scales + integer zeros (`fakequant.GroupQuantizer.export`), so pack / compile / the TVM model are unchanged.

Learning rates are budget-aware: with S optimizer steps per block and schedule factors f_t (decaying to 0), a group
with rate constant c gets the peak rate  lr = c / sqrt(sum_t f_t).  AdamW moves each parameter by about lr a step
(the first steps are sign steps), so the nominal total movement sum_t lr f_t = c sqrt(sum_t f_t) grows with the
square root of the budget: few steps take larger ones, many steps smaller, less noisy ones. An explicit
--<group>-lr sets the peak rate instead. The constants were tuned on a validation split of the calibration text
(bench/README.md, "Tuning"), never on evaluation windows.
"""

from __future__ import annotations

from dataclasses import dataclass

from omniquant.errors import UserError
from omniquant.quant.blockap import BlockAPQuantizer
from omniquant.quant.fakequant import GroupQuantizer
from omniquant.quant.lwc import LWCQuantizer
from omniquant.quant.norm_gain import NormGain
from omniquant.quant.rounding import RoundingQuantizer
from omniquant.quant.spec import WeightQuantSpec


@dataclass(frozen=True)
class LRGroup:
    """field: the CalibConfig field that overrides the peak lr; rate: c of lr = c / sqrt(sum f) (None: the fixed
    default_lr); unit: what one unit of movement of the parameter means."""

    field: str
    unit: str
    rate: float | None = None
    default_lr: float | None = None


LR_GROUPS: dict[str, LRGroup] = {
    "lwc": LRGroup("lwc_lr", "logit units (init 4: sigmoid 0.982)", rate=2.0),
    "round": LRGroup("round_lr", "quantization steps (|v| <= 0.5)", rate=0.02),
    # scale / zero 0.02: chosen with blockap's mse clipping start and kept for act (0.04 before; bench/README.md "Tuning")
    "scale": LRGroup("scale_lr", "log-scale units (0.1: a 10 % larger step)", rate=0.02),
    "zero": LRGroup("zero_lr", "codes", rate=0.02),
    "weight": LRGroup("weight_lr", "quantization steps", rate=0.04),
    # end-to-end scale factors (--e2e-epochs, omniquant/e2e_scales.py): 0.005 at 16 linear-decay steps
    "e2e": LRGroup("e2e_lr", "log-scale units", rate=0.015),
    "norm": LRGroup("norm_lr", "log-gain units (0.1: a 10 % larger norm weight)", rate=0.02),
    # LET scales are absolute per-channel factors: the paper's rate, not scaled with the step count
    "let": LRGroup("let_lr", "LET scale / shift", default_lr=5e-3),
}


@dataclass(frozen=True)
class Recipe:
    """clip_init: where its learned clipping starts under `--clip-init auto` (quant/clip_init.py), chosen by
    whole-model validation perplexity (bench/README.md, "Tuning")."""

    name: str
    summary: str
    quantizer: type[GroupQuantizer]
    clip_init: str = "minmax"

    def make(self, weight_shape: tuple[int, int], spec: WeightQuantSpec, lwc: bool = True) -> GroupQuantizer:
        if self.quantizer is BlockAPQuantizer:
            return BlockAPQuantizer(weight_shape, spec)
        return self.quantizer(weight_shape, spec, lwc=lwc)


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("lwc", "learnable weight clipping (OmniQuant)", LWCQuantizer),
    Recipe("lwc+round", "LWC + learnable rounding offsets (AutoRound's V)", RoundingQuantizer),
    Recipe("blockap", "learnable scale and zero + trainable weights (EfficientQAT Block-AP)", BlockAPQuantizer,
           clip_init="act"),
)}

# --recipe best: the lowest perplexity per weight bit width in the quick quality bench (bench/README.md).
BEST: dict[int, str] = {2: "blockap", 3: "blockap", 4: "blockap", 6: "lwc", 8: "lwc"}

RECIPE_CHOICES = (*RECIPES, "best")


def resolve_recipe(name: str, wbits: int) -> Recipe:
    """The Recipe for --recipe `name` (`best` looks up BEST[wbits]); UserError for an unknown name."""
    if name == "best":
        name = BEST.get(wbits, "lwc")
    if name not in RECIPES:
        raise UserError(f"--recipe {name!r} is unknown; choose one of {', '.join(RECIPE_CHOICES)}")
    return RECIPES[name]


def resolve_clip_init(cfg) -> str:
    """The clipping start a CalibConfig asks for: `auto` is its recipe's own (Recipe.clip_init); `act` becomes
    `mse` without training (--epochs 0: no calibration inputs are read)."""
    kind = resolve_recipe(cfg.recipe, cfg.wbits).clip_init if cfg.clip_init == "auto" else cfg.clip_init
    return "mse" if kind == "act" and cfg.epochs == 0 else kind


def lr_group(param_name: str) -> str:
    """The LR group of a learnable parameter of a block (by its last name component), e.g. 'lwc' for
    'self_attn.q_proj.wquant.upbound_factor'; 'let' for the LET module's parameters (handled by the caller)."""
    leaf = param_name.rsplit(".", 1)[-1]
    for q in (*(r.quantizer for r in RECIPES.values()), NormGain):
        if leaf in q.LR_GROUPS:
            return q.LR_GROUPS[leaf]
    raise KeyError(f"learnable parameter {param_name} belongs to no learning-rate group")
