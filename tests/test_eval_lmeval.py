"""`omniquant eval`: lm-eval's Python API on an in-memory (act-quantized) model with a local JSONL task, offline.
The accuracy is checked against loglikelihoods computed here directly with torch."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("lm_eval")

DOCS = [
    {"context": "It is a truth universally", "choices": [" acknowledged", " of the", " banana"], "label": 0},
    {"context": "Mr. Darcy was", "choices": [" the and", " proud"], "label": 1},
    {"context": "She walked into the", "choices": [" room", " , ,"], "label": 0},
    {"context": "Elizabeth could not help", "choices": [" laughing", " the the the"], "label": 0},
    {"context": "My dear Mr. Bennet, said his", "choices": [" lady", " , of"], "label": 0},
    {"context": "They were married in", "choices": [" the", " Rome ."], "label": 1},
]


def _loglik(model, tok, context: str, choice: str) -> float:
    """Sum of log p(continuation tokens | context), with lm-eval's split: encode(context + choice) minus the
    encoded context prefix."""
    whole = tok(context + choice, add_special_tokens=False).input_ids
    ctx = tok(context, add_special_tokens=False).input_ids
    cont = whole[len(ctx):]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    return float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


def test_eval_cli_offline_jsonl_matches_direct_loglikelihoods(trained_llama_dir, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from omniquant.cli import main
    from omniquant.load import load_quantized

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    task = tmp_path / "toy.jsonl"
    task.write_text("\n".join(json.dumps(d) for d in DOCS) + "\n")
    rc = main(["eval", "--model", str(trained_llama_dir), "--jsonl-task", f"toy={task}", "--json", str(tmp_path / "r.json")])
    assert rc == 0
    acc = json.loads((tmp_path / "r.json").read_text())["results"]["toy"]["acc"]
    model = load_quantized(trained_llama_dir)
    tok = AutoTokenizer.from_pretrained(trained_llama_dir)
    correct = [max(range(len(d["choices"])), key=lambda i: _loglik(model, tok, d["context"], d["choices"][i])) == d["label"]
               for d in DOCS]
    assert acc == pytest.approx(sum(correct) / len(DOCS))


def test_eval_cli_bad_input(tmp_path, trained_llama_dir, capsys):
    from omniquant.cli import main

    assert main(["eval", "--model", str(trained_llama_dir)]) == 2
    assert "at least one task" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "x", "choices": ["a"], "label": 0}\n')
    assert main(["eval", "--model", str(trained_llama_dir), "--jsonl-task", f"b={bad}"]) == 2
    assert "line 1" in capsys.readouterr().err
