"""ModelRunner: one engine step on the device.

SchedulerOutput -> packed inputs (one host->device copy) -> AttentionMetadata -> model.forward ->
logits for the sampled rows only -> Sampler -> ONE device->host copy of the sampled ids.
Decode-only steps replay a CUDA graph captured for the next larger bucketed batch size (and a
context-length bound, see cuda_graphs.py).

A step runs in three calls that never wait for the device, so that the engine can do host work
between them while the device computes (async scheduling): `forward` (launch the model), `sample`
(launch the sampler and the non-blocking copies to the host) and `PendingOutput.result` (wait for
those copies: the step's one sync). `execute` does all three.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from tinyserve.layers.attention import AttentionMetadata
from tinyserve.models.llama import LlamaForCausalLM
from tinyserve.sampling import LogprobsLists, LogprobsTensors, Sampler, SamplingMetadata, gather_logprobs
from tinyserve.scheduler.output import SchedulerOutput

from .cuda_graphs import DecodeGraphs, graph_batch_sizes
from .input_batch import InputBatch, StepInputs
from .kv_cache_alloc import allocate_kv_caches, cpu_kv_budget, cuda_kv_budget, kv_bytes_per_block
from .linear_tuning import LinearChoice, tune_linear_layers


@dataclass
class PromptLogprobsRequest:
    """Prompt logprobs wanted this step: the flat token rows whose logits score the next prompt token.

    rows: [n] flat token indices of the step; targets: [n] the prompt token that follows each row's
    token; num_logprobs: the top-N alternatives to return with each (the largest asked for).
    """

    rows: list[int]
    targets: list[int]
    num_logprobs: int


@dataclass
class ModelRunnerOutput:
    """The step's samples, one per sequence with do_sample, in scheduling order.

    sampled_token_ids: [num_logits] sampled ids.
    logprobs: row i belongs to the i-th sampled sequence; None when no row asked for logprobs.
    prompt_logprobs: row i belongs to PromptLogprobsRequest.rows[i]; None when none were asked for.
    """

    sampled_token_ids: list[int]
    logprobs: LogprobsLists | None
    prompt_logprobs: LogprobsLists | None = None


@dataclass
class ForwardOutput:
    """A launched forward (the device may still be computing it); valid until the next forward.

    logits: [num_logits, vocab_size] for the rows of so.logits_indices; None when none sample.
    prompt_logprobs: rows of PromptLogprobsRequest.rows; None when none were asked for.
    """

    logits: torch.Tensor | None
    prompt_logprobs: LogprobsTensors | None = None


@dataclass
class PendingOutput:
    """A step's results on their way to the host: host tensors filled by non-blocking copies (into
    pinned memory, which torch allocates for them), and the CUDA event recorded behind the copies
    (None on CPU, where the results are host tensors already)."""

    sampled_token_ids: torch.Tensor | None  # [num_logits] int64, host
    logprobs: LogprobsTensors | None
    prompt_logprobs: LogprobsTensors | None
    copied: torch.cuda.Event | None

    def result(self) -> ModelRunnerOutput:
        """Wait for the copies (the step's one device->host sync) and return the lists."""
        if self.copied is not None:
            self.copied.synchronize()
        ids = self.sampled_token_ids
        return ModelRunnerOutput(
            ids.tolist() if ids is not None else [],
            self.logprobs.tolists() if self.logprobs is not None else None,
            self.prompt_logprobs.tolists() if self.prompt_logprobs is not None else None,
        )


def _to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """Host ints -> int64 on `device` without waiting for the device: through pinned memory on CUDA
    (a copy from pageable memory may wait for the stream)."""
    t = torch.tensor(values, dtype=torch.int64)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class ModelRunner:
    """Owns the model, its KV cache, the input buffers, the CUDA graphs and the sampler.

    Args:
        model: a loaded model (weights on its device).
        block_size: tokens per KV block.
        max_model_len: longest sequence; sets the block-table width and the graphs' attention bound.
        max_num_seqs, max_num_batched_tokens: the scheduler's per-step limits.
        enforce_eager: never capture CUDA graphs.
    """

    def __init__(
        self,
        model: LlamaForCausalLM,
        *,
        block_size: int,
        max_model_len: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enforce_eager: bool = False,
    ) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = model.dtype
        self.vocab_size = model.arch_config.vocab_size
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.inputs = InputBatch(max_num_batched_tokens, max_num_seqs, self.max_blocks_per_seq, self.device)
        self.sampler = Sampler()
        self.num_blocks = 0
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.use_graphs = self.device.type == "cuda" and not enforce_eager
        self.graphs: DecodeGraphs | None = None
        self.linear_choices: list[LinearChoice] = []  # measured by capture_graphs
        # The latest step's sampled ids [num_logits] on the device: the next step's placeholders.
        self._previous_samples: torch.Tensor | None = None

    # ---- set-up ------------------------------------------------------------------------------------
    def determine_num_blocks(
        self, *, num_kv_blocks: int | None, gpu_memory_utilization: float, kv_cache_memory_bytes: int | None
    ) -> int:
        """Blocks in the KV pool: given, from a byte budget, or from free GPU memory after profiling."""
        if num_kv_blocks is not None:
            return num_kv_blocks
        per_block = kv_bytes_per_block(self.model, self.block_size)
        if kv_cache_memory_bytes is not None or self.device.type != "cuda":
            budget = cpu_kv_budget(kv_cache_memory_bytes)
            # No point holding more than every sequence at full length (plus the null block).
            cap = self.max_num_seqs * self.max_blocks_per_seq + 1
            return max(1, min(budget // per_block, cap))
        peak = self.profile_activation_peak()
        budget = cuda_kv_budget(self.device, gpu_memory_utilization, peak)
        num_blocks = budget // per_block
        if num_blocks < self.max_blocks_per_seq + 1:
            raise RuntimeError(
                f"not enough GPU memory for the KV cache: {max(budget, 0) / 2**30:.2f} GiB left for it at "
                f"gpu_memory_utilization={gpu_memory_utilization}, but one sequence of max_model_len="
                f"{self.max_model_len} needs {(self.max_blocks_per_seq + 1) * per_block / 2**30:.2f} GiB. "
                "Raise gpu_memory_utilization, lower max_model_len, or use a smaller model."
            )
        return int(num_blocks)

    @torch.inference_mode()
    def profile_activation_peak(self) -> int:
        """Run one forward at the largest step size with a 1-block dummy cache; returns the extra
        bytes the step needed above what was allocated before it."""
        dummy = allocate_kv_caches(self.model, 1, self.block_size)
        self.model.bind_kv_caches(dummy)
        num_tokens = self.max_num_batched_tokens
        num_seqs = min(self.max_num_seqs, num_tokens)
        dev = self.device
        seq_len = num_tokens // num_seqs
        lens = [seq_len] * num_seqs
        lens[-1] += num_tokens - seq_len * num_seqs
        qsl = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0).to(torch.int32)
        positions = torch.cat([torch.arange(n, dtype=torch.int32) for n in lens])
        md = AttentionMetadata(
            slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int32, device=dev),
            block_tables=torch.zeros((num_seqs, 1), dtype=torch.int32, device=dev),
            query_start_loc=qsl.to(dev),
            seq_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
            context_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
            max_query_len=max(lens),
            max_seq_len=max(lens),
            is_decode_only=False,
        )
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        ids = torch.zeros(num_tokens, dtype=torch.int32, device=dev)
        hidden = self.model(ids, positions.to(dev), md)
        logits = self.model.compute_logits(hidden, (qsl[1:] - 1).to(dev))
        torch.sort(logits, dim=-1)  # the sampler's top-p sort: the largest temporary of a step
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - before
        del hidden, logits, md, ids, dummy
        torch.cuda.empty_cache()
        return int(peak)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.kv_caches = allocate_kv_caches(self.model, num_blocks, self.block_size)
        self.model.bind_kv_caches(self.kv_caches)

    def capture_graphs(self) -> float:
        """Choose the linear kernels for the decode batch sizes (linear_tuning.py), then capture the
        decode graphs (no-op on CPU or with enforce_eager); returns seconds spent."""
        if not self.use_graphs:
            return 0.0
        start = time.perf_counter()
        sizes = graph_batch_sizes(self.max_num_seqs)
        self.linear_choices = tune_linear_layers(self.model, sizes)
        self.graphs = DecodeGraphs(self.model, self.inputs, sizes, self.max_model_len)
        self.graphs.capture()
        return time.perf_counter() - start

    # ---- one step ----------------------------------------------------------------------------------
    def _metadata(self, so: SchedulerOutput, x: StepInputs) -> AttentionMetadata:
        block_tables = self.inputs.block_table.index_select(0, x.block_table_rows)
        return AttentionMetadata(
            slot_mapping=x.slot_mapping,
            block_tables=block_tables,
            query_start_loc=x.query_start_loc,
            seq_lens=x.seq_lens,
            context_lens=x.seq_lens,
            max_query_len=so.max_query_len,
            max_seq_len=so.max_seq_len,
            is_decode_only=so.num_tokens == so.num_seqs,
        )

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write block copies, before the step writes any KV."""
        src = _to_device([s for s, _ in copies], self.device)
        dst = _to_device([d for _, d in copies], self.device)
        for k, v in self.kv_caches:
            k.index_copy_(0, dst, k.index_select(0, src))
            v.index_copy_(0, dst, v.index_select(0, src))

    @torch.inference_mode()
    def execute(
        self,
        so: SchedulerOutput,
        sampling: SamplingMetadata | None,
        prompt_logprobs: PromptLogprobsRequest | None = None,
    ) -> ModelRunnerOutput:
        """Run one scheduled step and wait for its results (forward, sample, result)."""
        return self.sample(self.forward(so, prompt_logprobs), sampling).result()

    @torch.inference_mode()
    def forward(
        self, so: SchedulerOutput, prompt_logprobs: PromptLogprobsRequest | None = None
    ) -> ForwardOutput:
        """Launch the model on one scheduled step, up to the logits of so.logits_indices.

        Placeholder inputs (async scheduling) take the ids that the previous `sample` drew, on the
        device. `prompt_logprobs` asks for the logprobs of prompt tokens (eager steps only)."""
        inputs = self.inputs
        inputs.release(so.finished_req_ids)
        inputs.release(so.preempted_req_ids)
        if so.block_copies:
            self._copy_blocks(so.block_copies)
        if so.is_empty:
            return ForwardOutput(None)
        graph = None
        if self.graphs is not None and so.num_tokens == so.num_seqs and prompt_logprobs is None:
            graph = self.graphs.key_for(so.num_seqs, so.max_seq_len)
        x = inputs.prepare(so, pad_to=graph[0] if graph else None, previous_samples=self._previous_samples)
        if graph is not None:
            logits = self.graphs.replay(graph)[: so.num_seqs]  # type: ignore[union-attr]
            if x.num_logits != so.num_seqs:  # every decode samples; keep the rows that asked
                logits = logits.index_select(0, x.logits_indices)
            return ForwardOutput(logits)
        md = self._metadata(so, x)
        hidden = self.model(x.input_ids, x.positions, md)
        prompt_lp = self._prompt_logprobs(hidden, prompt_logprobs) if prompt_logprobs is not None else None
        logits = self.model.compute_logits(hidden, x.logits_indices) if x.num_logits else None
        return ForwardOutput(logits, prompt_lp)

    @torch.inference_mode()
    def sample(self, forward: ForwardOutput, sampling: SamplingMetadata | None) -> PendingOutput:
        """Launch the sampler on a forward's logits (`sampling` describes their rows; None when the
        step samples nothing) and the copies of the results to the host; doesn't wait for them.

        NOTE: the next step's placeholders read these samples: call it for every forward, in order."""
        out = None
        if sampling is not None and forward.logits is not None:
            out = self.sampler(forward.logits, sampling)
        self._previous_samples = out.sampled_token_ids if out is not None else None
        logprobs = out.logprobs if out is not None else None
        prompt_lp = forward.prompt_logprobs
        # Non-blocking copies to the host (on CPU, no copy at all), then one event behind them.
        copied = torch.cuda.Event() if self.device.type == "cuda" else None
        pending = PendingOutput(
            out.sampled_token_ids.to("cpu", non_blocking=True) if out is not None else None,
            logprobs.to("cpu", non_blocking=True) if logprobs is not None else None,
            prompt_lp.to("cpu", non_blocking=True) if prompt_lp is not None else None,
            copied,
        )
        if copied is not None:
            copied.record(torch.cuda.current_stream(self.device))
        return pending

    def _prompt_logprobs(self, hidden: torch.Tensor, req: PromptLogprobsRequest) -> LogprobsTensors:
        """Raw-model logprobs of the next prompt token at `req.rows`, with the top-N (on the device;
        they come back with the step's samples)."""
        rows = _to_device(req.rows, self.device)
        targets = _to_device(req.targets, self.device)
        logprobs = self.model.compute_logits(hidden, rows).float().log_softmax(dim=-1)  # [n, vocab]
        return gather_logprobs(logprobs, req.num_logprobs, targets)
