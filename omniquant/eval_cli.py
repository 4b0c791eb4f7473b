"""Zero-shot evaluation with lm-eval (0.4.x Python API) on the in-memory (fake-)quantized model, fully offline.

Tasks are lm-eval task names (`piqa,arc_easy,...`, which need their datasets in the local HF cache: nothing is
downloaded, HF_DATASETS_OFFLINE/HF_HUB_OFFLINE are set to 1) and/or local multiple-choice JSONL files given as
`--jsonl-task NAME=FILE`, one JSON object per line:

    {"context": "The capital of France is", "choices": [" Paris", " Rome"], "label": 0}

scored like lm-eval's multiple_choice tasks: acc = mean(argmax_i loglik(choice_i | context) == label), acc_norm
with byte-length-normalised loglikelihoods. Perplexity (`omniquant ppl`) remains the primary metric.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from omniquant.errors import UserError
from omniquant.hub import add_model_arguments, resolve_model


def jsonl_task(name: str, path: str | Path) -> dict:
    """lm-eval task config (dict form) for a local multiple-choice JSONL file (schema in the module doc)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--jsonl-task {name}: file {path} does not exist")
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines:
        raise UserError(f"--jsonl-task {name}: {path} is empty")
    for i, ln in enumerate(lines, 1):
        try:
            doc = json.loads(ln)
        except ValueError as e:
            raise UserError(f"--jsonl-task {name}: {path} line {i} is not JSON ({e})") from e
        if not (isinstance(doc, dict) and isinstance(doc.get("context"), str) and isinstance(doc.get("choices"), list)
                and len(doc["choices"]) >= 2 and isinstance(doc.get("label"), int)
                and 0 <= doc["label"] < len(doc["choices"])):
            raise UserError(f"--jsonl-task {name}: {path} line {i} needs \"context\" (str), \"choices\" (≥2 str) "
                            "and \"label\" (index into choices)")
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path.resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "target_delimiter": "",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
    }


def evaluate_tasks(model, tokenizer, tasks: list, limit: int | None = None, batch_size: int = 1) -> dict:
    """Run lm-eval on an in-memory HF model; tasks: names and/or dict configs. Returns {task: {metric: value}}."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise UserError(f"omniquant eval needs lm-eval ({e}); install the `eval` extra: pip install 'omniquant[eval]'") from e
    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, bootstrap_iters=0, log_samples=False)
    except Exception as e:  # unknown task name, dataset not in the offline cache, ...
        raise UserError(f"lm-eval failed: {type(e).__name__}: {e}") from e
    results = {}
    for task, metrics in out["results"].items():
        results[task] = {k.split(",")[0]: v for k, v in metrics.items()
                         if isinstance(v, (int, float)) and "stderr" not in k and k != "sample_len"}
    return results


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, "HF or fake-quant checkpoint directory (act quantizers re-attached)")
    p.add_argument("--tasks", default="", help="comma-separated lm-eval task names (datasets must be cached locally)")
    p.add_argument("--jsonl-task", action="append", default=[], metavar="NAME=FILE",
                   help="a local multiple-choice JSONL task (repeatable); see `omniquant.eval_cli` for the schema")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N documents of each task")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--json", default=None, help="write the results here as JSON")


def run(args: argparse.Namespace) -> int:
    tasks: list = [t for t in args.tasks.split(",") if t.strip()]
    for spec in args.jsonl_task:
        name, sep, file = spec.partition("=")
        if not sep or not name or not file:
            raise UserError(f"--jsonl-task expects NAME=FILE, got {spec!r}")
        tasks.append(jsonl_task(name, file))
    if not tasks:
        raise UserError("give at least one task: --tasks piqa,arc_easy and/or --jsonl-task NAME=FILE")
    model_dir = resolve_model(args.model, args.revision)
    from transformers import AutoTokenizer

    from omniquant.load import load_quantized

    t0 = time.time()
    model = load_quantized(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    results = evaluate_tasks(model, tokenizer, tasks, args.limit, args.batch_size)
    for task, metrics in results.items():
        print(task + "  " + "  ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": str(model_dir), "results": results,
                                               "seconds": round(time.time() - t0, 2)}, indent=2))
    return 0
