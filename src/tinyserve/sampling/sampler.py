"""Sampler: logits of one step -> one token id per row (and logprobs), with no host sync inside.

Order (as vLLM): raw logprobs; penalties; min_tokens; greedy argmax; temperature; top-k; top-p; min-p;
sample (an exponential race, so no torch.multinomial and no sync). A stage runs only when some row of
the step needs it (decided on the host in SamplingMetadata).
"""

from __future__ import annotations

import torch

from tinyserve.sampling import ops
from tinyserve.sampling.metadata import SamplingMetadata
from tinyserve.sampling.output import SamplerOutput


class Sampler:
    """Stateless and batched; call once per step.

    NOTE: the caller's logits are never modified: the sampler works on a float32 copy, made only when a
    stage actually changes the logits.
    """

    def __call__(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        """logits: [num_seqs, vocab_size] float32/bf16/fp16 on any device -> SamplerOutput.

        The sampled ids are [num_seqs] int64 on the logits' device; the caller reads them back once
        (SamplerOutput.to_host). Logprobs are those of the raw model distribution (log_softmax of the
        unprocessed logits), as vLLM returns by default.
        """
        if logits.dim() != 2 or logits.shape[0] != metadata.num_seqs:
            raise ValueError(
                f"logits must be [num_seqs={metadata.num_seqs}, vocab_size], got {tuple(logits.shape)}"
            )
        raw_logprobs = None
        if metadata.max_num_logprobs is not None:
            raw_logprobs = logits.float().log_softmax(dim=-1)  # [num_seqs, vocab_size]

        model_logits = logits
        logits = self._copy_if_modified(logits, metadata)
        logits = self._apply_penalties(logits, metadata)
        if metadata.min_tokens_rows is not None:
            logits.index_put_((metadata.min_tokens_rows, metadata.min_tokens_ids), _neg_inf(logits))

        if metadata.all_greedy:
            sampled = logits.argmax(dim=-1)
        else:
            sampled = self._sample(logits, metadata, self._sort_key(model_logits, metadata))

        logprobs = None
        if raw_logprobs is not None:
            logprobs = ops.gather_logprobs(raw_logprobs, metadata.max_num_logprobs or 0, sampled)
        return SamplerOutput(sampled_token_ids=sampled, logprobs=logprobs)

    @staticmethod
    def _copy_if_modified(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        modifies = md.has_penalties or md.min_tokens_rows is not None or not md.all_greedy
        if not modifies:
            return logits  # all greedy, nothing to apply: argmax reads the caller's tensor as is
        if logits.dtype == torch.float32:
            return logits.clone()
        return logits.float()

    @staticmethod
    def _sort_key(model_logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor | None:
        """bf16/fp16 model logits sort twice as fast as float32 and give the same order, as long as no
        penalty or min_tokens mask changed the values (the temperature keeps the order)."""
        unchanged = not md.has_penalties and md.min_tokens_rows is None
        half = model_logits.dtype in (torch.bfloat16, torch.float16)
        return model_logits if unchanged and half else None

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
    def _sample(logits: torch.Tensor, md: SamplingMetadata, sort_key: torch.Tensor | None) -> torch.Tensor:
        """Random rows sample; greedy rows (in a mixed batch) take the argmax of the penalised logits."""
        assert md.temperature is not None
        greedy_ids = None if md.all_random else logits.argmax(dim=-1)  # [num_seqs]
        logits.div_(md.temperature.unsqueeze(1))
        if md.top_p is not None:
            # One sort serves top-k, top-p and min-p; the draw happens in sorted order too.
            weights, sorted_ids = ops.sorted_probs(logits, sort_key, md.top_k, md.top_p, md.min_p)
            positions = ops.draw(weights, md.seeded, order=sorted_ids)
            sampled = sorted_ids.gather(1, positions.unsqueeze(1)).squeeze(1)
        else:
            if md.top_k is not None:
                logits = ops.apply_top_k(logits, md.top_k, md.max_top_k)
            if md.min_p is not None:
                logits = ops.apply_min_p(logits, md.min_p)
            sampled = ops.draw(logits.softmax(dim=-1), md.seeded)
        if greedy_ids is not None:
            assert md.is_greedy is not None
            sampled = torch.where(md.is_greedy, greedy_ids, sampled)
        return sampled


def _neg_inf(logits: torch.Tensor) -> torch.Tensor:
    # new_full fills on the device; torch.tensor(..., device=cuda) would copy from the host and sync.
    return logits.new_full((), float("-inf"))
