"""TinyServe: a small, fast LLM serving engine.

Importing the package is cheap: heavy modules (torch, the model code, the server) load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public names and the module each one lives in; resolved lazily by __getattr__.
_LAZY = {
    "_C": "tinyserve._C",
    "LLM": "tinyserve.engine.llm",
    "SamplingParams": "tinyserve.sampling_params",
    "RequestOutput": "tinyserve.engine.outputs",
    "CompletionOutput": "tinyserve.engine.outputs",
    "EngineConfig": "tinyserve.config",
}

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "EngineConfig"]


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'tinyserve' has no attribute {name!r}")
    if name == "_C":
        return importlib.import_module(target)
    return getattr(importlib.import_module(target), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
