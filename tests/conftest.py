"""Shared fixtures: tiny models built on the fly (session-scoped, built once per test run) and the Austen text."""

from __future__ import annotations

import pytest

from omniquant.paths import CALIB_BOOKS, EVAL_BOOKS, austen_dir


@pytest.fixture(scope="session")
def calib_text() -> str:
    return ",".join(str(austen_dir() / b) for b in CALIB_BOOKS)


@pytest.fixture(scope="session")
def eval_text() -> str:
    return ",".join(str(austen_dir() / b) for b in EVAL_BOOKS)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    from omniquant.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama", seed=0)


@pytest.fixture(scope="session")
def tiny_opt_dir(tmp_path_factory):
    from omniquant.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "opt", "opt", seed=0)


@pytest.fixture(scope="session")
def trained_llama_dir(tmp_path_factory):
    """A weak but real language model (80 AdamW steps on the calibration books): perplexity comparisons need one."""
    from omniquant.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "llama_trained", "llama", seed=0, train_steps=80)
