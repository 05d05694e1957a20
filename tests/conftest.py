"""Shared pytest setup: the `cuda` marker skips tests when no CUDA GPU (or no CUDA build) is present,
and paths to the shared offline test models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# ../shared beside the checkout (developer machines, CI); TINYSERVE_SHARED_DIR overrides it.
SHARED_DIR = Path(os.environ.get("TINYSERVE_SHARED_DIR", REPO_ROOT.parent / "shared"))
MODELS_DIR = SHARED_DIR / "models"
STORIES260K = MODELS_DIR / "stories260K"


def cuda_available() -> bool:
    if not torch.cuda.is_available():
        return False
    from tinyserve import ops

    return ops.cuda_kernels_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and a CUDA build of tinyserve._C")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def stories260k_path() -> Path:
    if not (STORIES260K / "config.json").exists():
        pytest.skip(f"stories260K not found at {STORIES260K} (set TINYSERVE_SHARED_DIR)")
    return STORIES260K
