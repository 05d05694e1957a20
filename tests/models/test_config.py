"""config.json / generation_config.json -> ModelArchConfig: both transformers dialects, defaults, errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tinyserve.models.config import ModelArchConfig, ModelConfigError, RopeScaling, load_arch_config
from tinyserve.models.registry import UnsupportedArchitectureError, get_model_class, supported_architectures

BASE: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 88,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 997,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
}


def parse(gen: dict[str, Any] | None = None, **overrides: Any) -> ModelArchConfig:
    return ModelArchConfig.from_dicts({**BASE, **overrides}, gen)


def test_llama_defaults() -> None:
    cfg = parse()
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (64, 2, 4, 2)
    assert cfg.head_dim == 16 and cfg.rotary_dim == 16 and cfg.q_size == 64 and cfg.kv_size == 32
    assert cfg.rope_theta == 10000.0 and cfg.rope_scaling is None
    assert not (cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias or cfg.qk_norm or cfg.tie_word_embeddings)
    assert cfg.eos_token_ids == () and cfg.bos_token_id is None and cfg.torch_dtype is None


def test_explicit_head_dim_and_missing_kv_heads() -> None:
    cfg = parse(head_dim=32, num_key_value_heads=None)
    assert cfg.head_dim == 32 and cfg.num_kv_heads == 4 and cfg.q_size == 128


def test_llama3_rope_scaling_v4_dialect() -> None:
    cfg = parse(
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)


def test_rope_parameters_v5_dialect_and_old_type_key() -> None:
    cfg = parse(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6})
    assert cfg.rope_theta == 1e6 and cfg.rope_scaling == RopeScaling("linear", 2.0, None, None, 256)
    assert parse(rope_scaling={"type": "linear", "factor": 4.0}).rope_scaling.factor == 4.0  # type: ignore[union-attr]
    assert parse(rope_parameters={"rope_type": "default", "rope_theta": 5.0}).rope_scaling is None


@pytest.mark.parametrize("rope_type", ["dynamic", "yarn", "longrope", "made-up"])
def test_unknown_rope_types_are_rejected(rope_type: str) -> None:
    with pytest.raises(ModelConfigError, match=f"{rope_type!r} is not supported.*default, linear, llama3"):
        parse(rope_scaling={"rope_type": rope_type, "factor": 2.0})


def test_llama3_scaling_needs_its_parameters() -> None:
    with pytest.raises(ModelConfigError, match="low_freq_factor"):
        parse(rope_scaling={"rope_type": "llama3", "factor": 8.0})


def test_partial_rotary_factor() -> None:
    cfg = parse(partial_rotary_factor=0.5)
    assert cfg.rotary_dim == 8
    with pytest.raises(ModelConfigError, match="partial_rotary_factor"):
        parse(partial_rotary_factor=1.5)


def test_family_switches() -> None:
    qwen2 = parse(architectures=["Qwen2ForCausalLM"], model_type="qwen2", sliding_window=4096)
    assert qwen2.qkv_bias and not qwen2.o_bias and not qwen2.qk_norm
    assert qwen2.sliding_window is None  # use_sliding_window is off
    qwen3 = parse(architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=32, attention_bias=False)
    assert qwen3.qk_norm and not qwen3.qkv_bias and qwen3.head_dim == 32
    llama_bias = parse(attention_bias=True, mlp_bias=True)
    assert llama_bias.qkv_bias and llama_bias.o_bias and llama_bias.mlp_bias
    mistral = parse(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=128)
    assert mistral.sliding_window == 128 and mistral.max_model_len == 128


def test_eos_ids_merge_generation_config_first() -> None:
    cfg = parse(
        {"eos_token_id": [2, 1], "bos_token_id": 1, "temperature": 0.6}, eos_token_id=2, bos_token_id=1
    )
    assert cfg.eos_token_ids == (2, 1) and cfg.bos_token_id == 1
    assert cfg.generation_defaults == {"temperature": 0.6}
    assert parse({"eos_token_id": 7}, eos_token_id=[3, 7]).eos_token_ids == (7, 3)


@pytest.mark.parametrize(
    "key,value", [("torch_dtype", "bfloat16"), ("dtype", "float16"), ("torch_dtype", "float32")]
)
def test_dtype_keys(key: str, value: str) -> None:
    assert parse(**{key: value}).torch_dtype == getattr(torch, value)


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
        ({"hidden_size": 0}, "hidden_size must be a positive integer"),
        ({"vocab_size": None}, "no 'vocab_size'"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"hidden_size": 66}, "not divisible"),
        ({"eos_token_id": 5000}, "outside the vocabulary"),
        ({"torch_dtype": "int8"}, "torch_dtype 'int8'"),
    ],
)
def test_invalid_configs(overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(ModelConfigError, match=match):
        parse(**overrides)


def test_unsupported_architecture_lists_supported_ones() -> None:
    with pytest.raises(
        UnsupportedArchitectureError,
        match="GPT2LMHeadModel.*supported: LlamaForCausalLM, "
        "MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM",
    ):
        parse(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(UnsupportedArchitectureError, match="none"):
        parse(architectures=[])


def test_registry() -> None:
    assert supported_architectures() == [
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
    ]
    assert get_model_class("Qwen3ForCausalLM").__name__ == "LlamaForCausalLM"
    with pytest.raises(UnsupportedArchitectureError):
        get_model_class("FalconForCausalLM")


def test_frozen_and_load_from_folder(tmp_path: Path, stories260k_path: Path) -> None:
    cfg = load_arch_config(stories260k_path)
    assert cfg.head_dim == 8 and cfg.tie_word_embeddings and cfg.eos_token_ids == (2, 1)
    assert cfg.torch_dtype == torch.float32 and cfg.max_model_len == 512
    with pytest.raises(AttributeError):
        cfg.hidden_size = 1  # type: ignore[misc]
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_arch_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelConfigError, match="not valid JSON"):
        load_arch_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(BASE))
    assert load_arch_config(tmp_path).vocab_size == 997
