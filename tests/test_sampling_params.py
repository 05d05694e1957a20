"""SamplingParams: defaults as vLLM, normalisation, and a clear ValueError for every bad field."""

from __future__ import annotations

import math
from typing import Any

import pytest

from tinyserve.sampling_params import SamplingParams


def test_defaults_match_vllm() -> None:
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, -1, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.seed, p.stop, p.stop_token_ids, p.ignore_eos) == (None, [], [], False)
    assert (p.max_tokens, p.min_tokens, p.logprobs, p.prompt_logprobs) == (16, 0, None, None)
    assert p.skip_special_tokens and not p.include_stop_str_in_output
    assert not p.is_greedy and not p.has_penalties


def test_normalisation() -> None:
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "bc")).stop == ["a", "bc"]
    assert SamplingParams(stop=["a", "bcd"]).max_stop_str_len == 3
    assert SamplingParams(top_k=0).top_k == -1
    assert SamplingParams(stop_token_ids=(5, 7)).stop_token_ids == [5, 7]
    assert SamplingParams(temperature=0).is_greedy
    assert SamplingParams(temperature=1e-6).is_greedy
    assert not SamplingParams(temperature=0.01).is_greedy
    assert SamplingParams(repetition_penalty=1.1).has_penalties


@pytest.mark.parametrize(
    "fields",
    [
        dict(n=1, temperature=0.0, top_p=1.0, top_k=1, min_p=1.0),
        dict(presence_penalty=-2, frequency_penalty=2, repetition_penalty=1e-3),
        dict(seed=-(2**63)),
        dict(seed=2**64 - 1),
        dict(max_tokens=None, min_tokens=1000),
        dict(max_tokens=1, min_tokens=1, logprobs=0, prompt_logprobs=20),
        dict(stop_token_ids=[0], ignore_eos=True, skip_special_tokens=False, include_stop_str_in_output=True),
    ],
)
def test_valid_edges(fields: dict[str, Any]) -> None:
    SamplingParams(**fields)


BAD_VALUES: list[tuple[str, Any, str]] = [
    ("n", 0, ">= 1"),
    ("n", 1.0, ">= 1"),
    ("n", True, ">= 1"),
    ("temperature", -0.1, ">= 0"),
    ("temperature", math.inf, ">= 0"),
    ("temperature", math.nan, ">= 0"),
    ("temperature", "1", ">= 0"),
    ("top_p", 0.0, "(0, 1]"),
    ("top_p", 1.01, "(0, 1]"),
    ("top_k", -2, "-1 or 0"),
    ("top_k", 2.5, "-1 or 0"),
    ("min_p", -0.01, "[0, 1]"),
    ("min_p", 1.5, "[0, 1]"),
    ("presence_penalty", 2.5, "[-2, 2]"),
    ("presence_penalty", -2.01, "[-2, 2]"),
    ("frequency_penalty", -3, "[-2, 2]"),
    ("frequency_penalty", math.nan, "[-2, 2]"),
    ("repetition_penalty", 0.0, "> 0"),
    ("repetition_penalty", -1.0, "> 0"),
    ("repetition_penalty", math.inf, "> 0"),
    ("seed", 1.5, "integer in"),
    ("seed", 2**64, "integer in"),
    ("seed", "7", "integer in"),
    ("stop", "", "non-empty"),
    ("stop", ["ok", ""], "non-empty"),
    ("stop", [1], "non-empty"),
    ("stop", 5, "non-empty"),
    ("stop_token_ids", [-1], "integers >= 0"),
    ("stop_token_ids", 3, "integers >= 0"),
    ("stop_token_ids", ["3"], "integers >= 0"),
    ("ignore_eos", 1, "bool"),
    ("max_tokens", 0, ">= 1"),
    ("max_tokens", -5, ">= 1"),
    ("max_tokens", 2.0, ">= 1"),
    ("min_tokens", -1, ">= 0"),
    ("logprobs", -1, ">= 0"),
    ("logprobs", 1.5, ">= 0"),
    ("prompt_logprobs", -1, ">= 0"),
    ("skip_special_tokens", "yes", "bool"),
    ("include_stop_str_in_output", None, "bool"),
]


@pytest.mark.parametrize(("field", "value", "allowed"), BAD_VALUES)
def test_bad_value_names_field_value_and_range(field: str, value: Any, allowed: str) -> None:
    with pytest.raises(ValueError) as info:
        SamplingParams(**{field: value})
    message = str(info.value)
    assert message.startswith(f"{field} must be"), message
    assert allowed in message, message
    assert repr(value) in message, message


def test_every_field_has_a_bad_value_case() -> None:
    covered = {name for name, _, _ in BAD_VALUES}
    fields = set(SamplingParams.__dataclass_fields__)
    assert fields <= covered, f"no bad-value test for {sorted(fields - covered)}"


def test_min_tokens_above_max_tokens() -> None:
    with pytest.raises(ValueError, match=r"min_tokens must be <= max_tokens \(4\), got 5"):
        SamplingParams(max_tokens=4, min_tokens=5)
