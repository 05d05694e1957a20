"""The sampler's stages as plain tensor functions, each vectorised over the batch and free of host syncs.

The masking functions take float32 logits [num_seqs, vocab_size] and return new or in-place-updated
logits; per-row parameters are [num_seqs] tensors on the same device. Masked tokens get -inf. The
draws use the counter-based noise of tinyserve.ops (the contract is in tinyserve/ops/sampling.py):
each row's key and counter fix its sample, whichever path and batch it is sampled in.
"""

from __future__ import annotations

import torch

from tinyserve import ops as kernels
from tinyserve.sampling.output import LogprobsTensors

_NEG_INF = float("-inf")


def token_counts(rows: torch.Tensor, ids: torch.Tensor, num_seqs: int, vocab_size: int) -> torch.Tensor:
    """Occurrences of each token per row. rows, ids: [num_tokens] int64 -> [num_seqs, vocab_size] float32."""
    counts = torch.zeros(num_seqs, vocab_size, dtype=torch.float32, device=ids.device)
    if ids.numel() > 0:
        counts.index_put_((rows, ids), torch.ones_like(ids, dtype=torch.float32), accumulate=True)
    return counts


def apply_penalties(
    logits: torch.Tensor,
    output_counts: torch.Tensor,
    prompt_mask: torch.Tensor | None,
    presence: torch.Tensor,
    frequency: torch.Tensor,
    repetition: torch.Tensor,
) -> torch.Tensor:
    """vLLM's penalties, in place.

    logits, output_counts: [num_seqs, vocab_size]; prompt_mask: [num_seqs, vocab_size] bool or None;
    presence, frequency, repetition: [num_seqs].
    Repetition: a token seen in the prompt or the output has its logit divided by rp when positive,
    multiplied by rp otherwise. Then logit -= frequency * count + presence * (count > 0).
    """
    seen_in_output = output_counts > 0
    if prompt_mask is not None:
        seen = seen_in_output | prompt_mask
        rp = repetition.unsqueeze(1)  # [num_seqs, 1]
        penalised = torch.where(logits > 0, logits / rp, logits * rp)
        logits = torch.where(seen, penalised, logits)
    logits -= frequency.unsqueeze(1) * output_counts
    logits -= presence.unsqueeze(1) * seen_in_output.to(logits.dtype)
    return logits


def mask_sorted_top_k_top_p(
    sorted_logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Top-k then top-p on logits already sorted ascending along the vocabulary, in place.

    sorted_logits: [num_seqs, vocab_size]; top_k: [num_seqs] int64 in [1, vocab_size] (vocab_size = off);
    top_p: [num_seqs] float32 in (0, 1] (1 = off). Ties at the k-th logit are all kept. Top-p keeps the
    smallest set of most likely tokens whose probability (after top-k) sums to at least top_p.
    """
    vocab_size = sorted_logits.shape[1]
    if top_k is not None:
        kth = sorted_logits.gather(1, (vocab_size - top_k).unsqueeze(1))  # [num_seqs, 1]
        sorted_logits.masked_fill_(sorted_logits < kth, _NEG_INF)
    if top_p is not None:
        cum_probs = sorted_logits.softmax(dim=-1).cumsum_(dim=-1)
        drop = cum_probs <= (1.0 - top_p).unsqueeze(1)
        drop[:, -1] = False  # always keep the most likely token
        sorted_logits.masked_fill_(drop, _NEG_INF)
    return sorted_logits


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """`mask_sorted_top_k_top_p` for logits in vocabulary order (sort, mask, scatter back), in place.

    logits: [num_seqs, vocab_size]. The sampler itself stays in sorted order (see sorted_masked_logits).
    """
    sorted_logits, sorted_ids = logits.sort(dim=-1)
    return logits.scatter_(1, sorted_ids, mask_sorted_top_k_top_p(sorted_logits, top_k, top_p))


def sorted_masked_logits(
    logits: torch.Tensor,
    sort_key: torch.Tensor | None,
    temperature: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    min_p: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature, top-k, top-p and min-p with one sort, staying in sorted order (no scatter back).

    logits: [num_seqs, vocab_size], any float dtype, not modified; sort_key: a tensor with the same order
    as logits but cheaper to sort (the bf16 model logits when nothing reordered them), or None;
    temperature: [num_seqs] float32 > 0 (the divisor). Returns (sorted_logits, sorted_ids), both
    [num_seqs, vocab_size]: sorted_ids[i, j] is the token at position j (ascending), sorted_logits the
    float32 logits / T there, masked tokens at -inf. Min-p compares in log space:
    p_v < min_p * p_max  <=>  x_v / T < x_max / T + log(min_p).
    """
    if sort_key is None:
        sorted_logits, sorted_ids = logits.sort(dim=-1)
    else:
        sorted_ids = sort_key.argsort(dim=-1)
        sorted_logits = logits.gather(1, sorted_ids)
    sorted_logits = sorted_logits.float().div_(temperature.unsqueeze(1))  # a new tensor: sort/gather copied
    mask_sorted_top_k_top_p(sorted_logits, top_k, top_p)
    if min_p is not None:
        threshold = sorted_logits[:, -1:] + min_p.log().unsqueeze(1)  # the most likely token is last
        sorted_logits.masked_fill_(sorted_logits < threshold, _NEG_INF)
    return sorted_logits, sorted_ids


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> torch.Tensor:
    """Top-k without a full sort: one torch.topk of the largest k in the batch.

    logits: [num_seqs, vocab_size]; top_k: [num_seqs] int64 in [1, vocab_size] (vocab_size = off);
    max_top_k: the largest k below vocab_size (a host int, so no sync is needed to size topk).
    """
    vocab_size = logits.shape[1]
    top_values = logits.topk(max_top_k, dim=-1).values  # [num_seqs, max_top_k], descending
    kth = top_values.gather(1, (top_k.clamp(max=max_top_k) - 1).unsqueeze(1))  # [num_seqs, 1]
    kth = kth.masked_fill((top_k >= vocab_size).unsqueeze(1), _NEG_INF)
    return logits.masked_fill_(logits < kth, _NEG_INF)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Mask tokens whose probability under softmax(logits / T) is below min_p * (the row's top
    probability), in place, in log space: x_v < x_max + T * log(min_p).

    logits: [num_seqs, vocab_size] (not divided by the temperature); min_p: [num_seqs] in [0, 1]
    (0 = off); temperature: [num_seqs] (>= 0; rows with min_p = 0 are never masked, whatever T).
    """
    x_max = logits.amax(dim=-1, keepdim=True)  # [num_seqs, 1]
    log_min_p = min_p.log().unsqueeze(1)
    threshold = torch.where(log_min_p > _NEG_INF, x_max + temperature.unsqueeze(1) * log_min_p, _NEG_INF)
    return logits.masked_fill_(logits < threshold, _NEG_INF)


def draw(
    logits: torch.Tensor, temperature: torch.Tensor, keys: torch.Tensor, counters: torch.Tensor
) -> torch.Tensor:
    """One token per row from softmax(logits / T), or the argmax where T = 0, in one pass over the
    logits (tinyserve.ops.sample_from_logits: Gumbel-max with each row's noise).

    logits: [num_seqs, vocab_size] float32/bf16/fp16, not modified; temperature: [num_seqs] float32;
    keys, counters: [num_seqs] int64. Returns [num_seqs] int64 token ids.
    """
    return kernels.sample_from_logits(logits, temperature, keys, counters)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The argmax of every row (ties to the lowest index), by the sampler's kernel without noise.

    logits: [num_seqs, vocab_size] float32/bf16/fp16, not modified. Returns [num_seqs] int64 token ids.
    """
    return kernels.sample_from_logits(logits)


def draw_sorted(
    sorted_logits: torch.Tensor, sorted_ids: torch.Tensor, keys: torch.Tensor, counters: torch.Tensor
) -> torch.Tensor:
    """`draw` at temperature 1 for logits kept in sorted order: argmax_j (sorted_logits[j] - log E[token j])
    with the noise E drawn in vocabulary order and then permuted, so a row gets the same token here as
    from `draw` on the unsorted logits (up to float rounding in near-ties).

    sorted_logits: [num_seqs, vocab_size] float32 (already divided by the temperature; overwritten);
    sorted_ids: [num_seqs, vocab_size] int64, the token at each position. Returns [num_seqs] int64 ids.
    """
    log_noise = kernels.exponential_noise(keys, counters, sorted_logits.shape[1]).log_()  # vocab order
    scores = sorted_logits.sub_(log_noise.gather(1, sorted_ids))
    positions = scores.argmax(dim=-1, keepdim=True)  # [num_seqs, 1]
    return sorted_ids.gather(1, positions).squeeze(1)


def gather_logprobs(logprobs: torch.Tensor, num_logprobs: int, token_ids: torch.Tensor) -> LogprobsTensors:
    """Logprob and rank of one given token per row plus the row's top `num_logprobs` tokens.

    logprobs: [num_rows, vocab_size] float32 log-probabilities; token_ids: [num_rows] int64 (the sampled
    tokens, or the next prompt tokens for prompt logprobs). Also usable for prompt_logprobs.
    """
    token_ids = token_ids.to(torch.int64).unsqueeze(1)  # [num_rows, 1]
    token_logprobs = logprobs.gather(1, token_ids)  # [num_rows, 1]
    ranks = (logprobs > token_logprobs).sum(dim=-1) + 1  # [num_rows]
    if num_logprobs > 0:
        top = logprobs.topk(num_logprobs, dim=-1)
        ids = torch.cat([token_ids, top.indices], dim=1)
        values = torch.cat([token_logprobs, top.values], dim=1)
    else:
        ids, values = token_ids, token_logprobs
    return LogprobsTensors(token_ids=ids, logprobs=values, ranks=ranks)
