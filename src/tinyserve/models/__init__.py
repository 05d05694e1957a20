"""Model code: Hugging Face config parsing, the architecture registry, the Llama-family implementation
and weight loading. `load_model(path, device, dtype, load_format)` is the entry point.

Light to import: the torch-heavy parts load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "load_model": "tinyserve.models.loader",
    "ModelArchConfig": "tinyserve.models.config",
    "load_arch_config": "tinyserve.models.config",
    "supported_architectures": "tinyserve.models.registry",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tinyserve.models' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = sorted(_LAZY)
