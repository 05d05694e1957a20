"""Test-local driver of the paged path: a KV pool, a free-list block allocator and per-sequence block
tables, turning "run these new tokens for these sequences" into one flat forward."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from tinyserve.layers.attention import AttentionMetadata

POISON = 1000.0  # fills the pool: a kernel that reads a slot nobody wrote gets visibly wrong results


class PagedRunner:
    def __init__(self, model: torch.nn.Module, num_blocks: int = 64, block_size: int = 16, seed: int = 0):
        self.model = model
        self.block_size = block_size
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        self.device = device
        shape = model.kv_cache_shape(num_blocks, block_size)
        self.kv_caches = [
            (
                torch.full(shape, POISON, dtype=dtype, device=device),
                torch.full(shape, POISON, dtype=dtype, device=device),
            )
            for _ in range(model.num_layers)
        ]
        model.bind_kv_caches(self.kv_caches)
        # Block 0 is the null block (padding in block tables); the rest are handed out in random order
        # so block tables are not contiguous.
        self.free_blocks = list(range(1, num_blocks))
        random.Random(seed).shuffle(self.free_blocks)
        self.block_tables: dict[int, list[int]] = {}
        self.num_cached: dict[int, int] = {}

    def _slots(self, seq_id: int, start: int, end: int) -> list[int]:
        table = self.block_tables.setdefault(seq_id, [])
        while len(table) * self.block_size < end:
            table.append(self.free_blocks.pop())
        return [
            table[p // self.block_size] * self.block_size + p % self.block_size for p in range(start, end)
        ]

    def step(self, batch: Sequence[tuple[int, Sequence[int]]]) -> torch.Tensor:
        """batch: (seq_id, new token ids) per sequence -> logits [num_tokens, vocab] float32 for every token
        of the flat batch, in batch order."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start_loc = [0]
        seq_lens: list[int] = []
        for seq_id, token_ids in batch:
            start = self.num_cached.get(seq_id, 0)
            end = start + len(token_ids)
            input_ids += list(token_ids)
            positions += list(range(start, end))
            slots += self._slots(seq_id, start, end)
            query_start_loc.append(query_start_loc[-1] + len(token_ids))
            seq_lens.append(end)
            self.num_cached[seq_id] = end
        max_blocks = max(len(self.block_tables[s]) for s, _ in batch)
        tables = [self.block_tables[s] + [0] * (max_blocks - len(self.block_tables[s])) for s, _ in batch]
        query_lens = [len(t) for _, t in batch]

        def i32(values: list[int] | list[list[int]]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int32, device=self.device)

        md = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=self.device),
            block_tables=i32(tables),
            query_start_loc=i32(query_start_loc),
            seq_lens=i32(seq_lens),
            context_lens=i32(seq_lens),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            is_decode_only=all(q == 1 for q in query_lens),
        )
        ids = torch.tensor(input_ids, dtype=torch.int64, device=self.device)
        pos = torch.tensor(positions, dtype=torch.int64, device=self.device)
        with torch.inference_mode():
            hidden = self.model(ids, pos, md)
            return self.model.compute_logits(hidden, torch.arange(len(input_ids), device=self.device))

    def greedy(
        self, seq_id: int, prompt: Sequence[int], max_new_tokens: int
    ) -> tuple[list[int], list[torch.Tensor]]:
        """Prefill the prompt, then decode one token per step; (new token ids, logits [vocab] per step)."""
        logits = self.step([(seq_id, prompt)])[-1]
        tokens, step_logits = [], []
        for _ in range(max_new_tokens):
            step_logits.append(logits)
            tokens.append(int(logits.argmax()))
            if len(tokens) == max_new_tokens:
                break
            logits = self.step([(seq_id, [tokens[-1]])])[-1]
        return tokens, step_logits


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm())
