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


@dataclass
class RequestSamplingState:
    """What the sampler needs to know about one row's request besides its SamplingParams.

    prompt_token_ids: the prompt (used only by the repetition penalty).
    output_token_ids: the tokens generated so far; their count is the step index (min_tokens, and the
        noise counter of a seeded row) and their counts feed the presence/frequency penalties.
    seed: the noise key of a row whose request has a seed: (SamplingParams.seed + sample index) mod
        2**64 (the engine computes it). Such a row draws with counter = len(output_token_ids), so its
        samples depend only on (seed, position): not on the batch, the code path, async scheduling or
        preemption. None: the row draws with the step's shared key and its row index as the counter.
    """

    prompt_token_ids: Sequence[int] = ()
    output_token_ids: Sequence[int] = ()
    seed: int | None = None


@dataclass
class SamplingMetadata:
    """Per-row sampling parameters of one step. Tensors live on the logits' device.

    A tensor is None when no row needs that stage, and the sampler skips it. Shapes use num_seqs rows.
    """

    num_seqs: int
    vocab_size: int
    all_greedy: bool
    all_random: bool
    temperature: torch.Tensor | None  # [num_seqs] float32; greedy rows hold 0.0. None when all greedy
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
    # The rows' sampling noise (tinyserve.ops.sample_from_logits): Philox key and counter, the bits of
    # uint64 values. None (both) when all rows are greedy.
    noise_keys: torch.Tensor | None = None  # [num_seqs] int64
    noise_counters: torch.Tensor | None = None  # [num_seqs] int64
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
        # Greedy rows get neutral values (temperature 0 = argmax, top-k/p/min-p off). top_k and
        # is_greedy ride as floats (exact: vocab sizes are far below 2**24) and are converted on the
        # device; the noise keys and counters ride as uint64 behind the floats.
        columns: dict[str, list[float]] = {}
        noise: list[array] = []
        if not all_greedy:
            columns["temperature"] = [
                0.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)
            ]
            noise = _noise_rows(states)
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
        # (No columns at all, all greedy without penalties: nothing is copied.)
        floats, ints = _pack(list(columns.values()), noise, num_seqs, device)
        col = {name: floats[i] for i, name in enumerate(columns)} if floats is not None else {}

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
            noise_keys=ints[0] if ints is not None else None,
            noise_counters=ints[1] if ints is not None else None,
            max_num_logprobs=max(logprob_counts) if logprob_counts else None,
        )


def _step_key() -> int:
    """One uint64 noise key for the step's unseeded rows, from torch's default CPU generator (so
    torch.manual_seed, which the engine calls with EngineConfig.seed, makes runs reproducible)."""
    lo, hi = torch.randint(0, 2**32, (2,), dtype=torch.int64).tolist()
    return hi << 32 | lo


def _noise_rows(states: Sequence[RequestSamplingState]) -> list[array]:
    """[keys, counters] of the step's rows as uint64 arrays. A seeded row: (its seed, tokens generated
    so far); any other row: (the step's key, its row index), so rows of one step draw distinct streams.
    Greedy rows get values too (sample_from_logits ignores them)."""
    num_seqs = len(states)
    counters = array("Q", range(num_seqs))
    seeds = [s.seed for s in states]
    num_unseeded = seeds.count(None)
    if num_unseeded == num_seqs:  # the common case: no per-element work
        return [array("Q", [_step_key()]) * num_seqs, counters]
    step_key = _step_key() if num_unseeded else 0
    keys = array("Q", [step_key if seed is None else seed % 2**64 for seed in seeds])
    for row, (state, seed) in enumerate(zip(states, seeds, strict=True)):
        if seed is not None:
            counters[row] = len(state.output_token_ids)
    return [keys, counters]


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


def _pack(
    float_columns: list[list[float]], uint64_columns: list[array], num_seqs: int, device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Per-row value lists -> ([num_float_columns, num_seqs] float32, [num_uint64_columns, num_seqs]
    int64 holding the uint64 bits) on `device`, in one host->device copy; None for no columns."""
    floats = array("f", chain.from_iterable(float_columns))
    ints = array("Q")
    for column in uint64_columns:
        ints.extend(column)
    if device.type == "cpu":  # no copy at all: the tensors view the arrays
        return (
            _host_tensor(floats, torch.float32).view(len(float_columns), num_seqs) if floats else None,
            _host_tensor(ints, torch.int64).view(len(uint64_columns), num_seqs) if ints else None,
        )
    # One byte buffer: the floats, then the uint64s at the next multiple of 8 bytes, viewed back on the
    # device (a view's byte offset must be a multiple of its element size).
    if not floats and not ints:
        return None, None
    float_bytes = len(floats) * 4
    offset = -(-float_bytes // 8) * 8
    buf = bytearray(offset + len(ints) * 8)
    buf[:float_bytes] = floats.tobytes()
    buf[offset:] = ints.tobytes()
    packed = _to_device(torch.frombuffer(buf, dtype=torch.uint8), device)
    return (
        packed[:float_bytes].view(torch.float32).view(len(float_columns), num_seqs) if floats else None,
        packed[offset:].view(torch.int64).view(len(uint64_columns), num_seqs) if ints else None,
    )


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
