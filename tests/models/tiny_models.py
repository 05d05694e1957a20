"""Tiny random-weight checkpoints of each supported family, built with transformers (the reference)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

VOCAB = 997  # odd on purpose

# Small but real: 2 layers, GQA/MQA, head_dim 16 or 32, awkward intermediate sizes.
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": (
        "LlamaConfig",
        dict(
            hidden_size=64,
            intermediate_size=88,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
    ),
    "llama3": (
        "LlamaConfig",
        dict(
            # llama3 rope scaling with a small original context so every band (kept, smoothed, slowed) occurs;
            # attention/mlp bias and tied embeddings exercise the remaining Llama switches.
            hidden_size=64,
            intermediate_size=72,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=16,
            rope_theta=500000.0,
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=True,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    "mistral": (
        "MistralConfig",
        dict(
            hidden_size=128,
            intermediate_size=160,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=32,
            sliding_window=None,
        ),
    ),
    "qwen2": (
        "Qwen2Config",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=1000000.0,
        ),
    ),
    "qwen3": (
        "Qwen3Config",
        dict(
            hidden_size=64,
            intermediate_size=80,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            tie_word_embeddings=True,
        ),
    ),
}


def hf_config(family: str):  # -> transformers.PretrainedConfig
    import transformers

    class_name, overrides = FAMILIES[family]
    common = dict(
        vocab_size=VOCAB,
        num_hidden_layers=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    return getattr(transformers, class_name)(**{**common, **overrides})


def randomize_(model: torch.nn.Module, seed: int, std: float = 0.1) -> None:
    """Every parameter random (norm weights around 1, biases non-zero) so no wrong wiring can hide."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            mean = 1.0 if "norm" in name else 0.0
            param.copy_(torch.randn(param.shape, generator=gen) * std + mean)


def build_tiny_hf_model(family: str, seed: int = 0):  # -> transformers.PreTrainedModel (fp32, eval)
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family), attn_implementation="eager")
    randomize_(model, seed)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    return model.eval()


def save_tiny_checkpoint(family: str, out_dir: Path, seed: int = 0):
    """Build the family's tiny model, save it (safetensors) into out_dir and return the HF model."""
    model = build_tiny_hf_model(family, seed)
    model.save_pretrained(out_dir, safe_serialization=True)
    return model


def random_prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(VOCAB) for _ in range(length)]


@torch.inference_mode()
def hf_logits(hf_model, token_ids: list[int]) -> torch.Tensor:
    """[len(token_ids), vocab] float32 from transformers: one sequence, no cache, on the model's device."""
    device = next(hf_model.parameters()).device
    return hf_model(torch.tensor([token_ids], device=device)).logits[0].float()
