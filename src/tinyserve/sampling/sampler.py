"""Sampler: logits of one step -> one token id per row (and logprobs), with no host sync inside.

Order (as vLLM): raw logprobs; penalties; min_tokens; greedy argmax; temperature; top-k; top-p; min-p;
sample. Sampling is Gumbel-max with counter-based noise (tinyserve.ops.sample_from_logits): no softmax,
no torch.multinomial, no sync, and a row's draw depends only on its noise key and counter. A stage runs
only when some row of the step needs it (decided on the host in SamplingMetadata).

The paths, by what the step's random rows ask for:
- nothing but a temperature (greedy rows may be mixed in): one kernel pass over the logits, read as
  the model wrote them (bf16) unless penalties or min_tokens changed them;
- top-k and/or min-p without top-p: the masks on a float32 copy, then the same kernel;
- top-p: one sort for top-k, top-p and min-p, and the draw in sorted order with the same noise, so a
  seeded row gets the same token on every path (up to float rounding in near-ties).
"""

from __future__ import annotations

import torch

from tinyserve.sampling import ops
from tinyserve.sampling.metadata import SamplingMetadata
from tinyserve.sampling.output import SamplerOutput


class Sampler:
    """Stateless and batched; call once per step.

    NOTE: the caller's logits are never modified: the stages that change values work on a float32 copy,
    made only when one of them runs.
    """

    def __call__(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        """logits: [num_seqs, vocab_size] float32/bf16/fp16 on any device -> SamplerOutput.

        The sampled ids are [num_seqs] int64 on the logits' device; the caller reads them back once
        (SamplerOutput.to_host). Logprobs are those of the raw model distribution (log_softmax of the
        unprocessed logits), as vLLM returns by default.
        """
        md = metadata
        if logits.dim() != 2 or logits.shape[0] != md.num_seqs:
            raise ValueError(
                f"logits must be [num_seqs={md.num_seqs}, vocab_size], got {tuple(logits.shape)}"
            )
        raw_logprobs = None
        if md.max_num_logprobs is not None:
            raw_logprobs = logits.float().log_softmax(dim=-1)  # [num_seqs, vocab_size]

        model_logits = logits
        if md.has_penalties or md.min_tokens_rows is not None:
            logits = _float_copy(logits)
            logits = self._apply_penalties(logits, md)
            if md.min_tokens_rows is not None:
                logits.index_put_((md.min_tokens_rows, md.min_tokens_ids), _neg_inf(logits))

        if md.all_greedy:
            sampled = ops.greedy(logits)  # the caller's tensor itself when nothing changed it
        elif md.top_p is not None:
            sampled = self._sample_sorted(logits, md, self._sort_key(model_logits, logits))
        else:
            sampled = self._sample(logits, md, copied=logits is not model_logits)

        logprobs = None
        if raw_logprobs is not None:
            logprobs = ops.gather_logprobs(raw_logprobs, md.max_num_logprobs or 0, sampled)
        return SamplerOutput(sampled_token_ids=sampled, logprobs=logprobs)

    @staticmethod
    def _sort_key(model_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor | None:
        """bf16/fp16 model logits sort twice as fast as float32 and give the same order, as long as no
        penalty or min_tokens mask changed the values (the temperature keeps the order)."""
        half = model_logits.dtype in (torch.bfloat16, torch.float16)
        return model_logits if logits is model_logits and half else None

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        if not md.has_penalties:
            return logits
        assert md.output_rows is not None and md.output_ids is not None
        assert md.presence_penalty is not None and md.frequency_penalty is not None
        assert md.repetition_penalty is not None
        counts = ops.token_counts(md.output_rows, md.output_ids, md.num_seqs, logits.shape[1])
        prompt_mask = None
        if md.prompt_rows is not None and md.prompt_ids is not None:
            prompt_mask = ops.token_counts(md.prompt_rows, md.prompt_ids, md.num_seqs, logits.shape[1]) > 0
        return ops.apply_penalties(
            logits, counts, prompt_mask, md.presence_penalty, md.frequency_penalty, md.repetition_penalty
        )

    @staticmethod
    def _sample(logits: torch.Tensor, md: SamplingMetadata, copied: bool) -> torch.Tensor:
        """No top-p in the step: top-k and min-p masks (when asked for) on undivided logits, then one
        pass that samples the random rows and takes the argmax of the greedy ones (temperature 0).
        `copied`: logits is already the sampler's own float32 copy (the masks write in place)."""
        assert md.temperature is not None and md.noise_keys is not None and md.noise_counters is not None
        if md.top_k is not None or md.min_p is not None:
            if not copied:
                logits = _float_copy(logits)
            if md.top_k is not None:  # the k largest logits are those of logits / T
                logits = ops.apply_top_k(logits, md.top_k, md.max_top_k)
            if md.min_p is not None:
                logits = ops.apply_min_p(logits, md.min_p, md.temperature)
        return ops.draw(logits, md.temperature, md.noise_keys, md.noise_counters)

    @staticmethod
    def _sample_sorted(
        logits: torch.Tensor, md: SamplingMetadata, sort_key: torch.Tensor | None
    ) -> torch.Tensor:
        """Some row uses top-p: one sort serves top-k, top-p and min-p, and the draw happens in sorted
        order too. Greedy rows (in a mixed batch) take the argmax of the penalised logits."""
        assert md.temperature is not None and md.noise_keys is not None and md.noise_counters is not None
        greedy_ids = None if md.all_random else ops.greedy(logits)  # [num_seqs]
        divisor = md.temperature if md.is_greedy is None else md.temperature.masked_fill(md.is_greedy, 1.0)
        sorted_logits, sorted_ids = ops.sorted_masked_logits(
            logits, sort_key, divisor, md.top_k, md.top_p, md.min_p
        )
        sampled = ops.draw_sorted(sorted_logits, sorted_ids, md.noise_keys, md.noise_counters)
        if greedy_ids is not None:
            assert md.is_greedy is not None
            sampled = torch.where(md.is_greedy, greedy_ids, sampled)
        return sampled


def _float_copy(logits: torch.Tensor) -> torch.Tensor:
    """The sampler's own float32 copy of the logits (the caller's tensor is never written)."""
    return logits.clone() if logits.dtype == torch.float32 else logits.float()


def _neg_inf(logits: torch.Tensor) -> torch.Tensor:
    # new_full fills on the device; torch.tensor(..., device=cuda) would copy from the host and sync.
    return logits.new_full((), float("-inf"))
