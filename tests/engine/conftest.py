"""Engine fixtures: one stories260K LLM (float32, CPU) shared by a module."""

from __future__ import annotations

import json

import pytest

from tests.conftest import STORIES260K


@pytest.fixture(scope="module")
def stories_llm(stories260k_path):
    from tinyserve import LLM

    return LLM(str(stories260k_path), device="cpu", dtype="float32", max_num_seqs=32, seed=0)


@pytest.fixture(scope="session")
def stories_reference():
    return json.loads((STORIES260K / "reference.json").read_text())
