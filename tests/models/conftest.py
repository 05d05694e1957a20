"""Fixtures of the model tests: one tiny transformers checkpoint per family, built once per module."""

from __future__ import annotations

import pytest

from .tiny_models import FAMILIES, save_tiny_checkpoint


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(family name, transformers model in float32, checkpoint folder)."""
    path = tmp_path_factory.mktemp(request.param)
    hf_model = save_tiny_checkpoint(request.param, path, seed=sorted(FAMILIES).index(request.param))
    return request.param, hf_model, path
