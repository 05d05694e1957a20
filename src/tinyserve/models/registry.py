"""Which Hugging Face `architectures` names TinyServe serves, and the class that serves each."""

from __future__ import annotations

import importlib
from collections.abc import Sequence

from torch import nn

# HF architecture name -> (module, class). One implementation covers the whole Llama family.
_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("tinyserve.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("tinyserve.models.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("tinyserve.models.llama", "LlamaForCausalLM"),
    "Qwen3ForCausalLM": ("tinyserve.models.llama", "LlamaForCausalLM"),
}


class UnsupportedArchitectureError(ValueError):
    """The checkpoint's architecture is not one TinyServe implements."""


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def resolve_architecture(architectures: Sequence[str]) -> str:
    """The first supported name in config.json's `architectures` list; an error listing the supported ones."""
    if isinstance(architectures, str):
        architectures = [architectures]
    for name in architectures:
        if name in _MODELS:
            return name
    given = ", ".join(architectures) if architectures else "none (config.json has no 'architectures')"
    raise UnsupportedArchitectureError(
        f"unsupported model architecture: {given}; supported: {', '.join(supported_architectures())}"
    )


def get_model_class(architecture: str) -> type[nn.Module]:
    """The nn.Module class implementing `architecture` (an HF name such as "Qwen3ForCausalLM")."""
    module_name, class_name = _MODELS[resolve_architecture([architecture])]
    return getattr(importlib.import_module(module_name), class_name)
