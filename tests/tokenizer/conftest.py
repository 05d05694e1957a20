"""Tokenizers of ../shared/models, loaded once per test session."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MODELS_DIR, STORIES260K
from tinyserve.tokenizer import Tokenizer

TOKENIZER_DIRS = ["gpt2-tokenizer", "llama2-tokenizer", "qwen2-tokenizer"]


def model_dir(name: str) -> Path:
    path = STORIES260K if name == "stories260K" else MODELS_DIR / name
    if not path.is_dir():
        pytest.skip(f"{path} not found (set TINYSERVE_SHARED_DIR)")
    return path


def tokenizer_cases(name: str) -> list[dict[str, Any]]:
    """The 46 llama.cpp cases (ids without special tokens); for stories260K its REFERENCE cases (with BOS)."""
    if name == "stories260K":
        path = STORIES260K / "reference.json"
        return json.loads(path.read_text())["tokenizer_cases"] if path.is_file() else []
    path = MODELS_DIR / name / "tokenizer_tests.json"
    return json.loads(path.read_text()) if path.is_file() else []


def stories_reference() -> dict[str, Any]:
    path = model_dir("stories260K") / "reference.json"
    return json.loads(path.read_text())


_CACHE: dict[str, Tokenizer] = {}


def load(name: str) -> Tokenizer:
    if name not in _CACHE:
        _CACHE[name] = Tokenizer.from_pretrained(model_dir(name))
    return _CACHE[name]


@pytest.fixture(params=TOKENIZER_DIRS + ["stories260K"])
def any_tokenizer(request: pytest.FixtureRequest) -> tuple[str, Tokenizer]:
    return request.param, load(request.param)
