"""Logits -> token ids: greedy, temperature, top-k/p, min-p, penalties, min_tokens, seeds, logprobs.

Use: `md = SamplingMetadata.build(params, states, vocab_size=..., device=...)` once per step, then
`out = Sampler()(logits, md)` and one `out.to_host()`.
"""

from tinyserve.sampling.metadata import RequestSamplingState, SamplingMetadata
from tinyserve.sampling.ops import gather_logprobs
from tinyserve.sampling.output import LogprobsLists, LogprobsTensors, SamplerHostOutput, SamplerOutput
from tinyserve.sampling.sampler import Sampler

__all__ = [
    "LogprobsLists",
    "LogprobsTensors",
    "RequestSamplingState",
    "Sampler",
    "SamplerHostOutput",
    "SamplerOutput",
    "SamplingMetadata",
    "gather_logprobs",
]
