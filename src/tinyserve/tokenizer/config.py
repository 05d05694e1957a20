"""TokenizerConfig: what a model folder says about its tokenizer (tokenizer_config.json,
special_tokens_map.json, generation_config.json, chat_template.jinja), read once into one dataclass."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The named special tokens transformers passes to chat templates (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


@dataclass(frozen=True)
class TokenizerConfig:
    """Tokenizer settings of a model folder. Every field has a sensible default when a file is absent.

    special_tokens: named special tokens as strings (bos_token, eos_token, ...), only those that are set.
    add_bos_token / add_eos_token: None when the config does not say (then tokenizer.json's post-processor,
        or for sentencepiece the model's own BOS, decides).
    added_tokens: id -> (content, special) from `added_tokens_decoder`.
    chat_template: a template string, a list of {"name", "template"} dicts, or None.
    generation_eos_token_ids: `eos_token_id` of generation_config.json as a list (may be empty).
    """

    special_tokens: dict[str, str] = field(default_factory=dict)
    add_bos_token: bool | None = None
    add_eos_token: bool | None = None
    added_tokens: dict[int, tuple[str, bool]] = field(default_factory=dict)
    chat_template: str | list[dict[str, str]] | None = None
    clean_up_tokenization_spaces: bool = False
    model_max_length: int | None = None
    generation_eos_token_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_dir(cls, model_dir: Path) -> TokenizerConfig:
        config = _read_json(model_dir / "tokenizer_config.json")
        special_map = _read_json(model_dir / "special_tokens_map.json")
        special: dict[str, str] = {}
        for name in SPECIAL_TOKEN_NAMES:
            # tokenizer_config.json wins; special_tokens_map.json only fills what it leaves unset.
            value = _token_text(config.get(name)) or _token_text(special_map.get(name))
            if value is not None:
                special[name] = value
        added = {
            int(i): (str(t["content"]), bool(t.get("special", False)))
            for i, t in (config.get("added_tokens_decoder") or {}).items()
        }
        max_len = config.get("model_max_length")
        return cls(
            special_tokens=special,
            add_bos_token=_opt_bool(config.get("add_bos_token")),
            add_eos_token=_opt_bool(config.get("add_eos_token")),
            added_tokens=added,
            chat_template=_find_chat_template(model_dir, config),
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
            model_max_length=int(max_len) if isinstance(max_len, (int, float)) and max_len < 1e12 else None,
            generation_eos_token_ids=_generation_eos_ids(model_dir),
        )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    """A special token is stored as a string or as a serialised AddedToken {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _opt_bool(value: Any) -> bool | None:
    return bool(value) if value is not None else None


def _find_chat_template(model_dir: Path, config: dict[str, Any]) -> str | list[dict[str, str]] | None:
    """chat_template.jinja (newer transformers saves it there) wins over tokenizer_config.json."""
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if template is None:
        template = _read_json(model_dir / "chat_template.json").get("chat_template")
    return template if isinstance(template, (str, list)) else None


def _generation_eos_ids(model_dir: Path) -> list[int]:
    eos = _read_json(model_dir / "generation_config.json").get("eos_token_id")
    if isinstance(eos, int):
        return [eos]
    if isinstance(eos, list):
        return [int(i) for i in eos]
    return []
