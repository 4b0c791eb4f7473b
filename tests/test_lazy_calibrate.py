"""Bounded-memory calibration: the lazy path (checkpoint opened on the meta device, one block at a time, output
written block by block) against the whole-model in-memory reference, peak memory, and bad checkpoints / full disk."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from omniquant.cli import main
from omniquant.config import CalibConfig
from omniquant.errors import UserError
from omniquant.safetensors_io import SafetensorsDir

REPO = Path(__file__).resolve().parents[1]


def _resave(src: Path, dst: Path, dtype: torch.dtype, max_shard_size="100KB") -> Path:
    """`src` converted to `dtype` and saved in several shards with an index, tokenizer copied."""
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(src, dtype=dtype).save_pretrained(dst, max_shard_size=max_shard_size)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, dst / f.name)
    return dst


@pytest.fixture(scope="module")
def fp16_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    d = _resave(tiny_llama_dir, tmp_path_factory.mktemp("lazy") / "fp16", torch.float16)
    assert (d / "model.safetensors.index.json").exists() and len(list(d.glob("model-*.safetensors"))) > 3
    return d


@pytest.fixture(scope="module")
def opt16_dir(tiny_opt_dir, tmp_path_factory) -> Path:
    return _resave(tiny_opt_dir, tmp_path_factory.mktemp("lazy") / "opt16", torch.float16)


def _all(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for stem in ("model", "quant_params"):
        r = SafetensorsDir(d, stem)
        out |= {f"{stem}:{n}": r.get(n) for n in r.names()}
    return out


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    bad = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not bad, bad[:5]


@pytest.mark.parametrize("fixture,kw", [
    ("fp16_dir", {"wbits": 3, "group_size": 64, "epochs": 1, "aug_loss": True}),        # LWC, block-wise loop
    ("opt16_dir", {"wbits": 4, "abits": 4, "let": True, "group_size": 64, "epochs": 1}),  # LET + act quant, shifts (OPT)
])
def test_lazy_equals_in_memory_bit_for_bit(fixture, kw, request, calib_text, tmp_path):
    """A multi-shard float16 checkpoint: the lazy path (blocks read in float16, upcast, written back in float16)
    gives exactly the files of the whole-model float32 reference exported in the source dtypes. Exact because
    float16 -> float32 is exact, the embedding output is widened before RoPE tables and masks are made, and both
    paths run the same float32 block computations in the same order."""
    from omniquant.calibrate import (
        calibrate_checkpoint,
        quantize_in_memory,
        source_dtypes,
    )
    from omniquant.export import save_fakequant

    src = request.getfixturevalue(fixture)
    settings = dict(nsamples=2, seqlen=32, seed=0, calib_data=calib_text, **kw)
    calibrate_checkpoint(src, tmp_path / "lazy", max_shard_bytes=150_000, **settings)
    model, tok, qc, qp = quantize_in_memory(src, CalibConfig(**settings), tmp_path / "mem.state")
    save_fakequant(model, tok, qp, qc, tmp_path / "mem", dtypes=source_dtypes(src), source_dir=src,
                   max_shard_bytes=150_000)
    _same(_all(tmp_path / "lazy"), _all(tmp_path / "mem"))
    assert (tmp_path / "lazy" / "model.safetensors.index.json").exists()
    index = json.loads((tmp_path / "lazy" / "model.safetensors.index.json").read_text())
    assert index == json.loads((tmp_path / "mem" / "model.safetensors.index.json").read_text())
    assert SafetensorsDir(tmp_path / "lazy").dtype("model.norm.weight" if fixture == "fp16_dir"
                                                   else "model.decoder.final_layer_norm.weight") == torch.float16
    if kw.get("let"):
        from safetensors.torch import load_file

        a, b = (load_file(str(tmp_path / d / "act_params.safetensors")) for d in ("lazy", "mem"))
        _same(a, b)
    for name in ("tokenizer.json", "generation_config.json"):
        assert (tmp_path / "lazy" / name).read_bytes() == (src / name).read_bytes()
    cfg = json.loads((tmp_path / "lazy" / "config.json").read_text())
    assert cfg["dtype"] == "float16" and cfg["use_cache"] is True


def test_streamed_act_stats_equal_whole_model_forward(fp16_dir, calib_text, tmp_path):
    """LET statistics collected block by block on the fp stream == one forward of the whole float32 model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from omniquant import act_stats
    from omniquant.calibrate import calibrate_checkpoint
    from omniquant.data import load_tokens, sample_windows
    from omniquant.models import get_adapter

    settings = {"wbits": 4, "abits": 8, "let": True, "group_size": -1, "epochs": 0, "nsamples": 2, "seqlen": 32, "seed": 5,
                    "calib_data": calib_text}
    calibrate_checkpoint(fp16_dir, tmp_path / "o", **settings)
    streamed = act_stats.read_stats(tmp_path / "o.act_stats.safetensors")[0]
    model = AutoModelForCausalLM.from_pretrained(fp16_dir, dtype=torch.float32).eval()
    windows = sample_windows(load_tokens(AutoTokenizer.from_pretrained(fp16_dir), calib_text), 2, 32, 5)
    ref = act_stats.collect(model, get_adapter("llama"), windows)
    _same(streamed, ref)


def test_disk_streams_give_the_same_checkpoint(fp16_dir, calib_text, tmp_path):
    from omniquant.calibrate import calibrate_checkpoint

    settings = {"wbits": 3, "group_size": 64, "epochs": 1, "nsamples": 2, "seqlen": 32, "seed": 1, "calib_data": calib_text}
    calibrate_checkpoint(fp16_dir, tmp_path / "ram", streams="memory", **settings)
    calibrate_checkpoint(fp16_dir, tmp_path / "disk", streams="disk", **settings)
    _same(_all(tmp_path / "ram"), _all(tmp_path / "disk"))
    assert not (tmp_path / "disk.state").exists()


PEAK_SCRIPT = textwrap.dedent("""
    import sys
    from omniquant.calibrate import calibrate_checkpoint
    calibrate_checkpoint(sys.argv[1], sys.argv[2], wbits=4, group_size=128, epochs=1, nsamples=1, seqlen=16,
                         calib_data=sys.argv[3])
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            print(int(line.split()[1]) * 1024)
""")


def _random_llama(path: Path, layers: int) -> Path:
    """float16 Llama with blocks of 7.1 M parameters (28 MB in float32), written shard by shard, one per layer."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=layers, num_attention_heads=6,
                      num_key_value_heads=6, vocab_size=512, max_position_embeddings=256, tie_word_embeddings=False)
    path.mkdir()
    cfg.save_pretrained(path)
    g = torch.Generator().manual_seed(0)
    shapes = {"self_attn.q_proj": (768, 768), "self_attn.k_proj": (768, 768), "self_attn.v_proj": (768, 768),
              "self_attn.o_proj": (768, 768), "mlp.gate_proj": (2048, 768), "mlp.up_proj": (2048, 768),
              "mlp.down_proj": (768, 2048)}
    weight_map = {}

    def shard(name, tensors):
        save_file(tensors, str(path / name), {"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))

    shard("embed.safetensors", {"model.embed_tokens.weight": torch.randn(512, 768, generator=g).half() * 0.02,
                                "model.norm.weight": torch.ones(768, dtype=torch.float16),
                                "lm_head.weight": torch.randn(512, 768, generator=g).half() * 0.02})
    for i in range(layers):
        p = f"model.layers.{i}."
        t = {p + f"{n}.weight": (torch.randn(s, generator=g) * 0.02).half() for n, s in shapes.items()}
        t |= {p + "input_layernorm.weight": torch.ones(768, dtype=torch.float16),
              p + "post_attention_layernorm.weight": torch.ones(768, dtype=torch.float16)}
        shard(f"layer{i}.safetensors", t)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    from omniquant.tiny import _train_tokenizer

    _train_tokenizer().save_pretrained(path)
    return path


def test_peak_memory_follows_one_block_not_the_model(tmp_path, calib_text):
    """12 vs 3 layers through calibrate (LWC, 1 epoch, block-wise loop): 9 more blocks are 255 MB in float32 and
    128 MB in float16; the peak RSS (VmHWM, separate processes) may grow by much less than one float32 block.

    glibc's malloc raises its mmap threshold to the size of each freed mmapped chunk (up to 32 MB), after which
    these blocks' 2-6 MB tensors come from the heap, whose freed holes are reused but not returned: measured +213 MB
    for 9 blocks that way, +0.6 MB with a fixed threshold. A fixed threshold (MALLOC_MMAP_THRESHOLD_) shows what the
    program keeps; at 7B sizes (tensors >= 32 MB, always mmapped) bench/memory.py measures the real process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    peaks = {}
    for layers in (3, 12):
        src = _random_llama(tmp_path / f"l{layers}", layers)
        r = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(src), str(tmp_path / f"o{layers}"), calib_text],
                           env=env, capture_output=True, text=True, check=False)
        assert r.returncode == 0, r.stderr[-3000:]
        peaks[layers] = int(r.stdout.strip().splitlines()[-1])
        shutil.rmtree(src)
    block_fp32 = (4 * 768 * 768 + 3 * 768 * 2048) * 4
    grew = peaks[12] - peaks[3]
    print(f"peak RSS 3 layers {peaks[3] / 2**20:.0f} MiB, 12 layers {peaks[12] / 2**20:.0f} MiB, "
          f"+{grew / 2**20:.1f} MiB (one float32 block {block_fp32 / 2**20:.0f} MiB)")
    assert grew < 0.5 * block_fp32, peaks


def test_missing_shard_bad_dtype_and_quantized_checkpoint_are_refused(fp16_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    def run(src):
        rc = main(["calibrate", "--model", str(src), "--output", str(tmp_path / "o"), "--wbits", "4",
                   "--epochs", "0", "--no-lwc"])
        err = capsys.readouterr().err
        assert rc == 2 and not (tmp_path / "o").exists() and err.count("\n") == 1, err
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.")]
        return err

    broken = tmp_path / "missing"
    shutil.copytree(fp16_dir, broken)
    victim = sorted(broken.glob("model-*.safetensors"))[1]
    victim.unlink()
    assert f"shard {victim.name} is listed in model.safetensors.index.json but missing" in run(broken)

    for dtype in (torch.float8_e4m3fn, torch.int8):
        bad = tmp_path / f"bad-{str(dtype)[6:]}"
        shutil.copytree(fp16_dir, bad)
        shard = min(bad.glob("model-*.safetensors"))
        t = load_file(str(shard))
        name = next(iter(t))
        t[name] = t[name].to(dtype)
        save_file(t, str(shard), {"format": "pt"})
        assert f"{name} is stored as {str(dtype)[6:]}; only float16, bfloat16 and float32" in run(bad)
        shutil.rmtree(bad)

    quantized = tmp_path / "gptq"
    shutil.copytree(fp16_dir, quantized)
    cfg = json.loads((quantized / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (quantized / "config.json").write_text(json.dumps(cfg))
    assert "is already quantized (gptq)" in run(quantized)


def test_disk_full_while_writing_leaves_nothing(fp16_dir, tmp_path, monkeypatch, capsys):
    """ENOSPC in the middle of the export (after some blocks were written): a clear error, no output directory and
    no temporary one; the state directory stays for --resume."""
    import omniquant.safetensors_io as sio

    real, written = os.pwrite, {"n": 0}

    def pwrite(fd, data, offset):
        written["n"] += 1
        if written["n"] == 12:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(sio.os, "pwrite", pwrite)
    out = tmp_path / "o"
    rc = main(["calibrate", "--model", str(fp16_dir), "--output", str(out), "--wbits", "4", "--epochs", "0",
               "--no-lwc"])
    err = capsys.readouterr().err
    assert rc == 2 and "disk full while writing" in err, err
    assert written["n"] == 12 and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.")]

    monkeypatch.setattr(sio, "free_bytes", lambda d: 1000)
    assert main(["calibrate", "--model", str(fp16_dir), "--output", str(out), "--wbits", "4", "--epochs", "0",
                 "--no-lwc", "--resume", str(tmp_path / "o.state")]) == 2
    assert "not enough disk space" in capsys.readouterr().err and not out.exists()


def test_stale_temporary_output_of_a_killed_run_is_removed(fp16_dir, tmp_path):
    from omniquant.calibrate import calibrate_checkpoint

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    stale = tmp_path / f".o.tmp-{int(dead.stdout)}"
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"partial")
    calibrate_checkpoint(fp16_dir, tmp_path / "o", wbits=4, epochs=0, lwc=False)
    assert not stale.exists() and (tmp_path / "o" / "quant_config.json").exists()


def test_unknown_stream_placement_is_rejected():
    from omniquant.streams import StreamFactory

    with pytest.raises(ValueError, match="stream placement"):
        StreamFactory((1, 2, 3), torch.device("cpu"), "gpu")
    with pytest.raises(UserError):
        SafetensorsDir(Path("/nonexistent-dir"))
