"""End-to-end scale tuning (--e2e-epochs, omniquant/e2e_scales.py): codes and zeros stay, only fp16 scales move, the
whole model's KL divergence from the float model drops, the checkpoint packs bit-exactly, the lazy path equals the in-memory one, a
non-finite loss keeps the last finite scales, and runs that cannot work are refused up front. Tiny models only."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import omniquant.e2e_scales as e2e
from omniquant.errors import UserError
from omniquant.quant.codes import recompute_codes

RUN = {"wbits": 2, "group_size": 64, "nsamples": 4, "seqlen": 64, "epochs": 1, "recipe": "blockap", "seed": 0}
_CKPTS: dict = {}


@pytest.fixture
def ckpt(trained_llama_dir, calib_text, tmp_path_factory):
    """calibrate_checkpoint of the trained tiny Llama, W2 g64 blockap, with `e2e_epochs` passes; cached."""
    from omniquant.calibrate import calibrate_checkpoint

    def make(e2e_epochs: int):
        if e2e_epochs not in _CKPTS:
            out = tmp_path_factory.mktemp("e2e") / f"e{e2e_epochs}"
            _CKPTS[e2e_epochs] = calibrate_checkpoint(trained_llama_dir, out, calib_data=calib_text,
                                                      e2e_epochs=e2e_epochs, **RUN)
        return _CKPTS[e2e_epochs]

    return make


def _logprobs(model_dir, calib_text) -> torch.Tensor:
    """float64 log-probabilities [n, L, V] of a checkpoint on the run's own calibration windows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from omniquant.data import load_tokens, sample_windows

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).double().eval()
    ids = sample_windows(load_tokens(AutoTokenizer.from_pretrained(model_dir), calib_text, split="calib"),
                         RUN["nsamples"], RUN["seqlen"], RUN["seed"])
    with torch.no_grad():
        return torch.log_softmax(model(ids).logits, dim=-1)


def _kl_to_float(fp: torch.Tensor, q: torch.Tensor) -> float:
    """Mean over tokens of KL(p_fp || p_q), float64."""
    return float((fp.exp() * (fp - q)).sum(-1).mean())


def _sidecar(d):
    return load_file(str(d / "quant_params.safetensors")), load_file(str(d / "model.safetensors"))


def test_only_scales_move_and_the_distance_to_the_float_model_drops(ckpt, trained_llama_dir, calib_text):
    base, tuned = ckpt(0), ckpt(2)
    (s0, w0), (s1, w1) = _sidecar(base), _sidecar(tuned)
    qc = json.loads((tuned / "quant_config.json").read_text())
    log = qc["calibration"]["e2e"]
    assert log["steps"] == 2 * RUN["nsamples"] and log["nan"] is None and len(log["epoch_loss"]) == 2
    moved = 0
    for name in qc["quantized_linears"]:
        assert torch.equal(s0[f"{name}.zeros"], s1[f"{name}.zeros"]), name
        scales = s1[f"{name}.scales"]
        assert torch.equal(scales.half().float(), scales), name  # fp16-exact
        c0 = recompute_codes(w0[f"{name}.weight"], s0[f"{name}.scales"], s0[f"{name}.zeros"], 2, 64)
        c1 = recompute_codes(w1[f"{name}.weight"], scales, s1[f"{name}.zeros"], 2, 64)
        assert torch.equal(c0, c1), name  # the block loop's codes, untouched
        moved += int((scales != s0[f"{name}.scales"]).sum())
    assert moved > 0
    fp = _logprobs(trained_llama_dir, calib_text)
    assert _kl_to_float(fp, _logprobs(tuned, calib_text)) < _kl_to_float(fp, _logprobs(base, calib_text))


def test_tuned_checkpoint_packs_and_unpacks_bit_exactly(ckpt, tmp_path):
    from mlc_schemes import load_packed, pack_checkpoint
    from mlc_schemes.unpack import dequantized_state_dict

    fq = ckpt(2)
    cfg, params = load_packed(pack_checkpoint(fq, "w2a16g64asym", tmp_path / "packed", progress=False))
    state, ref = dequantized_state_dict(cfg, params), load_file(str(fq / "model.safetensors"))
    for name in json.loads((fq / "quant_config.json").read_text())["quantized_linears"]:
        np.testing.assert_array_equal(state[f"{name}.weight"].view(np.uint32),
                                      ref[f"{name}.weight"].numpy().view(np.uint32), err_msg=name)


def test_lazy_path_equals_in_memory(ckpt, trained_llama_dir, calib_text, tmp_path):
    from omniquant.calibrate import quantize_in_memory
    from omniquant.config import CalibConfig

    model, _, qc, qparams = quantize_in_memory(trained_llama_dir, CalibConfig(calib_data=calib_text, e2e_epochs=2,
                                                                               **RUN), tmp_path / "state")
    side, weights = _sidecar(ckpt(2))
    assert qc["calibration"]["e2e"] == json.loads((ckpt(2) / "quant_config.json").read_text())["calibration"]["e2e"]
    for name, (scales, _) in qparams.items():
        assert torch.equal(side[f"{name}.scales"], scales), name
        assert torch.equal(weights[f"{name}.weight"], model.get_submodule(name).weight.detach()), name


def test_beta1_reaches_the_e2e_optimizer(trained_llama_dir, calib_text, tmp_path, monkeypatch):
    """--beta1 is the first-moment decay of the e2e stage's AdamW as well as the block loop's."""
    from omniquant.calibrate import calibrate_checkpoint

    seen, real = [], torch.optim.AdamW

    def spy(params, **kwargs):
        opt = real(params, **kwargs)
        seen.append(opt.defaults["betas"])
        return opt

    monkeypatch.setattr(torch.optim, "AdamW", spy)
    calibrate_checkpoint(trained_llama_dir, tmp_path / "o", calib_data=calib_text, e2e_epochs=1, beta1=0.7,
                         **{**RUN, "nsamples": 2})
    n_blocks = json.loads((trained_llama_dir / "config.json").read_text())["num_hidden_layers"]
    assert seen == [(0.7, 0.999)] * (n_blocks + 1)  # one optimizer per block, then the e2e stage's


@pytest.mark.parametrize("bad_step", [0, 2])
def test_non_finite_loss_keeps_the_last_finite_scales(bad_step, ckpt, trained_llama_dir, calib_text, tmp_path,
                                                      monkeypatch):
    """A NaN loss at the first step leaves the block loop's scales bit for bit; later, finite scales that differ."""
    from omniquant.calibrate import calibrate_checkpoint

    real, calls = e2e._loss, []

    def loss(*args):
        calls.append(1)
        out = real(*args)
        return out * float("nan") if len(calls) == bad_step + 1 else out

    monkeypatch.setattr(e2e, "_loss", loss)
    out = calibrate_checkpoint(trained_llama_dir, tmp_path / "o", calib_data=calib_text, e2e_epochs=2, **RUN)
    assert json.loads((out / "quant_config.json").read_text())["calibration"]["e2e"]["nan"] == bad_step
    (s, _), (s0, _) = _sidecar(out), _sidecar(ckpt(0))
    assert all(torch.isfinite(v).all() for v in s.values())
    same = all(torch.equal(s[k], s0[k]) for k in s)
    assert same == (bad_step == 0)


def test_runs_that_cannot_work_are_refused_up_front(tiny_llama_dir, calib_text, tmp_path, monkeypatch):
    from omniquant.calibrate import calibrate_checkpoint

    with pytest.raises(UserError, match="--e2e-epochs must be >= 0"):
        calibrate_checkpoint(tiny_llama_dir, tmp_path / "o", calib_data=calib_text, **{**RUN, "e2e_epochs": -1})
    with pytest.raises(UserError, match="weight-only"):
        calibrate_checkpoint(tiny_llama_dir, tmp_path / "o", calib_data=calib_text, e2e_epochs=1, abits=8,
                             **{**RUN, "group_size": -1})
    monkeypatch.setattr(e2e, "memory_budget", lambda device: (1 << 20, 1 << 20))
    with pytest.raises(UserError, match=r"needs about .* GiB of RAM.*--e2e-epochs 0"):
        calibrate_checkpoint(tiny_llama_dir, tmp_path / "o", calib_data=calib_text, e2e_epochs=1, **RUN)
    assert not (tmp_path / "o").exists() and not list(tmp_path.iterdir())


def test_memory_check_on_a_gpu_counts_device_memory_and_ram(monkeypatch):
    """On CUDA the weights and q - z go to the device, the hidden states and the float32 load stay in RAM: either
    one short is refused, both enough passes (no GPU needed: the budget is monkeypatched)."""
    from omniquant.config import CalibConfig

    cfg = CalibConfig(device="cuda", e2e_epochs=1, nsamples=16, seqlen=512)
    n, hidden, gib = 135_000_000, 576, 1 << 30
    states = 8 * 16 * 512 * hidden
    monkeypatch.setattr(e2e, "memory_budget", lambda device: (6 * n - 1, 100 * gib))
    with pytest.raises(UserError, match="GiB of cuda memory"):
        e2e.check_fits(n, hidden, cfg)
    monkeypatch.setattr(e2e, "memory_budget", lambda device: (6 * n, 4 * n + states - 1))
    with pytest.raises(UserError, match="GiB of RAM"):
        e2e.check_fits(n, hidden, cfg)
    monkeypatch.setattr(e2e, "memory_budget", lambda device: (6 * n, 4 * n + states))
    e2e.check_fits(n, hidden, cfg)


@pytest.mark.parametrize("fixture", ["tiny_qwen3_dir", "tiny_gemma3_dir", "tiny_opt_dir"])
def test_other_architectures_keep_their_codes(fixture, request, calib_text, tmp_path):
    """Qwen3 (q/k norms), multimodal Gemma 3 (BOS-first windows, nested language model) and OPT: the stage runs on
    the reloaded checkpoint and leaves every code as the block loop wrote it."""
    from omniquant.calibrate import calibrate_checkpoint

    model_dir = request.getfixturevalue(fixture)
    run = {**RUN, "wbits": 3, "group_size": 32, "nsamples": 2, "seqlen": 32}
    base = calibrate_checkpoint(model_dir, tmp_path / "b", calib_data=calib_text, **run)
    tuned = calibrate_checkpoint(model_dir, tmp_path / "t", calib_data=calib_text, e2e_epochs=1, **run)
    (s0, w0), (s1, w1) = _sidecar(base), _sidecar(tuned)
    qc = json.loads((tuned / "quant_config.json").read_text())
    assert qc["calibration"]["e2e"]["steps"] == 2
    moved = 0
    for name in qc["quantized_linears"]:
        c0 = recompute_codes(w0[f"{name}.weight"], s0[f"{name}.scales"], s0[f"{name}.zeros"], 3, 32)
        c1 = recompute_codes(w1[f"{name}.weight"], s1[f"{name}.scales"], s1[f"{name}.zeros"], 3, 32)
        assert torch.equal(c0, c1), name
        moved += int((s0[f"{name}.scales"] != s1[f"{name}.scales"]).sum())
    assert moved > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_scale_weight_and_gradient_match_float64(dtype):
    """The stage's weight (q - z) * s * exp(a) with a ragged last group (K = 80, groups of 32), built in `dtype`, and
    the gradient of its log-factors, against the same formula in float64 autograd."""
    g = torch.Generator().manual_seed(0)
    n, k, gs = 6, 80, 32
    codes = torch.randint(0, 8, (n, k), generator=g)
    zeros = torch.randint(0, 8, (n, 3), generator=g)
    scales = (torch.rand(n, 3, generator=g) * 0.1).half().float()
    dq = e2e.GroupScaleDequant(codes, scales, zeros, gs, dtype)
    with torch.no_grad():
        dq.log_factor.copy_(torch.randn(n, 3, generator=g) * 0.1)
    upstream = torch.randn(n, k, generator=g)

    cols = torch.arange(k) // gs
    a64 = dq.log_factor.detach().double().requires_grad_()
    w64 = (codes.double() - zeros.double()[:, cols]) * (scales.double() * torch.exp(a64))[:, cols]
    (w64 * upstream.to(dtype).double()).sum().backward()

    w = dq(None)
    assert w.dtype == dtype and w.shape == (n, k)
    s32 = dq.scale().detach()  # float32 s * exp(a); each weight is one float32 product, rounded once into dtype
    assert torch.equal(w, ((codes - zeros[:, cols]).double() * s32.double()[:, cols]).float().to(dtype))
    (w.float() * upstream.to(dtype).float()).sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(dq.log_factor.grad.double(), a64.grad, rtol=tol, atol=tol)
    fp16 = (scales * 1.5).half().float()  # the export: exact for fp16 scales
    assert torch.equal(dq.weight(fp16), ((codes - zeros[:, cols]).double() * fp16.double()[:, cols]).float())


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen3_dir", "tiny_gemma3_dir", "tiny_opt_dir"])
def test_final_hidden_is_the_float_models_last_hidden_state(fixture, request):
    """capture.final_hidden (the e2e stage's targets: the float blocks' outputs, here chained block by block as the
    block loop's fp stream is, through the model's own tail) equals the model's last hidden state."""
    from transformers import AutoModelForCausalLM

    from omniquant.capture import block_forward, capture_block_inputs, final_hidden
    from omniquant.models import get_adapter

    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(fixture), dtype=torch.float32).eval()
    blocks = get_adapter(model.config.model_type).blocks(model)
    vocab = model.config.get_text_config().vocab_size
    windows = torch.randint(3, vocab, (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x, kwargs = capture_block_inputs(model, blocks, windows)
        for i, block in enumerate(blocks):
            x = torch.cat([block_forward(block, x[j : j + 1], kwargs[i]) for j in range(x.shape[0])])
        ref = model.base_model(windows, use_cache=False).last_hidden_state
    torch.testing.assert_close(final_hidden(model, blocks, windows, x), ref, rtol=1e-5, atol=1e-5)


def test_chunked_head_loss_and_gradient_match_float64(tiny_llama_dir, monkeypatch):
    """The stage's loss, evaluated in chunks of 5 tokens (the last one ragged), and its gradient w.r.t. the last
    hidden state, against an unchunked float64 KL(p_fp || p_q)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval().requires_grad_(False)
    vocab = model.get_output_embeddings().weight.shape[0]
    monkeypatch.setattr(e2e, "HEAD_CHUNK", 5 * vocab)
    g = torch.Generator().manual_seed(0)
    h, target = torch.randn(1, 23, model.config.hidden_size, generator=g), torch.randn(1, 23, model.config.hidden_size, generator=g)

    h32 = h.clone().requires_grad_()
    loss = e2e._HeadKL.apply(h32, target, model, False)
    loss.backward()
    h64 = h.double().requires_grad_()
    head = model.get_output_embeddings().weight.double()
    ref = torch.log_softmax(target.double() @ head.T, -1)
    kl = (ref.exp() * (ref - torch.log_softmax(h64 @ head.T, -1))).sum(-1).mean()
    kl.backward()
    torch.testing.assert_close(loss.double(), kl.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h32.grad.double(), h64.grad, rtol=1e-4, atol=1e-7)
