"""CUDA graphs for decode-only steps, captured once per bucketed batch size.

Each graph reads its inputs from fixed addresses in the runner's packed device buffer (InputBatch)
and writes logits [batch_size, vocab] into a fixed output tensor; a step copies its inputs in (one
host->device copy, as in eager mode) and replays the graph of the next larger size.
"""

from __future__ import annotations

import bisect

import torch

from tinyserve.layers.attention import AttentionMetadata
from tinyserve.models.llama import LlamaForCausalLM

from .input_batch import InputBatch


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 64, then every 16 up to max_num_seqs (inclusive)."""
    sizes = [1, 2, 4, 8] + list(range(16, 65, 8)) + list(range(80, max_num_seqs + 16, 16))
    sizes = sorted({min(s, max_num_seqs) for s in sizes})
    return sizes


class DecodeGraphs:
    def __init__(
        self, model: LlamaForCausalLM, inputs: InputBatch, sizes: list[int], max_model_len: int
    ) -> None:
        self.model = model
        self.inputs = inputs
        self.sizes = sizes
        self.max_model_len = max_model_len
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None
        device = inputs.device
        self._arange = torch.arange(max(sizes) + 1, dtype=torch.int32, device=device)
        self._block_tables = torch.zeros((max(sizes), inputs.width), dtype=torch.int32, device=device)

    def batch_size_for(self, num_seqs: int) -> int | None:
        i = bisect.bisect_left(self.sizes, num_seqs)
        return self.sizes[i] if i < len(self.sizes) else None

    def _forward(self, bs: int) -> torch.Tensor:
        v = self.inputs.graph_views(bs)
        block_tables = self._block_tables[:bs]
        torch.index_select(self.inputs.block_table, 0, v["block_table_rows"], out=block_tables)
        md = AttentionMetadata(
            slot_mapping=v["slot_mapping"],
            block_tables=block_tables,
            query_start_loc=self._arange[: bs + 1],
            seq_lens=v["seq_lens"],
            context_lens=v["seq_lens"],
            max_query_len=1,
            max_seq_len=self.max_model_len,
            is_decode_only=True,
        )
        hidden = self.model(v["input_ids"], v["positions"], md)
        return self.model.compute_logits(hidden, None)

    @torch.inference_mode()
    def capture(self) -> None:
        # Padding inputs for the warm-up and capture runs: slot -1 (nothing written), length 0.
        inputs = self.inputs
        big = max(self.sizes)
        inputs.np[inputs.off_slots : inputs.off_slots + big] = -1
        inputs.np[inputs.off_seq_lens : inputs.off_seq_lens + big] = 0
        inputs.np[inputs.off_rows : inputs.off_rows + big] = inputs.pad_row
        inputs.np[inputs.off_ids : inputs.off_ids + big] = 0
        inputs.np[inputs.off_pos : inputs.off_pos + big] = 0
        if inputs.dev is not inputs.host:
            inputs.dev.copy_(inputs.host)
        stream = torch.cuda.Stream(device=inputs.device)
        stream.wait_stream(torch.cuda.current_stream(inputs.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside capture: lazy inits, workspace sizing
                self._forward(big)
        torch.cuda.current_stream(inputs.device).wait_stream(stream)
        torch.cuda.synchronize(inputs.device)
        for bs in sorted(self.sizes, reverse=True):  # largest first: later graphs reuse its pool
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.outputs[bs] = self._forward(bs)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize(inputs.device)

    def replay(self, bs: int) -> torch.Tensor:
        self.graphs[bs].replay()
        return self.outputs[bs]
