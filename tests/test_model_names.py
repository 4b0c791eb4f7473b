"""`--model` names: directories, presets and hub ids resolved through an on-disk Hugging Face cache, offline.

The cache is built here in huggingface_hub's real layout (models--org--name/{blobs,refs,snapshots/<commit>} with
relative symlinks into blobs/); nothing touches the network (sockets are refused for the whole module).
"""

import hashlib
import json
import os
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from omniquant import hub
from omniquant.cli import main
from omniquant.errors import UserError

COMMIT = "0123456789abcdef0123456789abcdef01234567"
COMMIT2 = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """Offline, a per-test HF_HOME, and any socket connection is an error (proves nothing reaches the network)."""
    def refuse(*a, **k):
        raise AssertionError(f"network access attempted: {a}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)


def add_to_cache(cache: Path, repo_id: str, src: Path, commit: str = COMMIT, ref: str | None = "main",
                 skip: tuple[str, ...] = ()) -> Path:
    """Put the files of `src` into `cache` as huggingface_hub stores a download: content-addressed blobs, a snapshot
    of relative symlinks, refs/<ref> holding the commit. Files in `skip` get a dangling link (an interrupted download)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        if f.name not in skip:
            blob.write_bytes(data)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    if ref:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snap


def home_cache() -> Path:
    return Path(os.environ["HF_HOME"]) / "hub"


def _tensors(d: Path) -> dict:
    return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_hub_id_resolves_from_hf_home_cache(tiny_llama_dir):
    snap = add_to_cache(home_cache(), "tiny-org/tiny-llama", tiny_llama_dir)
    got = hub.resolve_model("tiny-org/tiny-llama")
    assert got == snap and hub.missing_files(got) == []
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(got).model_type == "llama"
    # a commit hash as --revision finds the same snapshot
    assert hub.resolve_model("tiny-org/tiny-llama", revision=COMMIT) == snap


def test_hf_hub_cache_overrides_hf_home(tiny_llama_dir, tmp_path, monkeypatch):
    other = tmp_path / "elsewhere"
    snap = add_to_cache(other, "tiny-org/tiny-llama", tiny_llama_dir)
    with pytest.raises(UserError, match="not in the local Hugging Face cache"):
        hub.resolve_model("tiny-org/tiny-llama")  # HF_HOME's cache is empty
    monkeypatch.setenv("HF_HUB_CACHE", str(other))
    assert hub.cache_dir() == other
    assert hub.resolve_model("tiny-org/tiny-llama") == snap


def test_preset_resolves_through_cache(tiny_llama_dir):
    assert hub.PRESETS["llama2-7b"] == "meta-llama/Llama-2-7b-hf"
    snap = add_to_cache(home_cache(), "meta-llama/Llama-2-7b-hf", tiny_llama_dir)
    assert hub.resolve_model("llama2-7b") == snap


def test_missing_offline_model_names_repo_preset_and_setting():
    with pytest.raises(UserError) as e:
        hub.resolve_model("llama3.1-8b")
    msg = str(e.value)
    for part in ("meta-llama/Llama-3.1-8B", "preset llama3.1-8b", "HF_HUB_OFFLINE=1", str(home_cache()), "HF_HOME"):
        assert part in msg, (part, msg)
    with pytest.raises(UserError, match=r"some-org/some-model.*HF_HUB_OFFLINE=1.*no local directory some-org/some"):
        hub.resolve_model("some-org/some-model")


def test_uncached_revision_is_a_clear_error(tiny_llama_dir):
    add_to_cache(home_cache(), "tiny-org/tiny-llama", tiny_llama_dir)
    for rev in ("v2.0", COMMIT2):
        with pytest.raises(UserError, match=f"tiny-org/tiny-llama at revision {rev}: it is not in the local .*"
                                            "HF_HUB_OFFLINE=1"):
            hub.resolve_model("tiny-org/tiny-llama", revision=rev)


def test_tag_revision_resolves_through_refs(tiny_llama_dir):
    add_to_cache(home_cache(), "tiny-org/tiny-llama", tiny_llama_dir)
    snap2 = add_to_cache(home_cache(), "tiny-org/tiny-llama", tiny_llama_dir, commit=COMMIT2, ref="v2.0")
    assert hub.resolve_model("tiny-org/tiny-llama", revision="v2.0") == snap2
    assert hub.resolve_model("tiny-org/tiny-llama") != snap2


def test_incomplete_snapshot_offline_names_missing_file(tiny_llama_dir):
    add_to_cache(home_cache(), "tiny-org/tiny-llama", tiny_llama_dir, skip=("model.safetensors",))
    with pytest.raises(UserError, match=r"cached snapshot .* lacks model weights .*HF_HUB_OFFLINE=1"):
        hub.resolve_model("tiny-org/tiny-llama")


def test_sharded_index_needs_every_shard(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "tokenizer.json").write_text("{}")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    (d / "model-00001-of-00002.safetensors").write_bytes(b"x")
    assert hub.missing_files(d) == ["model-00002-of-00002.safetensors"]
    (d / "model-00002-of-00002.safetensors").write_bytes(b"x")
    assert hub.missing_files(d) == []


def test_unknown_names_list_presets(tmp_path):
    with pytest.raises(UserError) as e:
        hub.resolve_model("llama2-7")
    msg = str(e.value)
    assert "neither a directory, a preset, nor a Hugging Face hub id" in msg and "Did you mean llama2-7b" in msg
    assert all(p in msg for p in ("smollm2", "llama2-70b", "qwen2.5-7b", "mistral-7b"))
    with pytest.raises(UserError, match="model directory .*/nope/deeper does not exist"):
        hub.resolve_model(tmp_path / "nope" / "deeper")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no config.json"):
        hub.resolve_model(tmp_path / "empty")


def test_local_directory_and_revision(tiny_llama_dir):
    assert hub.resolve_model(tiny_llama_dir) == tiny_llama_dir
    with pytest.raises(UserError, match="--revision main applies to hub models"):
        hub.resolve_model(tiny_llama_dir, revision="main")


def test_smollm2_keeps_its_local_meaning(monkeypatch, tmp_path):
    import omniquant.real_model as rm

    monkeypatch.setitem(rm.KNOWN_MODELS, "smollm2", lambda: tmp_path / "prepared")
    assert hub.resolve_model("smollm2") == tmp_path / "prepared"


def test_select_files_takes_only_what_a_causal_lm_loads():
    listing = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
               "special_tokens_map.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
               "model-00002-of-00002.safetensors", "consolidated.safetensors", "pytorch_model.bin.index.json",
               "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin", "original/params.json",
               "original/consolidated.00.pth", "onnx/model.onnx", "model.Q4_0.gguf", "README.md", "LICENSE.txt",
               ".gitattributes"]
    assert hub.select_files(listing) == sorted([
        "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
        "special_tokens_map.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors"])
    bin_only = ["config.json", "pytorch_model.bin", "vocab.json", "merges.txt", "tf_model.h5", "flax_model.msgpack"]
    assert hub.select_files(bin_only) == ["config.json", "merges.txt", "pytorch_model.bin", "vocab.json"]


def test_online_download_fetches_selected_files_into_the_cache(tiny_llama_dir, monkeypatch):
    """With HF_HUB_OFFLINE unset and nothing cached: the repo is listed, only the needed files are requested, into
    the cache dir taken from the environment (the hub client is replaced by a local fake: no network)."""
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE")
    calls = {}

    def list_repo_files(self, repo_id, revision=None, **k):
        calls["listed"] = (repo_id, revision)
        return [f.name for f in tiny_llama_dir.iterdir()] + ["pytorch_model.bin", "original/consolidated.00.pth"]

    def snapshot_download(repo_id, *, revision=None, cache_dir=None, allow_patterns=None, **k):
        calls["download"] = (repo_id, revision, Path(cache_dir), sorted(allow_patterns))
        return str(add_to_cache(Path(cache_dir), repo_id, tiny_llama_dir))

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    got = hub.resolve_model("mistral-7b")
    assert calls["listed"] == ("mistralai/Mistral-7B-v0.1", None)
    assert calls["download"] == ("mistralai/Mistral-7B-v0.1", None, home_cache(),
                                 sorted(f.name for f in tiny_llama_dir.iterdir()))
    assert got == home_cache() / "models--mistralai--Mistral-7B-v0.1" / "snapshots" / COMMIT
    # second call: served from the cache, the hub is not asked again
    calls.clear()
    assert hub.resolve_model("mistral-7b") == got and not calls


def _hub_error(cls, status):
    import httpx2

    return cls("boom", response=httpx2.Response(status, request=httpx2.Request("GET", "https://hub.invalid/x")))


@pytest.mark.parametrize("make_error, expected", [
    (lambda: _hub_error(__import__("huggingface_hub.errors").errors.GatedRepoError, 401),
     r"meta-llama/Llama-2-7b-hf \(preset llama2-7b\) is gated and no token is set.*HF_TOKEN.*HF_HUB_OFFLINE is not set"),
    (lambda: _hub_error(__import__("huggingface_hub.errors").errors.RepositoryNotFoundError, 404),
     r"meta-llama/Llama-2-7b-hf \(preset llama2-7b\) not found on the Hugging Face hub"),
    (lambda: __import__("httpx2").ConnectError("connection refused"),
     r"meta-llama/Llama-2-7b-hf \(preset llama2-7b\): the Hugging Face hub could not be reached \(ConnectError"),
])
def test_online_failures_are_clear(make_error, expected, monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)  # no HF_TOKEN, no saved login

    def fail(*a, **k):
        raise make_error()

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", fail)
    with pytest.raises(UserError, match=expected):
        hub.resolve_model("llama2-7b")


def test_calibrate_and_ppl_through_a_hub_id(tiny_llama_dir, eval_text, tmp_path, capsys):
    """The CLI resolves a hub id offline from the cache; the result equals calibrating the directory itself."""
    add_to_cache(home_cache(), "tiny-org/tiny-llama", tiny_llama_dir)
    common = ["--wbits", "4", "--group-size", "64", "--epochs", "0", "--no-lwc", "--calib-data", "unused.txt"]
    assert main(["calibrate", "--model", "tiny-org/tiny-llama", *common, "--output", str(tmp_path / "hub")]) == 0
    assert main(["calibrate", "--model", str(tiny_llama_dir), *common, "--output", str(tmp_path / "dir")]) == 0
    a, b = _tensors(tmp_path / "hub"), _tensors(tmp_path / "dir")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert main(["calibrate", "--model", "tiny-org/tiny-llama", "--revision", "v9", *common,
                 "--output", str(tmp_path / "rev")]) == 2
    assert "revision v9" in capsys.readouterr().err and not (tmp_path / "rev").exists()

    text = tmp_path / "eval.txt"
    text.write_text(Path(eval_text.split(",")[0]).read_text()[:20000])
    ppl = []
    for model in ("tiny-org/tiny-llama", str(tiny_llama_dir)):
        assert main(["ppl", "--model", model, "--data", str(text), "--seqlen", "32", "--max-windows", "2"]) == 0
        ppl.append(capsys.readouterr().out)
    assert ppl[0] == ppl[1] and "perplexity" in ppl[0]


def test_makefile_names_output_after_the_repo(tmp_path):
    import shutil
    import subprocess

    if not shutil.which("make"):
        pytest.skip("make not installed")
    root = Path(__file__).resolve().parents[1]
    for model, out in (("meta-llama/Llama-2-7b-hf", "build/Llama-2-7b-hf-w3a16g128asym"),
                       ("llama2-7b", "build/llama2-7b-w3a16g128asym"),
                       ("build/models/tiny-llama/", "build/tiny-llama-w3a16g128asym")):
        cmd = subprocess.run(["make", "-n", "-C", str(root), "quantize", f"MODEL={model}", "REVISION=v1"],
                             capture_output=True, text=True, check=True).stdout
        assert f"--model {model} --revision v1 " in cmd and f"--output {out} " in cmd, cmd
