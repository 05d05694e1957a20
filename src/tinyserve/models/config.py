"""The architecture of a checkpoint: Hugging Face `config.json` + `generation_config.json` parsed into one
frozen, validated `ModelArchConfig`.

Both config dialects are read: transformers 4.x (`rope_theta`, `rope_scaling`, `torch_dtype`) and 5.x
(`rope_parameters`, `dtype`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .registry import resolve_architecture

# Families implemented by models/llama.py, keyed by `model_type`; used for per-family defaults.
_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# RoPE variants whose frequencies do not depend on the running sequence length, so a cos/sin cache
# built once at load time is exact.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}
# generation_config.json keys that become sampling defaults (as vLLM's `generation_config="auto"`).
_GENERATION_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


class ModelConfigError(ValueError):
    """A config.json that TinyServe cannot serve (missing key, bad value, unsupported feature)."""


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling from `rope_scaling` / `rope_parameters`.

    rope_type "linear": every inverse frequency divided by `factor` (position interpolation).
    rope_type "llama3": Llama 3.1 banded scaling with `low_freq_factor`, `high_freq_factor` and
    `original_max_position_embeddings`.
    """

    rope_type: str
    factor: float
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None

    def __post_init__(self) -> None:
        if self.rope_type not in ("linear", "llama3"):
            raise ModelConfigError(
                f"rope scaling type {self.rope_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if not self.factor > 0:
            raise ModelConfigError(f"rope scaling factor must be > 0, got {self.factor}")
        if self.rope_type == "llama3":
            lo, hi, orig = self.low_freq_factor, self.high_freq_factor, self.original_max_position_embeddings
            if lo is None or hi is None or orig is None:
                raise ModelConfigError(
                    "llama3 rope scaling needs low_freq_factor, high_freq_factor and "
                    f"original_max_position_embeddings; got {self}"
                )
            if not 0 < lo < hi or orig <= 0:
                raise ModelConfigError(
                    "llama3 rope scaling needs 0 < low_freq_factor < high_freq_factor and "
                    f"original_max_position_embeddings > 0; got {self}"
                )


@dataclass(frozen=True)
class ModelArchConfig:
    """Everything the model code needs to know about a checkpoint's architecture.

    NOTE: `qkv_bias` and `o_bias` are separate because Qwen2 has a bias on q/k/v but not on o_proj,
    while Llama's `attention_bias` puts one on all four projections.
    """

    architecture: str  # HF class name, e.g. "LlamaForCausalLM"
    model_type: str  # "llama" | "mistral" | "qwen2" | "qwen3"
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    rope_scaling: RopeScaling | None = None
    partial_rotary_factor: float = 1.0
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    torch_dtype: torch.dtype | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    hidden_act: str = "silu"
    # Sampling defaults from generation_config.json (temperature, top_p, ...); informational.
    generation_defaults: dict[str, float | int] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        for name in (
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_size",
            "vocab_size",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ModelConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads != 0:
            raise ModelConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if not (self.rms_norm_eps > 0 and math.isfinite(self.rms_norm_eps)):
            raise ModelConfigError(f"rms_norm_eps must be a positive number, got {self.rms_norm_eps}")
        if not self.rope_theta > 0:
            raise ModelConfigError(f"rope_theta must be > 0, got {self.rope_theta}")
        if not 0 < self.partial_rotary_factor <= 1:
            raise ModelConfigError(
                f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}"
            )
        if self.rotary_dim % 2 != 0 or self.rotary_dim == 0:
            raise ModelConfigError(
                f"rotary dimension head_dim * partial_rotary_factor = {self.rotary_dim} must be even and > 0"
            )
        if self.hidden_act != "silu":
            raise ModelConfigError(f"hidden_act {self.hidden_act!r} is not supported; supported: silu")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ModelConfigError(
                f"sliding_window must be a positive integer or null, got {self.sliding_window}"
            )
        for tok in (self.bos_token_id, *self.eos_token_ids):
            if tok is not None and not 0 <= tok < self.vocab_size:
                raise ModelConfigError(
                    f"special token id {tok} is outside the vocabulary [0, {self.vocab_size})"
                )

    @property
    def rotary_dim(self) -> int:
        """How many leading dims of each head RoPE rotates (head_dim unless partial rotary)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def max_model_len(self) -> int:
        """Longest sequence this implementation serves exactly.

        NOTE: the paged kernels attend to the whole context, so a model with a sliding window (Mistral
        v0.1) is exact only up to the window; beyond it the model would see more than it was trained to.
        """
        if self.sliding_window is not None:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    @classmethod
    def from_dicts(
        cls, config: dict[str, Any], generation_config: dict[str, Any] | None = None
    ) -> ModelArchConfig:
        """Build from the parsed JSON of config.json and (optionally) generation_config.json."""
        return _parse(config, generation_config or {})


def load_arch_config(model_dir: str | Path) -> ModelArchConfig:
    """Read `config.json` (required) and `generation_config.json` (optional) from a model folder."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in {model_dir}")
    config = _read_json(config_path)
    gen_path = model_dir / "generation_config.json"
    generation_config = _read_json(gen_path) if gen_path.is_file() else {}
    return ModelArchConfig.from_dicts(config, generation_config)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelConfigError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ModelConfigError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _require(config: dict[str, Any], key: str) -> Any:
    if config.get(key) is None:
        raise ModelConfigError(f"config.json has no {key!r}")
    return config[key]


def _parse(config: dict[str, Any], gen: dict[str, Any]) -> ModelArchConfig:
    architecture = resolve_architecture(config.get("architectures") or [])
    model_type = str(config.get("model_type") or _default_model_type(architecture))
    if model_type not in _MODEL_TYPES:
        raise ModelConfigError(
            f"model_type {model_type!r} is not supported with {architecture}; "
            f"supported: {', '.join(_MODEL_TYPES)}"
        )
    hidden_size = _require(config, "hidden_size")
    num_heads = _require(config, "num_attention_heads")
    head_dim = config.get("head_dim")
    if head_dim is None:
        if hidden_size % num_heads != 0:
            raise ModelConfigError(
                f"hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads} "
                "and config.json gives no head_dim"
            )
        head_dim = hidden_size // num_heads
    rope_theta, rope_scaling, partial = _parse_rope(config)
    attention_bias = bool(config.get("attention_bias", False))
    return ModelArchConfig(
        architecture=architecture,
        model_type=model_type,
        hidden_size=hidden_size,
        num_layers=_require(config, "num_hidden_layers"),
        num_heads=num_heads,
        num_kv_heads=config.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        intermediate_size=_require(config, "intermediate_size"),
        vocab_size=_require(config, "vocab_size"),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        max_position_embeddings=_require(config, "max_position_embeddings"),
        rope_scaling=rope_scaling,
        partial_rotary_factor=partial,
        # Qwen2 always has q/k/v bias and no o_proj bias; Llama/Mistral/Qwen3 follow `attention_bias`.
        qkv_bias=True if model_type == "qwen2" else attention_bias,
        o_bias=False if model_type == "qwen2" else attention_bias,
        mlp_bias=bool(config.get("mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        # All four families default to untied embeddings in transformers when the key is absent.
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        sliding_window=_parse_sliding_window(config, model_type),
        torch_dtype=_parse_dtype(config.get("torch_dtype") or config.get("dtype")),
        bos_token_id=gen.get("bos_token_id", config.get("bos_token_id")),
        eos_token_ids=_merge_eos(gen.get("eos_token_id"), config.get("eos_token_id")),
        hidden_act=str(config.get("hidden_act", "silu")),
        generation_defaults={k: gen[k] for k in _GENERATION_DEFAULT_KEYS if gen.get(k) is not None},
    )


def _default_model_type(architecture: str) -> str:
    return {
        "LlamaForCausalLM": "llama",
        "MistralForCausalLM": "mistral",
        "Qwen2ForCausalLM": "qwen2",
        "Qwen3ForCausalLM": "qwen3",
    }.get(architecture, "llama")


def _parse_rope(config: dict[str, Any]) -> tuple[float, RopeScaling | None, float]:
    """(rope_theta, scaling or None, partial_rotary_factor) from either config dialect."""
    # transformers 5 writes `rope_parameters` (theta and type inside); 4.x writes `rope_theta` and
    # `rope_scaling` (type under "rope_type" or the older "type").
    params: dict[str, Any] = dict(config.get("rope_scaling") or {})
    params.update(config.get("rope_parameters") or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise ModelConfigError("per-layer-type rope parameters are not supported")
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        why = ""
        if rope_type == "dynamic":
            why = " (its frequencies follow the running sequence length; a static cos/sin cache cannot)"
        raise ModelConfigError(
            f"rope scaling type {rope_type!r} is not supported{why}; "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    scaling = None
    if rope_type != "default":
        scaling = RopeScaling(
            rope_type=rope_type,
            factor=float(params.get("factor", 0.0)),
            low_freq_factor=params.get("low_freq_factor"),
            high_freq_factor=params.get("high_freq_factor"),
            original_max_position_embeddings=params.get(
                "original_max_position_embeddings",
                config.get("original_max_position_embeddings", config.get("max_position_embeddings")),
            ),
        )
    return float(theta), scaling, float(partial)


def _parse_sliding_window(config: dict[str, Any], model_type: str) -> int | None:
    window = config.get("sliding_window")
    if model_type in ("qwen2", "qwen3") and not config.get("use_sliding_window", False):
        return None  # Qwen configs carry a window that is off unless use_sliding_window is set
    if window is None:
        return None
    if not isinstance(window, int) or isinstance(window, bool):
        raise ModelConfigError(f"sliding_window must be an integer or null, got {window!r}")
    return window


def _parse_dtype(value: Any) -> torch.dtype | None:
    if value is None:
        return None
    name = str(value).removeprefix("torch.")
    if name not in _DTYPES:
        raise ModelConfigError(
            f"torch_dtype {value!r} is not supported; supported: float32, float16, bfloat16"
        )
    return _DTYPES[name]


def _as_id_list(value: Any, key: str) -> list[int]:
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    for item in items:
        if not isinstance(item, int) or isinstance(item, bool):
            raise ModelConfigError(f"{key} must be an integer or a list of integers, got {value!r}")
    return items


def _merge_eos(from_generation: Any, from_config: Any) -> tuple[int, ...]:
    """generation_config's eos ids first (they are what transformers and vLLM stop on), then config's."""
    merged: list[int] = []
    for tok in _as_id_list(from_generation, "eos_token_id") + _as_id_list(from_config, "eos_token_id"):
        if tok not in merged:
            merged.append(tok)
    return tuple(merged)
