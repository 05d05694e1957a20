"""Engine: one step = schedule -> execute -> update, plus the per-request output state around it
(detokenisation, stop strings, logprobs, n > 1 fan-out).

The engine is single-threaded: the offline `LLM` calls `step()` in a loop, the server calls it from
one background thread (see `async_engine`).

Async scheduling (EngineConfig.async_scheduling, on for CUDA): a step launches its forward, then
finishes the previous step (wait for its sampled ids, Scheduler.update, outputs) while the device
computes, and launches its own sampler last; so the host work of one step overlaps the device work
of the next. The scheduler feeds each decode the token the step before is still sampling (a
placeholder, filled on the device). Nothing falls back to synchronous steps: the sampler of a step
is launched after the previous step's tokens are appended, so penalties and min_tokens see every
token; a request that the previous step finished (stop id, stop string, EOS) got one extra token in
this step, which the scheduler drops.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tinyserve.config import CacheConfig, EngineConfig, SchedulerConfig
from tinyserve.kv_cache import KVCacheManager, KVCacheStats
from tinyserve.models.loader import load_model
from tinyserve.request import Request, RequestStatus
from tinyserve.runner import ForwardOutput, ModelRunner, PendingOutput, PromptLogprobsRequest
from tinyserve.sampling import RequestSamplingState, SamplingMetadata
from tinyserve.sampling_params import SamplingParams
from tinyserve.scheduler import Scheduler, SchedulerOutput
from tinyserve.tokenizer import IncrementalDetokenizer, StopChecker, Tokenizer

from .outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput

logger = logging.getLogger(__name__)

# Prompt tokens of left context when decoding a whole output at once (as the incremental decoder does).
_DECODE_CONTEXT = 6


class _Sample:
    """Engine-side state of one sample (one scheduler Request) of a user request."""

    __slots__ = (
        "group",
        "index",
        "request",
        "params",
        "state",
        "detok",
        "stop",
        "logprobs",
        "cumulative_logprob",
        "finish_reason",
        "stop_reason",
        "text",
        "quiet",
        "sent_tokens",
        "sent_logprobs",
        "sent_text",
    )

    def __init__(
        self, group: _Group, index: int, request: Request, params: SamplingParams, seed: int | None
    ) -> None:
        self.group = group
        self.index = index
        self.request = request
        self.params = params
        # NOTE: the state shares the request's live output list: the sampler sees every appended token.
        self.state = RequestSamplingState(request.prompt_token_ids, request.output_token_ids, seed)
        self.detok: IncrementalDetokenizer | None = None
        self.stop: StopChecker | None = None
        self.logprobs: list[dict[int, Logprob]] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob: float | None = 0.0 if params.logprobs is not None else None
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.text = ""
        # No per-token work (no stream, text, stop strings or logprobs): set once detok is known.
        self.quiet = False
        # What delta outputs (Engine.delta_outputs) have reported so far.
        self.sent_tokens = 0
        self.sent_logprobs = 0
        self.sent_text = ""


class _Group:
    """A user request: its prompt and its n samples."""

    __slots__ = (
        "request_id",
        "prompt",
        "prompt_token_ids",
        "samples",
        "stream",
        "detokenize",
        "metrics",
        "num_unfinished",
        "prompt_logprobs",
        "prompt_logprobs_left",
        "sent_prompt_logprobs",
    )

    def __init__(
        self, request_id: str, prompt: str | None, prompt_token_ids: list[int], stream: bool, detokenize: bool
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.samples: list[_Sample] = []
        self.stream = stream
        self.detokenize = detokenize
        # Prompt position -> {token id: Logprob}, entry 0 None (nothing scores the first token).
        self.prompt_logprobs: list[dict[int, Logprob] | None] | None = None
        self.prompt_logprobs_left = 0
        self.metrics = RequestMetrics(arrival_time=time.monotonic())
        self.num_unfinished = 0
        self.sent_prompt_logprobs = False


@dataclass
class _Step:
    """A launched step, until its results are processed.

    rows: indices into so.req_ids of the sequences that sample, and samples: theirs, picked at
    launch (the previous step may finish one before this step's sampler is launched).
    forward: until the sampler is launched; pending: after. prompt_owners: the (group, prompt
    position) each prompt-logprobs row scores, if any. start: when the step was launched.
    """

    so: SchedulerOutput
    rows: list[int]
    samples: list[_Sample]
    forward: ForwardOutput | None
    prompt_owners: list[tuple[_Group, int]] | None
    start: float
    pending: PendingOutput | None = None


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for /metrics and logs."""

    num_running: int
    num_waiting: int
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int
    kv: KVCacheStats


class Engine:
    """Loads the model and tokenizer, sizes the KV pool, and runs steps.

    Use `add_request`, then call `step()` until `has_unfinished_requests()` is False; each step
    returns the RequestOutputs that changed (streaming requests) or finished.
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        t0 = time.perf_counter()
        torch.manual_seed(config.seed)
        model, arch = load_model(
            config.model,
            device=config.device,
            dtype=config.dtype,
            load_format=config.load_format,
            allow_pickle=config.allow_pickle,
            revision=config.revision,
            seed=config.seed,
        )
        self.arch = arch
        self.device = next(model.parameters()).device
        self.dtype = model.dtype
        self.tokenizer = load_tokenizer(config)
        self.max_model_len = resolve_max_model_len(config.max_model_len, arch.max_model_len)
        tokenizer_eos = self.tokenizer.eos_token_ids if self.tokenizer is not None else []
        self.eos_token_ids = tuple(dict.fromkeys([*arch.eos_token_ids, *tokenizer_eos]))
        max_num_batched_tokens = config.max_num_batched_tokens or max(8192, config.max_num_seqs)
        load_s = time.perf_counter() - t0

        self.runner = ModelRunner(
            model,
            block_size=config.block_size,
            max_model_len=self.max_model_len,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            enforce_eager=config.enforce_eager,
        )
        num_blocks = self.runner.determine_num_blocks(
            num_kv_blocks=config.num_kv_blocks,
            gpu_memory_utilization=config.gpu_memory_utilization,
            kv_cache_memory_bytes=config.kv_cache_memory_bytes,
        )
        self.runner.allocate_kv_cache(num_blocks)
        cache_config = CacheConfig(
            block_size=config.block_size,
            num_blocks=num_blocks,
            enable_prefix_caching=config.enable_prefix_caching,
            gpu_memory_utilization=config.gpu_memory_utilization,
        )
        self.kv_cache = KVCacheManager(cache_config)
        self.async_scheduling = (
            self.device.type == "cuda" if config.async_scheduling is None else config.async_scheduling
        )
        scheduler_config = SchedulerConfig(
            max_num_batched_tokens=max_num_batched_tokens,
            max_num_seqs=config.max_num_seqs,
            max_model_len=self.max_model_len,
            async_scheduling=self.async_scheduling,
        )
        self.scheduler = Scheduler(scheduler_config, self.kv_cache, finish_check=self._finish_check)
        graph_s = self.runner.capture_graphs()
        self.startup_seconds = time.perf_counter() - t0
        logger.info(
            "engine ready: %s on %s (%s), KV pool %d blocks x %d = %d tokens; load %.2fs, graphs %.2fs",
            config.model,
            self.device,
            str(self.dtype).removeprefix("torch."),
            num_blocks,
            config.block_size,
            num_blocks * config.block_size,
            load_s,
            graph_s,
        )
        self._groups: dict[str, _Group] = {}
        self._samples: dict[str, _Sample] = {}  # scheduler request id -> sample
        self._ids = itertools.count()
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.num_steps = 0  # steps that ran the model
        self._scoring_prompts: set[_Group] = set()  # groups whose prompt logprobs are incomplete
        self._in_flight: _Step | None = None  # async scheduling: launched, not yet processed
        # step() returns delta tuples instead of RequestOutputs (set by EngineCore, which sends only
        # what changed: building cumulative objects was ~15 % of its step loop at 256 streams).
        self.delta_outputs = False

    # ---- properties ------------------------------------------------------------------------------
    @property
    def num_kv_blocks(self) -> int:
        return self.runner.num_blocks

    @property
    def kv_pool_tokens(self) -> int:
        return self.runner.num_blocks * self.config.block_size

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            kv=self.kv_cache.stats(),
        )

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def new_request_id(self) -> str:
        return str(next(self._ids))

    # ---- adding and aborting ---------------------------------------------------------------------
    def validate_prompt(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> int:
        """Check a prompt against the model; returns the effective max_tokens (see `check_prompt`)."""
        return check_prompt(
            prompt_token_ids,
            params,
            vocab_size=self.arch.vocab_size,
            max_model_len=self.max_model_len,
            has_tokenizer=self.tokenizer is not None,
        )

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        *,
        prompt: str | None = None,
        stream: bool = False,
        detokenize: bool = True,
    ) -> None:
        """Queue a request (n samples). `stream`: produce a RequestOutput after every step with new
        tokens (the server); otherwise only when the request finishes (LLM.generate).

        detokenize=False: the engine leaves `text` empty (unless stop strings need it) and the caller
        decodes `token_ids` itself — the server does so on its event loop, off the step loop."""
        if request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        prompt_ids = list(prompt_token_ids)
        max_tokens = self.validate_prompt(prompt_ids, params)
        stop_ids = set(params.stop_token_ids or ())
        if not params.ignore_eos:
            stop_ids.update(self.eos_token_ids)
        group = _Group(request_id, prompt, prompt_ids, stream, detokenize)
        cache_key = None
        if params.prompt_logprobs is not None:
            group.prompt_logprobs = [None] * len(prompt_ids)
            group.prompt_logprobs_left = len(prompt_ids) - 1
            # Every prompt position must be computed once to be scored: no prefix hits from other
            # requests (the samples of this one may share; sample 0 scores the prompt).
            cache_key = ("prompt_logprobs", request_id, id(group))
        samples = []
        for i in range(params.n):
            sub_id = request_id if params.n == 1 else f"{request_id}#{i}"
            request = Request(
                sub_id,
                prompt_ids,
                max_tokens,
                sampling_params=params,
                stop_token_ids=stop_ids,
                cache_extra_keys=cache_key,
            )
            seed = None
            if params.seed is not None and not params.is_greedy:
                # Sample i of n draws with noise key seed + i (wrapped to 64 bits) and, at each step,
                # counter = the tokens it has generated: the same tokens in any batch or schedule.
                seed = (params.seed + i) % 2**64
            sample = _Sample(group, i, request, params, seed)
            if params.stop_list:
                sample.stop = StopChecker(params.stop_list, params.include_stop_str_in_output)
            # Stop strings are checked here, so they need the text each step; plain streams only
            # when the caller wants the engine to decode.
            if self.tokenizer is not None and (params.stop_list or (stream and detokenize)):
                sample.detok = IncrementalDetokenizer(
                    self.tokenizer,
                    prompt_token_ids=prompt_ids,
                    skip_special_tokens=params.skip_special_tokens,
                )
            sample.quiet = not stream and sample.detok is None and sample.logprobs is None
            samples.append(sample)
        # All-or-nothing: the scheduler may reject one (too large for the pool) before any is queued.
        for sample in samples:
            self.scheduler.check_size(sample.request)
        for sample in samples:
            self.scheduler.add_request(sample.request)
            self._samples[sample.request.request_id] = sample
        group.samples = samples
        group.num_unfinished = len(samples)
        self._groups[request_id] = group
        if group.prompt_logprobs_left > 0:
            self._scoring_prompts.add(group)
        self.prompt_tokens_total += len(prompt_ids)

    def abort_request(self, request_id: str) -> bool:
        """Abort a user request (all its samples), freeing every KV block. False if unknown/finished."""
        group = self._groups.pop(request_id, None)
        if group is None:
            return False
        self._scoring_prompts.discard(group)
        for sample in group.samples:
            if self.scheduler.abort(sample.request.request_id):
                sample.finish_reason = "abort"
            self._samples.pop(sample.request.request_id, None)
        return True

    # ---- the step --------------------------------------------------------------------------------
    def _prompt_rows(self, so) -> tuple[PromptLogprobsRequest, list[tuple[_Group, int]]] | None:
        """The step's token rows that score a prompt token (sample 0 of groups asking for prompt
        logprobs), and the (group, prompt position) each row scores."""
        rows: list[int] = []
        targets: list[int] = []
        owners: list[tuple[_Group, int]] = []
        num_logprobs = 0
        samples = self._samples
        for i, req_id in enumerate(so.req_ids):
            sample = samples.get(req_id)
            if sample is None or sample.index != 0 or sample.group not in self._scoring_prompts:
                continue
            group = sample.group
            prompt = group.prompt_token_ids
            start = so.num_computed_tokens[i]
            base = so.query_start_loc[i] - start
            # The logits at position p score prompt token p + 1.
            for p in range(start, min(start + so.num_scheduled_tokens[i], len(prompt) - 1)):
                rows.append(base + p)
                targets.append(prompt[p + 1])
                owners.append((group, p + 1))
            num_logprobs = max(num_logprobs, sample.params.prompt_logprobs or 0)
        if not rows:
            return None
        return PromptLogprobsRequest(rows, targets, num_logprobs), owners

    def _record_prompt_logprobs(self, owners: list[tuple[_Group, int]], lp) -> None:
        for k, (group, position) in enumerate(owners):
            assert group.prompt_logprobs is not None
            n = group.samples[0].params.prompt_logprobs or 0
            if group.prompt_logprobs[position] is None:
                group.prompt_logprobs_left -= 1
            group.prompt_logprobs[position] = self._logprob_entry(lp, k, n)
            if group.prompt_logprobs_left == 0:
                self._scoring_prompts.discard(group)

    def _logprob_entry(self, lp, row: int, n: int) -> dict[int, Logprob]:
        """{token id: Logprob} for row `row` of a LogprobsLists: the row's own token (column 0, with
        its rank) and its top-n alternatives (ranks 1..n)."""
        ids = lp.token_ids[row]
        values = lp.logprobs[row]
        tok = self.tokenizer

        def text(token_id: int) -> str | None:
            return tok.decode([token_id], skip_special_tokens=False) if tok is not None else None

        entry = {ids[j]: Logprob(values[j], j, text(ids[j])) for j in range(1, n + 1)}
        entry[ids[0]] = Logprob(values[0], lp.ranks[row], text(ids[0]))
        return entry

    def _finish_check(self, request: Request, token_id: int) -> RequestStatus | None:
        if token_id in request.stop_token_ids:
            # NOTE: the sampler masks stop ids until min_tokens; this guards the count as well.
            if request.num_output_tokens > request.sampling_params.min_tokens:
                return RequestStatus.FINISHED_STOPPED
        return None

    def step(self) -> list[RequestOutput]:
        """Schedule and run one step; returns the RequestOutputs that changed (delta tuples with
        `delta_outputs`).

        With async scheduling these are the previous step's outputs (this step's come with the
        next call): this step's forward is launched before the previous step is processed."""
        launched = self._launch(self.scheduler.schedule())
        outputs = self._finish_in_flight()  # async: the previous step, while the device runs this one
        self._in_flight = self._sample(launched)
        if not self.async_scheduling:
            outputs = self._finish_in_flight()
        return outputs

    def _launch(self, so: SchedulerOutput) -> _Step | None:
        """Launch the step's forward; None when it runs nothing."""
        if so.is_empty:
            self.runner.forward(so)  # the runner still forgets finished and preempted requests
            return None
        if so.num_tokens == so.num_seqs and all(so.do_sample):
            rows = list(range(so.num_seqs))
        else:
            rows = [i for i, d in enumerate(so.do_sample) if d]
        samples = self._samples
        req_ids = so.req_ids
        picked = [samples[req_ids[i]] for i in rows]
        scoring = self._prompt_rows(so) if self._scoring_prompts else None
        start = time.monotonic()
        forward = self.runner.forward(so, scoring[0] if scoring else None)
        self.num_steps += 1
        return _Step(so, rows, picked, forward, scoring[1] if scoring else None, start)

    def _sample(self, step: _Step | None) -> _Step | None:
        """Launch the step's sampler and the copies of its results to the host."""
        if step is None:
            return None
        sampling = None
        if step.rows:
            sampling = SamplingMetadata.build(
                [s.params for s in step.samples],
                [s.state for s in step.samples],
                vocab_size=self.arch.vocab_size,
                device=self.device,
                eos_token_ids=self.eos_token_ids,
            )
        assert step.forward is not None
        step.pending = self.runner.sample(step.forward, sampling)
        step.forward = None  # the logits are the sampler's now
        return step

    def _finish_in_flight(self) -> list[RequestOutput]:
        """Wait for the launched step's results, append its tokens and make its outputs."""
        step = self._in_flight
        if step is None:
            return []
        self._in_flight = None
        assert step.pending is not None
        out = step.pending.result()
        if step.prompt_owners:
            self._record_prompt_logprobs(step.prompt_owners, out.prompt_logprobs)
        if not step.rows:
            return []
        so = step.so
        sampled: list[list[int]] = [[] for _ in range(so.num_seqs)]
        for k, i in enumerate(step.rows):
            sampled[i] = [out.sampled_token_ids[k]]
        logprob_rows = {i: k for k, i in enumerate(step.rows)} if out.logprobs is not None else None
        updated = self.scheduler.update(so, sampled)
        self.generation_tokens_total += len(updated)
        return self._process(updated, so, out, logprob_rows, step.start)

    def _process(self, updated, so, out, logprob_rows, step_start: float) -> list[RequestOutput]:
        now = time.monotonic()
        touched: dict[str, _Group] = {}
        index_of = None
        samples = self._samples
        for request in updated:
            sample = samples.get(request.request_id)
            if sample is None:
                continue
            # The hot path of offline batches: a quiet sample needs nothing between its first token
            # (metrics) and its finish.
            if sample.quiet and not request.is_finished and request.num_output_tokens > 1:
                continue
            group = sample.group
            m = group.metrics
            if m.first_token_time is None:
                m.first_token_time = now
                m.first_scheduled_time = step_start
                m.num_cached_tokens = max(request.num_cached_tokens, 0)
            m.last_token_time = now
            token_id = request.output_token_ids[-1]
            if sample.logprobs is not None and logprob_rows is not None:
                if index_of is None:
                    index_of = {r: i for i, r in enumerate(so.req_ids)}
                self._record_logprobs(sample, out.logprobs, logprob_rows[index_of[request.request_id]])
            if sample.detok is not None:
                delta = sample.detok.add_tokens((token_id,))
                if request.is_finished:
                    delta += sample.detok.flush()
                if sample.stop is not None:
                    sample.stop.append(delta)
                    if request.is_finished and not sample.stop.stopped:
                        sample.stop.flush()
                    sample.text = sample.stop.text
                    if sample.stop.stopped and not request.is_finished:
                        self.scheduler.finish_request(request.request_id, RequestStatus.FINISHED_STOPPED)
                        sample.stop_reason = sample.stop.stop_reason
                else:
                    sample.text += delta
            if request.is_finished:
                self._finish_sample(sample)
            if group.stream or group.num_unfinished == 0:
                touched[group.request_id] = group
        outputs = []
        make_output = self._delta if self.delta_outputs else self._output
        for group in touched.values():
            if group.num_unfinished == 0:
                self._groups.pop(group.request_id, None)
                self._scoring_prompts.discard(group)
                group.metrics.finished_time = now
            outputs.append(make_output(group))
        return outputs

    def _finish_sample(self, sample: _Sample) -> None:
        request = sample.request
        if sample.finish_reason is not None:
            return
        sample.finish_reason = request.finish_reason or "stop"
        if sample.stop_reason is None and request.status == RequestStatus.FINISHED_STOPPED:
            last = request.output_token_ids[-1] if request.output_token_ids else None
            if last is not None and last in request.stop_token_ids and last not in self.eos_token_ids:
                sample.stop_reason = last
        if sample.detok is None and sample.group.detokenize:
            sample.text = self._decode_output(sample)
        self._samples.pop(request.request_id, None)
        sample.group.num_unfinished -= 1

    def _decode_output(self, sample: _Sample) -> str:
        """The whole output at once, with the prompt's last tokens as left context (leading spaces)."""
        tok = self.tokenizer
        if tok is None:
            return ""
        skip = sample.params.skip_special_tokens
        special = tok.all_special_ids if skip else frozenset()
        out_ids = sample.request.output_token_ids
        context = [t for t in sample.group.prompt_token_ids if t not in special][-_DECODE_CONTEXT:]
        if not context:
            return tok.decode(out_ids, skip_special_tokens=skip)
        prefix = tok.decode(context, skip_special_tokens=skip)
        full = tok.decode(context + out_ids, skip_special_tokens=skip)
        return (
            full[len(prefix) :] if full.startswith(prefix) else tok.decode(out_ids, skip_special_tokens=skip)
        )

    def _record_logprobs(self, sample: _Sample, lp, row: int) -> None:
        entry = self._logprob_entry(lp, row, sample.params.logprobs or 0)
        assert sample.logprobs is not None
        sample.logprobs.append(entry)
        sample.cumulative_logprob = (sample.cumulative_logprob or 0.0) + lp.logprobs[row][0]

    def _delta(self, group: _Group) -> tuple:
        """What changed in a group since its previous delta, as plain tuples (see engine/core.py for
        the layout): new token ids, new logprob entries, the text's new suffix."""
        samples = []
        for s in group.samples:
            ids = s.request.output_token_ids
            new_ids = ids[s.sent_tokens :]
            s.sent_tokens = len(ids)
            new_logprobs = None
            if s.logprobs is not None:
                new_logprobs = s.logprobs[s.sent_logprobs :]
                s.sent_logprobs = len(s.logprobs)
            text_update = None
            if s.text != s.sent_text:
                keep = len(s.sent_text) if s.text.startswith(s.sent_text) else 0
                text_update = (keep, s.text[keep:])
                s.sent_text = s.text
            samples.append(
                (
                    s.index,
                    new_ids,
                    text_update,
                    s.finish_reason,
                    s.stop_reason,
                    new_logprobs,
                    s.cumulative_logprob,
                )
            )
        prompt_logprobs = None
        if group.prompt_logprobs is not None and not group.sent_prompt_logprobs:
            # Complete by the first output: every prompt position is scored before the first sample.
            prompt_logprobs = list(group.prompt_logprobs)
            group.sent_prompt_logprobs = True
        m = group.metrics
        metrics = (
            m.arrival_time,
            m.first_scheduled_time,
            m.first_token_time,
            m.last_token_time,
            m.finished_time,
            m.num_cached_tokens,
        )
        return (
            group.request_id,
            group.num_unfinished == 0,
            samples,
            metrics,
            m.num_cached_tokens,
            prompt_logprobs,
        )

    def _output(self, group: _Group) -> RequestOutput:
        outputs = []
        for s in group.samples:
            outputs.append(
                CompletionOutput(
                    index=s.index,
                    text=s.text,
                    # NOTE: the request's live list (it only grows, and not after the request finishes).
                    token_ids=s.request.output_token_ids,
                    finish_reason=s.finish_reason,
                    stop_reason=s.stop_reason,
                    logprobs=list(s.logprobs) if s.logprobs is not None else None,
                    cumulative_logprob=s.cumulative_logprob,
                )
            )
        return RequestOutput(
            request_id=group.request_id,
            prompt=group.prompt,
            prompt_token_ids=group.prompt_token_ids,
            outputs=outputs,
            finished=group.num_unfinished == 0,
            metrics=group.metrics,
            num_cached_tokens=group.metrics.num_cached_tokens,
            prompt_logprobs=list(group.prompt_logprobs) if group.prompt_logprobs is not None else None,
        )


def check_prompt(
    prompt_token_ids: Sequence[int],
    params: SamplingParams,
    *,
    vocab_size: int,
    max_model_len: int,
    has_tokenizer: bool,
) -> int:
    """Check a prompt against the model; returns the effective max_tokens.

    Raises ValueError naming what is wrong (empty prompt, ids outside the vocabulary, a prompt
    or prompt + max_tokens longer than max_model_len, unsupported parameters)."""
    n = len(prompt_token_ids)
    if n == 0:
        raise ValueError("the prompt is empty: give at least one token")
    bad = [t for t in prompt_token_ids if not isinstance(t, int) or t < 0 or t >= vocab_size]
    if bad:
        raise ValueError(f"prompt token ids must be ints in [0, {vocab_size}); got {bad[:5]}")
    if n >= max_model_len:
        raise ValueError(
            f"the prompt has {n} tokens, but max_model_len is {max_model_len}: "
            "it must be shorter to leave room for at least one generated token"
        )
    if params.prompt_logprobs is not None and params.prompt_logprobs > vocab_size:
        raise ValueError(
            f"prompt_logprobs must be <= the vocabulary size ({vocab_size}), got {params.prompt_logprobs}"
        )
    max_tokens = params.max_tokens if params.max_tokens is not None else max_model_len - n
    if n + max_tokens > max_model_len:
        raise ValueError(
            f"this model's maximum context length is {max_model_len} tokens, but the request has "
            f"{n} prompt tokens and max_tokens={max_tokens} ({n + max_tokens} in total); "
            "shorten the prompt or lower max_tokens"
        )
    if not has_tokenizer and params.stop_list:
        raise ValueError("stop strings need a tokenizer; this engine runs without one (skip_tokenizer_init)")
    if params.logprobs is not None and params.logprobs > vocab_size:
        raise ValueError(f"logprobs must be <= the vocabulary size ({vocab_size}), got {params.logprobs}")
    return max_tokens


def load_tokenizer(config: EngineConfig) -> Tokenizer | None:
    """The tokenizer an engine with this config uses (None with skip_tokenizer_init)."""
    if config.skip_tokenizer_init:
        return None
    path = config.tokenizer or model_dir_of(config.model, config.revision)
    return Tokenizer.from_pretrained(path, chat_template=config.chat_template)


def model_dir_of(model: str, revision: str | None) -> str:
    from tinyserve.models.loader import resolve_model_path

    return str(resolve_model_path(model, revision=revision, weights=False))


def resolve_max_model_len(requested: int | None, model_max: int) -> int:
    if requested is None:
        return model_max
    if requested > model_max:
        raise ValueError(
            f"max_model_len={requested} exceeds what the model supports ({model_max} positions, from its "
            "config.json); use at most that"
        )
    return requested
