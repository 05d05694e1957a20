"""SamplingParams: how one request is sampled and when it stops (vLLM-compatible names and defaults).

Validated in `__post_init__`: every bad field raises a `ValueError` that names the field, the bad value
and the allowed range, so the server can hand the message straight back as a 400.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# Temperatures below this are treated as greedy (argmax), as vLLM does.
GREEDY_TEMPERATURE_EPS = 1e-5
# Seeds are wrapped to 64 bits (the sampling noise key, tinyserve.ops.sample_from_logits); the range is
# the one vLLM (and torch.manual_seed) accepts.
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1


def _bad(name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"{name} must be {allowed}, got {value!r}")


def _check_int(
    name: str, value: Any, lo: int | None = None, hi: int | None = None, allowed: str = ""
) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool)
    if ok and lo is not None and value < lo:
        ok = False
    if ok and hi is not None and value > hi:
        ok = False
    if not ok:
        raise _bad(name, value, allowed)


def _check_float(name: str, value: Any, ok_range: Any, allowed: str) -> None:
    """`ok_range(x) -> bool` decides the range; ints are accepted as floats, bools and NaN never."""
    is_num = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_num or math.isnan(value) or not ok_range(float(value)):
        raise _bad(name, value, allowed)


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise _bad(name, value, "a bool (true or false)")


@dataclass
class SamplingParams:
    """Per-request sampling and stopping settings.

    Fields (vLLM semantics):
        n: number of output sequences for the prompt (>= 1).
        temperature: 0 (or below 1e-5) means greedy; otherwise logits are divided by it.
        top_p: nucleus sampling, keep the smallest set of tokens whose probability sums to >= top_p; 1 = off.
        top_k: keep the k most likely tokens; -1 or 0 = off (0 is stored as -1).
        min_p: drop tokens whose probability is below min_p * (the top token's probability); 0 = off.
        presence_penalty: subtracted once from the logit of every token already generated.
        frequency_penalty: subtracted from a token's logit once per time it was generated.
        repetition_penalty: tokens seen in the prompt or output get logit/rp if positive, logit*rp if not.
        seed: a request with a seed gets the same samples whatever batch it runs in: sample i of n
            draws its noise from key seed + i (mod 2**64) and its position, tokens generated so far.
        stop: strings that end generation (detected across token boundaries; cut from the output);
            stored as a list after validation.
        stop_token_ids: token ids that end generation (the token is kept in `token_ids`); stored as a
            list after validation.
        ignore_eos: keep generating after EOS.
        max_tokens: most tokens to generate; None = up to the model's context length.
        min_tokens: EOS and stop_token_ids are masked out until this many tokens were generated.
        logprobs: number of top logprobs to return for each generated token (0 = only the sampled token).
        prompt_logprobs: number of top logprobs to return for each prompt token.
        skip_special_tokens: leave special tokens out of the output text.
        include_stop_str_in_output: keep the matched stop string at the end of the output text.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        _check_int("n", self.n, lo=1, allowed="an integer >= 1")
        _check_float(
            "temperature",
            self.temperature,
            lambda x: 0.0 <= x < math.inf,
            "a finite number >= 0 (0 = greedy)",
        )
        _check_float("top_p", self.top_p, lambda x: 0.0 < x <= 1.0, "in (0, 1] (1 = off)")
        _check_int("top_k", self.top_k, lo=-1, allowed="-1 or 0 (off) or an integer >= 1")
        if self.top_k == 0:
            self.top_k = -1
        _check_float("min_p", self.min_p, lambda x: 0.0 <= x <= 1.0, "in [0, 1] (0 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            _check_float(name, getattr(self, name), lambda x: -2.0 <= x <= 2.0, "in [-2, 2]")
        _check_float(
            "repetition_penalty",
            self.repetition_penalty,
            lambda x: 0.0 < x < math.inf,
            "a finite number > 0 (1 = off)",
        )
        if self.seed is not None:
            _check_int(
                "seed", self.seed, _SEED_MIN, _SEED_MAX, f"None or an integer in [{_SEED_MIN}, {_SEED_MAX}]"
            )
        self.stop = self._validate_stop(self.stop)
        self.stop_token_ids = self._validate_stop_token_ids(self.stop_token_ids)
        _check_bool("ignore_eos", self.ignore_eos)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, lo=1, allowed="None or an integer >= 1")
        _check_int("min_tokens", self.min_tokens, lo=0, allowed="an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise _bad("min_tokens", self.min_tokens, f"<= max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, lo=0, allowed="None or an integer >= 0")
        _check_bool("skip_special_tokens", self.skip_special_tokens)
        _check_bool("include_stop_str_in_output", self.include_stop_str_in_output)

    @staticmethod
    def _validate_stop(stop: Any) -> list[str]:
        allowed = "None, a non-empty string or a list of non-empty strings"
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise _bad("stop", stop, allowed)
        return list(stop)

    @staticmethod
    def _validate_stop_token_ids(ids: Any) -> list[int]:
        if ids is None:
            return []
        ok = isinstance(ids, (list, tuple)) and all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids
        )
        if not ok:
            raise _bad("stop_token_ids", ids, "None or a list of integers >= 0")
        return list(ids)

    @property
    def is_greedy(self) -> bool:
        """True when the request takes the argmax (temperature 0 or below 1e-5)."""
        return self.temperature < GREEDY_TEMPERATURE_EPS

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def max_stop_str_len(self) -> int:
        return max((len(s) for s in self.stop_list), default=0)

    @property
    def stop_list(self) -> list[str]:
        """`stop` as a list (__post_init__ already stores it as one; this keeps type checkers happy)."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
