"""Weight recipes (--recipe lwc / lwc+round / blockap / best) in the one block loop, and the budget-aware optimiser:
each lowers the block loss, exports codes that pack and unpack bit-exactly, keeps the best / last finite parameters,
resumes bit for bit; bad recipe names are clear errors. Tiny models only."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from conftest import capture_block0
from safetensors.torch import load_file

import omniquant.blockwise as bw
from omniquant import block_train
from omniquant.block_train import learned_state, schedule_factors, train_block
from omniquant.config import CalibConfig
from omniquant.errors import UserError
from omniquant.quant.blockap import BlockAPQuantizer
from omniquant.quant.codes import dequantize, recompute_codes
from omniquant.quant.lwc import LWCQuantizer
from omniquant.quant.qlinear import QuantLinear, replace_linears
from omniquant.quant.recipes import LR_GROUPS, RECIPES, resolve_recipe
from omniquant.quant.rounding import RoundingQuantizer
from omniquant.quant.spec import WeightQuantSpec

ALL = list(RECIPES)  # lwc, lwc+round, blockap
SMALL = {"wbits": 3, "group_size": 64, "nsamples": 4, "seqlen": 64, "epochs": 2, "batch_size": 2, "seed": 0}


# ---------------------------------------------------------------------------------------------- quantizers alone

@pytest.mark.parametrize("sym", [False, True])
def test_every_recipe_starts_at_its_reference_quantizer(sym):
    """At init Block-AP is round-to-nearest and lwc+round is LWC, bit for bit (so `learns_nothing` holds)."""
    torch.manual_seed(0)
    w = torch.randn(8, 200) * 0.03  # ragged last group at gs 64
    spec = WeightQuantSpec(3, 64, sym)
    rtn = LWCQuantizer(tuple(w.shape), spec, lwc=False)(w)
    lwc = LWCQuantizer(tuple(w.shape), spec)(w)
    assert torch.equal(BlockAPQuantizer(tuple(w.shape), spec)(w), rtn)
    assert torch.equal(RoundingQuantizer(tuple(w.shape), spec)(w), lwc)


def _randomize(q: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in q.parameters():
            p.copy_(torch.rand(p.shape, generator=g) * 3 - 1.5)  # beyond the rounding offsets' clamp too


@pytest.mark.parametrize("make", [lambda s, sp: LWCQuantizer(s, sp), lambda s, sp: RoundingQuantizer(s, sp),
                                  lambda s, sp: BlockAPQuantizer(s, sp)], ids=ALL)
@pytest.mark.parametrize("bits,gs,sym", [(2, 128, False), (3, 64, False), (4, 32, True), (8, -1, False)])
def test_export_is_exact_with_any_learned_values(make, bits, gs, sym):
    """Whatever the learned values, the exported weight is (code - zero) * fp16 scale for integer codes in range,
    and equals the fake-quant forward used in training."""
    torch.manual_seed(1)
    w = torch.randn(16, 576) * 0.02  # 576 = 4.5 x 128: ragged last group
    q = make(tuple(w.shape), WeightQuantSpec(bits, gs, sym))
    _randomize(q, bits * 7 + max(gs, 0))
    wq, scales, zeros = q.export(w)
    assert torch.equal(wq, q(w).detach())
    assert torch.equal(scales.half().float(), scales) and zeros.dtype == torch.int32
    codes = recompute_codes(wq, scales, zeros, bits, gs, sym)
    assert 0 <= int(codes.min()) and int(codes.max()) <= (2**bits - 2 if sym else 2**bits - 1)
    assert torch.equal(dequantize(codes, scales, zeros, gs), wq)


def test_rounding_offset_moves_a_code_by_at_most_one():
    torch.manual_seed(2)
    w = torch.randn(4, 128) * 0.02
    spec = WeightQuantSpec(4, 64)
    q = RoundingQuantizer(tuple(w.shape), spec, lwc=False)
    base, scales, _ = q.export(w)
    with torch.no_grad():
        q.round_offset.fill_(3.0)  # clamped to +0.5 in the forward pass
    moved = q.export(w)[0]
    steps = ((moved - base) / scales.repeat_interleave(64, 1)).round()
    assert steps.min() >= 0 and steps.max() <= 1 and steps.sum() > 0


# ----------------------------------------------------------------------------------------- the block loop, tiny

@pytest.fixture(scope="module")
def block0(tiny_llama_dir, calib_text):
    """(block 0 of the tiny Llama, its inputs [8, 64, H], kwargs, fp target) for direct train_block calls."""
    adapter, block, x, kwargs, target = capture_block0(tiny_llama_dir, calib_text)
    return block, adapter, x, kwargs, target


def _quantized_block(block0, recipe: str, bits=2, gs=64):
    block, adapter, x, kwargs, target = block0
    block = copy.deepcopy(block)
    spec = WeightQuantSpec(bits, gs)
    replace_linears(block, adapter.linears,
                    lambda lin: QuantLinear(lin, spec, quantizer=RECIPES[recipe].make(tuple(lin.weight.shape), spec)))
    return block, x, kwargs, target


def _mse(block, x, kwargs, target) -> float:
    from omniquant.capture import block_forward

    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(block_forward(block, x, kwargs), target))


@pytest.mark.parametrize("amp", ["off", "bf16"])
@pytest.mark.parametrize("recipe", ALL)
def test_recipe_lowers_the_block_loss(recipe, amp, block0):
    """Every recipe lowers the float32 block loss, with float32 training matmuls and with bfloat16 ones."""
    block, x, kwargs, target = _quantized_block(block0, recipe)
    before = _mse(block, x, kwargs, target)
    log = train_block(block, x, target, None, kwargs, CalibConfig(wbits=2, group_size=64, epochs=4, nsamples=8,
                                                                   batch_size=2, recipe=recipe, amp=amp), None, "test")
    after = _mse(block, x, kwargs, target)
    assert after < 0.9 * before, (before, after)
    assert log["nan"] is None and len(log["epoch_loss"]) == 4 and "best" not in log  # the last step's, by default
    assert log["matmul_dtype"] == {"off": "float32", "bf16": "bfloat16"}[amp]


def test_amp_auto_is_bf16_only_where_the_cpu_has_it(monkeypatch):
    """auto: bf16 on CUDA; on CPU only with native bf16 (AVX512-BF16 / AMX) and only for weight-only runs."""
    from omniquant import block_train

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for native in (False, True):
        monkeypatch.setattr(block_train, "cpu_has_native_bf16", lambda native=native: native)
        assert block_train.resolve_amp(CalibConfig(), cpu) is native
        assert block_train.resolve_amp(CalibConfig(abits=8), cpu) is False
        assert block_train.resolve_amp(CalibConfig(kv_bits=4), cpu) is False
        assert block_train.resolve_amp(CalibConfig(), cuda) is True
        assert block_train.resolve_amp(CalibConfig(amp="bf16", abits=8), cpu) is True
        assert block_train.resolve_amp(CalibConfig(amp="off"), cuda) is False
    with pytest.raises(ValueError, match="amp must be one of"):
        block_train.resolve_amp(CalibConfig(amp="fp16"), cpu)


def test_unknown_amp_is_a_clear_error(tiny_llama_dir, calib_text, tmp_path, capsys):
    from omniquant.calibrate import calibrate_checkpoint
    from omniquant.cli import main

    with pytest.raises(UserError, match="--amp must be one of auto, bf16, off, got 'fp16'"):
        calibrate_checkpoint(tiny_llama_dir, tmp_path / "o", amp="fp16", calib_data=calib_text, **SMALL)
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit) as e:
        main(["calibrate", "--model", str(tiny_llama_dir), "--output", str(tmp_path / "o"), "--amp", "fp16"])
    assert e.value.code == 2 and "invalid choice: 'fp16'" in capsys.readouterr().err


def test_minibatch_forward_equals_one_window_at_a_time(block0, tiny_opt_dir):
    """Captured kwargs (mask, RoPE tables) broadcast over a batch of windows: same outputs as one by one."""
    from omniquant.capture import block_forward

    block, _, x, kwargs, _ = block0
    with torch.no_grad():
        together = block_forward(block, x[:4], kwargs)
        alone = torch.cat([block_forward(block, x[i : i + 1], kwargs) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


def test_budget_aware_learning_rates():
    for kind in ("linear", "cosine", "constant"):
        for n in (8, 32, 2560):
            f = schedule_factors(n, kind)
            assert len(f) == n and f[0] == 1.0 and min(f) > 0
            lr = block_train.peak_lr("lwc", CalibConfig(lr_schedule=kind), f)
            assert math.isclose(lr * math.sqrt(sum(f)), LR_GROUPS["lwc"].rate)
    f = schedule_factors(10, "linear")
    assert block_train.peak_lr("lwc", CalibConfig(lwc_lr=0.3), f) == 0.3  # explicit: the peak rate
    assert block_train.peak_lr("let", CalibConfig(), f) == CalibConfig().let_lr


def test_beta1_is_the_optimizers_first_moment_decay(block0, monkeypatch):
    """--beta1 reaches AdamW as betas (beta1, 0.999), and the trained parameters depend on it."""
    seen, real = [], torch.optim.AdamW

    def spy(*args, **kwargs):
        opt = real(*args, **kwargs)
        seen.append(opt.defaults["betas"])
        return opt

    monkeypatch.setattr(torch.optim, "AdamW", spy)
    states = {}
    for beta1 in (0.5, 0.9):
        block, x, kwargs, target = _quantized_block(block0, "blockap")
        train_block(block, x, target, None, kwargs, CalibConfig(wbits=2, group_size=64, epochs=2, nsamples=8,
                                                                recipe="blockap", amp="off", beta1=beta1), None, "t")
        states[beta1] = learned_state(block)
    assert seen == [(0.5, 0.999), (0.9, 0.999)]
    assert CalibConfig().beta1 == 0.5
    assert not _equal_state(states[0.5], states[0.9])


def test_beta1_out_of_range_is_a_clear_error():
    from omniquant.calibrate import validate

    for bad in (1.0, -0.1):
        with pytest.raises(UserError, match="--beta1 must be in"):
            validate(CalibConfig(beta1=bad))


def _record_losses(monkeypatch, block, bump_after=None, nan_at=None):
    """Wrap mse_loss: record (loss, learned state that produced it) per call; add 10 to the loss after call
    `bump_after` (a worse, still finite loss), NaN at call `nan_at`."""
    seen = []
    real = torch.nn.functional.mse_loss

    def mse(a, b):
        loss = real(a, b)
        n = len(seen) + 1
        if bump_after is not None and n > bump_after:
            loss = loss + 10.0
        if nan_at is not None and n == nan_at:
            loss = loss * float("nan")
        seen.append((float(loss.detach()), learned_state(block)))
        return loss

    monkeypatch.setattr(torch.nn.functional, "mse_loss", mse)
    return seen


def _equal_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("keep_best", [True, False])
def test_keep_best_restores_the_best_parameters(keep_best, block0, monkeypatch):
    block, x, kwargs, target = _quantized_block(block0, "lwc")
    seen = _record_losses(monkeypatch, block, bump_after=3)
    cfg = CalibConfig(wbits=2, group_size=64, epochs=2, nsamples=8, batch_size=2, keep_best=keep_best)
    log = train_block(block, x, target, None, kwargs, cfg, None, "test")
    assert len(seen) == 8 + 1  # 8 steps + the final state scored on the first batch
    final = learned_state(block)
    if keep_best:
        best = min(range(len(seen)), key=lambda i: seen[i][0])
        assert best < 3 and _equal_state(final, seen[best][1]) and log["best"]["step"] == best
        assert not _equal_state(final, seen[-1][1])
    else:
        assert _equal_state(final, seen[-1][1])


@pytest.mark.parametrize("keep_best", [True, False])
@pytest.mark.parametrize("recipe", ALL)
def test_nan_restores_the_last_finite_state(recipe, keep_best, block0, monkeypatch):
    block, x, kwargs, target = _quantized_block(block0, recipe)
    seen = _record_losses(monkeypatch, block, nan_at=6)
    cfg = CalibConfig(wbits=2, group_size=64, epochs=3, nsamples=8, batch_size=2, recipe=recipe, keep_best=keep_best)
    log = train_block(block, x, target, None, kwargs, cfg, None, "test")
    assert len(seen) == 6 and log["nan"] == {"epoch": 1, "step": 1}
    finite = seen[:5]
    want = min(range(5), key=lambda i: finite[i][0]) if keep_best else 4
    assert _equal_state(learned_state(block), finite[want][1])
    assert all(torch.isfinite(p).all() for p in block.parameters())


# ------------------------------------------------------------------------------------ checkpoints, pack, resume

_CKPTS: dict = {}


@pytest.fixture
def checkpoint(tiny_llama_dir, calib_text, tmp_path_factory):
    """calibrate_checkpoint of the tiny Llama with a recipe (W3 g64, 2 epochs of 2 batches of 2); cached."""
    from omniquant.calibrate import calibrate_checkpoint

    def make(recipe):
        if recipe not in _CKPTS:
            out = tmp_path_factory.mktemp("recipes") / recipe.replace("+", "_")
            _CKPTS[recipe] = calibrate_checkpoint(tiny_llama_dir, out, recipe=recipe, calib_data=calib_text, **SMALL)
        return _CKPTS[recipe]

    return make


@pytest.mark.parametrize("recipe", ALL)
def test_recipe_checkpoint_packs_and_unpacks_bit_exactly(recipe, checkpoint, tmp_path):
    from mlc_schemes import load_packed, pack_checkpoint
    from mlc_schemes.unpack import dequantized_state_dict

    fq = checkpoint(recipe)
    qc = json.loads((fq / "quant_config.json").read_text())
    assert qc["recipe"] == recipe and qc["calibration"]["block_log"][0]["lr"]
    packed = pack_checkpoint(fq, "w3a16g64asym", tmp_path / "packed", progress=False)
    cfg, params = load_packed(packed)
    state = dequantized_state_dict(cfg, params)
    ref = load_file(str(fq / "model.safetensors"))
    for name in qc["quantized_linears"]:
        np.testing.assert_array_equal(state[f"{name}.weight"].view(np.uint32),
                                      ref[f"{name}.weight"].numpy().view(np.uint32), err_msg=name)


def test_blockap_changes_the_weights_and_stays_exact(checkpoint, tiny_llama_dir):
    """Block-AP's codes are not those of its own scales/zeros applied to the original weights (the weights were
    trained), and the exported weights are exactly their codes (checked again here, independently of pack)."""
    fq = checkpoint("blockap")
    orig = load_file(str(tiny_llama_dir / "model.safetensors"))
    new, side = load_file(str(fq / "model.safetensors")), load_file(str(fq / "quant_params.safetensors"))
    qlin = json.loads((fq / "quant_config.json").read_text())["quantized_linears"]
    moved = 0
    for name in qlin:
        s, z = side[f"{name}.scales"], side[f"{name}.zeros"]
        codes = recompute_codes(new[f"{name}.weight"], s, z, 3, 64)
        assert torch.equal(dequantize(codes, s, z, 64), new[f"{name}.weight"]), name
        moved += int((codes != recompute_codes(orig[f"{name}.weight"], s, z, 3, 64)).sum())
    assert moved > 0


@pytest.mark.parametrize("recipe", ALL)
def test_resume_is_bit_exact(recipe, checkpoint, tiny_llama_dir, calib_text, tmp_path, monkeypatch):
    """A run that dies after block 0 (its learned state saved) and is resumed equals the uninterrupted run."""
    from omniquant.calibrate import calibrate_checkpoint

    full = checkpoint(recipe)

    def crash(i):
        if i == 0:
            raise KeyboardInterrupt("simulated crash after block 0")

    out, state = tmp_path / "resumed", tmp_path / "resumed.state"
    with monkeypatch.context() as m:
        m.setattr(bw, "_kill_hook", crash)
        with pytest.raises(KeyboardInterrupt):
            calibrate_checkpoint(tiny_llama_dir, out, recipe=recipe, calib_data=calib_text, **SMALL)
    assert (state / "block_0000.safetensors").exists() and not out.exists()
    calibrate_checkpoint(tiny_llama_dir, out, recipe=recipe, calib_data=calib_text, resume=state, **SMALL)
    for f in ("model.safetensors", "quant_params.safetensors"):
        a, b = load_file(str(full / f)), load_file(str(out / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f


def test_unknown_recipe_is_a_clear_error(tiny_llama_dir, calib_text, tmp_path, capsys):
    from omniquant.calibrate import calibrate_checkpoint
    from omniquant.cli import main

    with pytest.raises(UserError, match=r"--recipe 'lwc\+clip' is unknown; choose one of lwc, lwc\+round, blockap"):
        calibrate_checkpoint(tiny_llama_dir, tmp_path / "o", recipe="lwc+clip", calib_data=calib_text, **SMALL)
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit) as e:
        main(["calibrate", "--model", str(tiny_llama_dir), "--output", str(tmp_path / "o"), "--recipe", "gptq"])
    assert e.value.code == 2 and "invalid choice: 'gptq'" in capsys.readouterr().err


def test_best_recipe_follows_the_table():
    from omniquant.quant.recipes import BEST

    for bits, name in BEST.items():
        assert resolve_recipe("best", bits).name == name
    assert resolve_recipe("lwc+round", 2).name == "lwc+round"


@pytest.mark.parametrize("recipe", ["lwc+round", "blockap"])
def test_recipe_combines_with_let(recipe, tiny_llama_dir, calib_text, tmp_path):
    """LET (weight-activation W8A8 here) trains together with the recipe's parameters and fuses before export;
    the export's exactness check passes and LET moved the norms."""
    from omniquant.calibrate import calibrate_checkpoint

    out = calibrate_checkpoint(tiny_llama_dir, tmp_path / "o", recipe=recipe, let=True, abits=8,
                               calib_data=calib_text, **{**SMALL, "group_size": -1})
    qc = json.loads((out / "quant_config.json").read_text())
    assert qc["recipe"] == recipe and "let" in qc["calibration"]["block_log"][0]["lr"]
    new, orig = load_file(str(out / "model.safetensors")), load_file(str(tiny_llama_dir / "model.safetensors"))
    assert not torch.equal(new["model.layers.0.input_layernorm.weight"], orig["model.layers.0.input_layernorm.weight"])
