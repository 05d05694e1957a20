"""SamplingMetadata: the per-row sampling parameters of one step, packed once into device tensors.

Built on the host from each row's `SamplingParams` and `RequestSamplingState`. Every decision that
depends on values (is any row greedy? does any row use top-k?) is made here, in Python, so the sampler
never has to ask the device and never syncs.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import torch

from tinyserve.sampling_params import SamplingParams


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A torch.Generator on `device` seeded with `seed`; keep one per seeded request for its lifetime."""
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(seed)
    return generator


@dataclass
class RequestSamplingState:
    """What the sampler needs to know about one row's request besides its SamplingParams.

    prompt_token_ids: the prompt (used only by the repetition penalty).
    output_token_ids: the tokens generated so far; their count is the step index (min_tokens) and their
        counts feed the presence/frequency penalties.
    generator: the request's own generator when it has a seed (see `make_generator`); it advances one
        draw per step, so its samples do not depend on the other rows of the batch.
    """

    prompt_token_ids: Sequence[int] = ()
    output_token_ids: Sequence[int] = ()
    generator: torch.Generator | None = None


@dataclass
class SeededRows:
    """The random rows that have their own generator. rows: [num_seeded] int64 on the logits' device;
    generators: one per row, in the same order."""

    rows: torch.Tensor
    generators: list[torch.Generator]


@dataclass
class SamplingMetadata:
    """Per-row sampling parameters of one step. Tensors live on the logits' device.

    A tensor is None when no row needs that stage, and the sampler skips it. Shapes use num_seqs rows.
    """

    num_seqs: int
    vocab_size: int
    all_greedy: bool
    all_random: bool
    temperature: torch.Tensor | None  # [num_seqs] float32; greedy rows hold 1.0. None when all greedy
    is_greedy: torch.Tensor | None  # [num_seqs] bool. None when all rows are greedy or all random
    top_k: torch.Tensor | None  # [num_seqs] int64 in [1, vocab_size]; vocab_size = off. None if unused
    max_top_k: int  # the largest top_k below vocab_size (0 when no row uses top-k)
    top_p: torch.Tensor | None  # [num_seqs] float32; 1.0 = off. None if unused
    min_p: torch.Tensor | None  # [num_seqs] float32; 0.0 = off. None if unused
    presence_penalty: torch.Tensor | None  # [num_seqs] float32. None (with the two below) if no penalties
    frequency_penalty: torch.Tensor | None  # [num_seqs] float32
    repetition_penalty: torch.Tensor | None  # [num_seqs] float32
    output_rows: torch.Tensor | None  # [num_output_tokens] int64: the row of each generated token
    output_ids: torch.Tensor | None  # [num_output_tokens] int64: the generated tokens, all rows flat
    prompt_rows: torch.Tensor | None  # [num_prompt_tokens] int64 (only when a row has repetition_penalty)
    prompt_ids: torch.Tensor | None  # [num_prompt_tokens] int64
    min_tokens_rows: torch.Tensor | None  # [num_masked] int64: (row, token) pairs masked for min_tokens
    min_tokens_ids: torch.Tensor | None  # [num_masked] int64
    seeded: SeededRows | None = None  # random rows with their own generator; None if there are none
    max_num_logprobs: int | None = None  # largest `logprobs` asked for; None = no row wants logprobs

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty is not None

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        states: Sequence[RequestSamplingState],
        *,
        vocab_size: int,
        device: torch.device | str,
        eos_token_ids: Sequence[int] = (),
    ) -> SamplingMetadata:
        """Pack one step's rows. `eos_token_ids` are the model's EOS ids (masked with each row's
        stop_token_ids until its min_tokens is reached, unless the row has ignore_eos)."""
        if len(params) != len(states):
            raise ValueError(f"got {len(params)} SamplingParams but {len(states)} RequestSamplingStates")
        device = torch.device(device)
        num_seqs = len(params)
        greedy = [p.is_greedy for p in params]
        all_greedy, all_random = all(greedy), not any(greedy)
        random_rows = [p for p, g in zip(params, greedy, strict=True) if not g]
        use_top_k = any(0 < p.top_k < vocab_size for p in random_rows)
        use_top_p = any(p.top_p < 1.0 for p in random_rows)
        use_min_p = any(p.min_p > 0.0 for p in random_rows)
        use_penalties = any(p.has_penalties for p in params)

        # Every per-row number the step needs travels in ONE host->device copy, one row per column.
        # Greedy rows get neutral values (temperature 1, top-k/p/min-p off). top_k and is_greedy ride as
        # floats (exact: vocab sizes are far below 2**24) and are converted on the device.
        columns: dict[str, list[float]] = {}
        if not all_greedy:
            columns["temperature"] = [
                1.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)
            ]
        if use_top_k:
            columns["top_k"] = [
                vocab_size if g or p.top_k <= 0 else min(p.top_k, vocab_size)
                for p, g in zip(params, greedy, strict=True)
            ]
        if use_top_p:
            columns["top_p"] = [1.0 if g else p.top_p for p, g in zip(params, greedy, strict=True)]
        if use_min_p:
            columns["min_p"] = [0.0 if g else p.min_p for p, g in zip(params, greedy, strict=True)]
        if not all_greedy and not all_random:
            columns["is_greedy"] = [float(g) for g in greedy]
        if use_penalties:
            columns["presence"] = [p.presence_penalty for p in params]
            columns["frequency"] = [p.frequency_penalty for p in params]
            columns["repetition"] = [p.repetition_penalty for p in params]
        col: dict[str, torch.Tensor] = {}
        if columns:  # all greedy without penalties: nothing to copy at all
            packed = _pack_columns(list(columns.values()), num_seqs, device)  # [num_columns, num_seqs]
            col = {name: packed[i] for i, name in enumerate(columns)}

        output_rows = output_ids = prompt_rows = prompt_ids = None
        if use_penalties:
            output_rows, output_ids = _flatten_rows([s.output_token_ids for s in states], device)
            if any(p.repetition_penalty != 1.0 for p in params):
                prompt_rows, prompt_ids = _flatten_rows([s.prompt_token_ids for s in states], device)
        min_rows, min_ids = _min_tokens_pairs(params, states, eos_token_ids, vocab_size, device)
        logprob_counts = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            num_seqs=num_seqs,
            vocab_size=vocab_size,
            all_greedy=all_greedy,
            all_random=all_random,
            temperature=col.get("temperature"),
            is_greedy=col["is_greedy"] > 0.5 if "is_greedy" in col else None,
            top_k=col["top_k"].long() if use_top_k else None,
            max_top_k=int(max((k for k in columns.get("top_k", []) if k < vocab_size), default=0)),
            top_p=col.get("top_p"),
            min_p=col.get("min_p"),
            presence_penalty=col.get("presence"),
            frequency_penalty=col.get("frequency"),
            repetition_penalty=col.get("repetition"),
            output_rows=output_rows,
            output_ids=output_ids,
            prompt_rows=prompt_rows,
            prompt_ids=prompt_ids,
            min_tokens_rows=min_rows,
            min_tokens_ids=min_ids,
            seeded=_seeded_rows(states, greedy, device),
            max_num_logprobs=max(logprob_counts) if logprob_counts else None,
        )


def _seeded_rows(
    states: Sequence[RequestSamplingState], greedy: list[bool], device: torch.device
) -> SeededRows | None:
    rows = [
        i for i, (s, g) in enumerate(zip(states, greedy, strict=True)) if s.generator is not None and not g
    ]
    if not rows:
        return None
    generators = [states[i].generator for i in rows]
    row_tensor = _to_device(_host_tensor(array("q", rows), torch.int64), device)
    return SeededRows(row_tensor, [g for g in generators if g is not None])


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> device without a sync (through pinned memory on CUDA: a copy from pageable
    memory may wait for the stream)."""
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _host_tensor(values: array, dtype: torch.dtype) -> torch.Tensor:
    """array -> CPU tensor without a per-element Python loop (torch.tensor(list) is ~100x slower)."""
    if len(values) == 0:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(values, dtype=dtype)


def _pack_columns(columns: list[list[float]], num_seqs: int, device: torch.device) -> torch.Tensor:
    """Per-row value lists -> one [num_columns, num_seqs] float32 tensor on `device`."""
    flat = array("f", chain.from_iterable(columns))
    return _to_device(_host_tensor(flat, torch.float32).view(len(columns), num_seqs), device)


def _flatten_rows(rows: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged per-row id lists -> (row index [total], id [total]), both int64 on `device`."""
    lengths = _host_tensor(array("q", map(len, rows)), torch.int64)
    row_idx = torch.repeat_interleave(torch.arange(len(rows)), lengths)
    ids = _host_tensor(array("q", chain.from_iterable(rows)), torch.int64)
    return _to_device(row_idx, device), _to_device(ids, device)


def _min_tokens_pairs(
    params: Sequence[SamplingParams],
    states: Sequence[RequestSamplingState],
    eos_token_ids: Sequence[int],
    vocab_size: int,
    device: torch.device,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(row, token) pairs to mask: EOS and stop ids of rows that have not reached min_tokens yet."""
    rows: list[int] = []
    ids: list[int] = []
    for row, (p, s) in enumerate(zip(params, states, strict=True)):
        if len(s.output_token_ids) >= p.min_tokens:
            continue
        stop_ids = set(p.stop_token_ids or [])
        if not p.ignore_eos:
            stop_ids.update(eos_token_ids)
        for token_id in sorted(i for i in stop_ids if i < vocab_size):
            rows.append(row)
            ids.append(token_id)
    if not rows:
        return None, None
    return (
        _to_device(_host_tensor(array("q", rows), torch.int64), device),
        _to_device(_host_tensor(array("q", ids), torch.int64), device),
    )
