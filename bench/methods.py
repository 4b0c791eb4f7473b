"""The methods the quality benchmark compares: where each runs (main env or a peer venv) and how it is called.

A setting is a string ``w<bits>g<group>`` (weight-only, asymmetric integer) or ``w<bits>a<abits>`` (weight-activation:
per-channel weights, per-token dynamic asymmetric activations, scored with the activation quantizer of
``bench.evaluate``). A method runs the settings it supports (``weight_only`` / ``weight_act``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SettingSpec:
    name: str
    wbits: int
    group_size: int  # -1: per output channel
    abits: int = 16

    @property
    def weight_act(self) -> bool:
        return self.abits < 16


def parse_setting(name: str) -> SettingSpec:
    m = re.fullmatch(r"w(\d+)g(\d+)", name)
    if m:
        return SettingSpec(name, int(m[1]), int(m[2]))
    m = re.fullmatch(r"w(\d+)a(\d+)", name)
    if m:
        return SettingSpec(name, int(m[1]), -1, int(m[2]))
    raise ValueError(f"setting {name!r} is not of the form w<bits>g<group> (e.g. w3g128) or w<bits>a<bits> (w4a4)")


@dataclass(frozen=True)
class Method:
    """``env`` None = main environment (this project), else a key of ``bench.peer_envs.PEER_REQUIREMENTS``."""

    name: str
    label: str
    script: str
    env: str | None
    args: tuple[str, ...] = ()
    calibration_free: bool = False
    weight_only: bool = True  # supports w<bits>g<group> settings
    weight_act: bool = False  # supports w<bits>a<bits> settings
    env_vars: dict = field(default_factory=dict)
    cost: int = 1  # relative run time in the quick setting: concurrent jobs start the longest first
    only: tuple[str, ...] | None = None  # the settings it runs at (None: every setting of its kind)
    # ours: passes of end-to-end scale tuning (--e2e-epochs) after the block loop; within the budget, they replace
    # as many block-loop epochs (each is one window-pass per window through every block), else they add to it
    e2e_epochs: int = 0
    e2e_in_budget: bool = True


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("rtn", "RTN (round-to-nearest, ours)", "omniquant_ours.py", None, ("--method", "rtn"), calibration_free=True,
           weight_act=True),
    Method("gptq", "GPTQ (llm-compressor 0.14)", "llmcompressor_peer.py", "llmcompressor", ("--method", "gptq"),
           cost=3),
    Method("awq", "AWQ (llm-compressor 0.14)", "llmcompressor_peer.py", "llmcompressor", ("--method", "awq"),
           cost=4),
    Method("autoround", "AutoRound (auto-round 0.16)", "autoround_peer.py", "autoround", cost=5),
    Method("gptqmodel", "GPTQ (gptqmodel 7.6)", "gptqmodel_peer.py", "gptqmodel",
           env_vars={"GPTQMODEL_CPU_WORKERS": "2", "CUDA_VISIBLE_DEVICES": ""}, cost=3),
    Method("hqq", "HQQ (hqq 0.2.8)", "hqq_peer.py", "hqq", calibration_free=True, cost=2),
    Method("omniquant", "OmniQuant lwc (ours; + LET at WxAx)", "omniquant_ours.py", None,
           ("--method", "omniquant", "--recipe", "lwc"), cost=6, weight_act=True),
    Method("omniquant-round", "OmniQuant lwc+round (ours)", "omniquant_ours.py", None,
           ("--method", "omniquant", "--recipe", "lwc+round"), cost=6),
    Method("omniquant-blockap", "OmniQuant blockap (ours)", "omniquant_ours.py", None,
           ("--method", "omniquant", "--recipe", "blockap"), cost=7),
    Method("omniquant-blockap-e2e", "OmniQuant blockap + e2e scales, 1 + 1 epochs (ours)", "omniquant_ours.py", None,
           ("--method", "omniquant", "--recipe", "blockap"), cost=7, e2e_epochs=1),
    # each shared window trained as two consecutive 256-token pieces: the same tokens and window-passes, twice the
    # optimizer steps (bench/README.md, "Window pieces"); at 2 bits, where it lowered validation perplexity
    Method("omniquant-blockap-e2e-split", "OmniQuant blockap + e2e scales, 1 + 1 epochs, windows in 2 pieces (ours)",
           "omniquant_ours.py", None, ("--method", "omniquant", "--recipe", "blockap", "--window-split", "2"), cost=7,
           e2e_epochs=1, only=("w2g128", "w2g64")),
    Method("omniquant-blockap-e2e-more", "OmniQuant blockap + e2e scales, 2 + 1 epochs: 1.5x budget (ours)",
           "omniquant_ours.py", None, ("--method", "omniquant", "--recipe", "blockap"), cost=8, e2e_epochs=1,
           e2e_in_budget=False),
    # a new user's first try: `omniquant calibrate` defaults at a small budget (its own 16 x 256 windows, seed 2)
    Method("omniquant-small", "OmniQuant lwc, CLI defaults, 2 epochs x 16 x 256 (ours)", "omniquant_ours.py", None,
           ("--method", "omniquant", "--recipe", "lwc", "--cli-defaults"), cost=2, only=("w3g128",)),
    Method("smoothquant", "SmoothQuant + GPTQ (llm-compressor 0.14)", "llmcompressor_peer.py", "llmcompressor",
           ("--method", "smoothquant"), cost=3, weight_only=False, weight_act=True),
)}

NOT_RUN = {
    "auto-gptq 0.7.1": "CUDA-only kernels: does not run on CPU",
    "autoawq 0.2.9": "CUDA-only kernels: does not run on CPU (AWQ is measured through llm-compressor)",
}


# Our recipes, each a row: the goal check compares the best of them with every other fully quantized method.
OURS = ("omniquant", "omniquant-round", "omniquant-blockap", "omniquant-blockap-e2e", "omniquant-blockap-e2e-split",
        "omniquant-blockap-e2e-more")
# rows that train with more window-passes than the common budget: shown, never bold, not in the goal's "best of ours"
EXTRA_BUDGET = tuple(n for n in OURS if not METHODS[n].e2e_in_budget)


def runs(method: Method, setting: SettingSpec) -> bool:
    """Whether `method` has a recipe for `setting` (weight-only or weight-activation)."""
    if method.only is not None and setting.name not in method.only:
        return False
    return method.weight_act if setting.weight_act else method.weight_only


def linear_bits(n: int, k: int, wbits: int, group_size: int) -> int:
    """Storage bits of one quantized linear [N, K]: codes + one float16 scale and one float16 zero per group
    (MLC layout, docs/formats.md §2); groups = ceil(K / gs) per row."""
    g = 1 if group_size == -1 else -(-k // group_size)
    return n * k * wbits + n * g * 32
