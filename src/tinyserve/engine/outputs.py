"""What the engine returns for a request: RequestOutput with one CompletionOutput per sample (n)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """A token's log-probability under the model, its rank (1 = most likely) and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One generated position: token id -> Logprob (the sampled token and the top-N alternatives).
SampleLogprobs = list[dict[int, Logprob]]


@dataclass
class CompletionOutput:
    """One sample of a request.

    index: which of the request's n samples. text / token_ids: the generated part only; while a
        streamed request runs, token_ids is the engine's live list (it only grows).
    finish_reason: None while running, then "stop" (EOS, stop token or stop string), "length"
        (max_tokens or max_model_len) or "abort". stop_reason: the stop string or token id, if any.
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: SampleLogprobs | None = None
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Seconds on time.monotonic(): arrival, first scheduled, first token, last token, finish."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0


@dataclass
class RequestOutput:
    """The state of a request after a step (cumulative: text and token_ids so far).

    prompt_logprobs: with SamplingParams.prompt_logprobs, one entry per prompt token (None for the
    first, which nothing scores): the token's logprob and rank plus the top-N alternatives.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0
    prompt_logprobs: list[dict[int, Logprob] | None] | None = field(default=None)
