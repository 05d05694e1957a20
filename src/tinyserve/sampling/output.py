"""What the sampler returns: device tensors, and their host copies made with one sync."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LogprobsLists:
    """Host copy of `LogprobsTensors`. Row i of a request that asked for N logprobs: the first 1 + N
    entries of token_ids[i] / logprobs[i] (entry 0 is the sampled or given token)."""

    token_ids: list[list[int]]  # [num_rows][1 + max_num_logprobs]
    logprobs: list[list[float]]  # [num_rows][1 + max_num_logprobs]
    ranks: list[int]  # [num_rows]: rank of token_ids[i][0]; 1 = the most likely token


@dataclass
class LogprobsTensors:
    """Logprobs of one token per row plus the row's top-N alternatives (raw model distribution).

    token_ids: [num_rows, 1 + max_num_logprobs] int64; column 0 is the sampled (or given) token, then
        the top max_num_logprobs tokens, most likely first.
    logprobs: [num_rows, 1 + max_num_logprobs] float32, the log-probabilities of those tokens.
    ranks: [num_rows] int64, 1 + the number of tokens strictly more likely than column 0's token.
    """

    token_ids: torch.Tensor
    logprobs: torch.Tensor
    ranks: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> LogprobsTensors:
        return LogprobsTensors(
            self.token_ids.to(device, non_blocking=non_blocking),
            self.logprobs.to(device, non_blocking=non_blocking),
            self.ranks.to(device, non_blocking=non_blocking),
        )

    def tolists(self) -> LogprobsLists:
        """Host lists (syncs if the tensors are on a device; prefer SamplerOutput.to_host)."""
        return LogprobsLists(self.token_ids.tolist(), self.logprobs.tolist(), self.ranks.tolist())


@dataclass
class SamplerHostOutput:
    """The sampler's result as Python lists."""

    sampled_token_ids: list[int]  # [num_seqs]
    logprobs: LogprobsLists | None  # None when no row asked for logprobs


@dataclass
class SamplerOutput:
    """The sampler's result, still on the logits' device.

    sampled_token_ids: [num_seqs] int64.
    logprobs: None when no row asked for logprobs.
    """

    sampled_token_ids: torch.Tensor
    logprobs: LogprobsTensors | None = None

    def to_host(self) -> SamplerHostOutput:
        """Copy everything to the host and wait once: the step's single device->host sync."""
        ids = self.sampled_token_ids
        lp = self.logprobs
        if ids.device.type == "cuda":
            # Non-blocking copies land in pinned memory; one event wait covers all of them.
            stream = torch.cuda.current_stream(ids.device)
            ids = ids.to("cpu", non_blocking=True)
            lp = lp.to("cpu", non_blocking=True) if lp is not None else None
            event = torch.cuda.Event()
            event.record(stream)
            event.synchronize()
        elif ids.device.type != "cpu":
            ids = ids.cpu()
            lp = lp.to("cpu") if lp is not None else None
        return SamplerHostOutput(ids.tolist(), lp.tolists() if lp is not None else None)
