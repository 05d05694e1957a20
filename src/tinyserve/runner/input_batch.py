"""The step's inputs in persistent buffers: one packed int32 host buffer (pinned on CUDA), copied to
the device in ONE non-blocking copy, and a persistent device block table updated by changed cells.

Layout of the packed buffer (fixed offsets, so CUDA graphs can read fixed addresses):

    [input_ids: T][positions: T][slot_mapping: T][query_start_loc: S+1][seq_lens: S]
    [logits_indices: S][block_table_rows: S][placeholder_index: S][placeholder_source: S]
    [cell_index: n][cell_value: n]

T = max_num_tokens, S = max_num_seqs. `block_table_rows[i]` is the persistent row of the i-th
scheduled sequence; `cells` are (flat index, block id) pairs written into the persistent table
before the forward (n of them this step, at most C). Only the prefix up to the end of this step's
cells is copied.

Async scheduling: a placeholder token (SchedulerOutput.placeholder_rows) is the id that the previous
step is still sampling. Its (flat index, row among the previous step's samples) pair travels in the
same copy, and a gather on the device moves the id from the previous step's sampled ids into
input_ids, behind the copy in stream order. On CUDA two pinned host buffers take turns, so that
packing a step never overwrites the one whose copy to the device may still be queued.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tinyserve.scheduler.output import SchedulerOutput


@dataclass
class StepInputs:
    """Device views of one step's inputs (valid until the next `prepare`)."""

    input_ids: torch.Tensor  # [num_tokens] int32
    positions: torch.Tensor  # [num_tokens] int32
    slot_mapping: torch.Tensor  # [num_tokens] int32
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    logits_indices: torch.Tensor  # [num_logits] int32
    block_table_rows: torch.Tensor  # [num_seqs] int32: rows of the persistent block table
    num_tokens: int
    num_seqs: int
    num_logits: int


class InputBatch:
    """Persistent input buffers and the per-request rows of the block table.

    Args:
        max_num_tokens: most tokens in one step (the scheduler's token budget, or a graph size).
        max_num_seqs: most sequences in one step.
        max_blocks_per_seq: width of the block table (max_model_len / block_size, rounded up).
        device: where the model runs.
    """

    def __init__(self, max_num_tokens: int, max_num_seqs: int, max_blocks_per_seq: int, device: torch.device):
        self.device = device
        self.max_num_tokens = max_num_tokens
        self.max_num_seqs = max_num_seqs
        self.width = max_blocks_per_seq
        t, s = max_num_tokens, max_num_seqs
        self.off_ids, self.off_pos, self.off_slots = 0, t, 2 * t
        self.off_qsl = 3 * t
        self.off_seq_lens = self.off_qsl + s + 1
        self.off_logits = self.off_seq_lens + s
        self.off_rows = self.off_logits + s
        self.off_ph_index = self.off_rows + s
        self.off_ph_source = self.off_ph_index + s
        self.off_cells = self.off_ph_source + s
        # Cells: a whole step of brand-new requests may rewrite every row at most once.
        self.max_cells = s * max_blocks_per_seq
        size = self.off_cells + 2 * self.max_cells
        pin = device.type == "cuda"
        self._hosts = [torch.zeros(size, dtype=torch.int32, pin_memory=pin) for _ in range(1 + pin)]
        # Recorded after each host buffer's latest copy to the device (CUDA only).
        self._copied = [torch.cuda.Event() for _ in self._hosts] if pin else []
        self._turn = 0
        self.host = self._hosts[0]
        self.np = self.host.numpy()
        self.dev = torch.zeros(size, dtype=torch.int32, device=device) if pin else self.host
        # Persistent block table: one row per live request, plus a final all-zero row used by padding.
        self.block_table = torch.zeros((s + 1, max_blocks_per_seq), dtype=torch.int32, device=device)
        self.pad_row = s
        self.row_of: dict[str, int] = {}
        self.free_rows = list(range(s - 1, -1, -1))
        self._cell_values = np.zeros(self.max_cells, dtype=np.int32)

    # ---- block-table rows ------------------------------------------------------------------------
    def release(self, req_ids: list[str]) -> None:
        """Forget finished or preempted requests (their rows are reused)."""
        for req_id in req_ids:
            row = self.row_of.pop(req_id, None)
            if row is not None:
                self.free_rows.append(row)

    def _cells(self, so: SchedulerOutput) -> int:
        """Write the changed block-table cells into the packed buffer; returns how many."""
        n = 0
        row_of = self.row_of
        width = self.width
        # Indices go first, values are moved behind them once their count is known.
        idx = self.np[self.off_cells : self.off_cells + self.max_cells]
        val = self._cell_values
        req_ids = so.req_ids
        for k, seq in enumerate(so.changed_rows):
            req_id = req_ids[seq]
            row = row_of.get(req_id)
            if row is None:
                row = self.free_rows.pop()
                row_of[req_id] = row
            start = so.changed_row_starts[k]
            ids = so.changed_row_block_ids[k]
            m = len(ids)
            if start + m > width:
                raise ValueError(
                    f"request {req_id!r} needs {start + m} KV blocks; the block table holds {width} "
                    "(max_model_len / block_size)"
                )
            base = row * width + start
            idx[n : n + m] = np.arange(base, base + m, dtype=np.int32)
            val[n : n + m] = ids
            n += m
        self.np[self.off_cells + n : self.off_cells + 2 * n] = val[:n]
        return n

    # ---- one step ---------------------------------------------------------------------------------
    def _next_host_buffer(self) -> None:
        """Switch to the other pinned host buffer once its last copy to the device has run (on CPU
        there is one buffer, and no copy)."""
        if not self._copied:
            return
        self._turn ^= 1
        self._copied[self._turn].synchronize()  # two steps old: long done unless the device lags
        self.host = self._hosts[self._turn]
        self.np = self.host.numpy()

    def prepare(
        self, so: SchedulerOutput, pad_to: int | None = None, previous_samples: torch.Tensor | None = None
    ) -> StepInputs:
        """Pack the step, copy it to the device once, and apply block-table changes.

        pad_to: for a decode-only CUDA-graph step, the graph's batch size: rows num_seqs..pad_to-1
        become padding (slot -1, length 0, the zero block-table row).
        previous_samples: [num_sampled] int64, the previous step's sampled ids on the device, where
        the step's placeholders take their input ids from (async scheduling)."""
        t, s = so.num_tokens, so.num_seqs
        if t > self.max_num_tokens or s > self.max_num_seqs:
            raise ValueError(
                f"step of {t} tokens / {s} sequences exceeds the runner's buffers "
                f"({self.max_num_tokens} tokens / {self.max_num_seqs} sequences)"
            )
        self._next_host_buffer()
        a = self.np
        a[self.off_ids : self.off_ids + t] = so.input_token_ids
        a[self.off_pos : self.off_pos + t] = so.positions
        a[self.off_slots : self.off_slots + t] = so.slot_mapping
        a[self.off_qsl : self.off_qsl + s + 1] = so.query_start_loc
        a[self.off_seq_lens : self.off_seq_lens + s] = so.seq_lens
        num_logits = len(so.logits_indices)
        a[self.off_logits : self.off_logits + num_logits] = so.logits_indices
        num_cells = self._cells(so)
        row_of = self.row_of
        a[self.off_rows : self.off_rows + s] = [row_of[r] for r in so.req_ids]
        num_placeholders = self._pack_placeholders(so, previous_samples)
        if pad_to is not None and pad_to > s:
            p = pad_to
            a[self.off_ids + t : self.off_ids + p] = 0
            a[self.off_pos + t : self.off_pos + p] = 0
            a[self.off_slots + t : self.off_slots + p] = -1
            a[self.off_seq_lens + s : self.off_seq_lens + p] = 0
            a[self.off_rows + s : self.off_rows + p] = self.pad_row
        if self.dev is not self.host:
            end = self.off_cells + 2 * num_cells
            self.dev[:end].copy_(self.host[:end], non_blocking=True)
            self._copied[self._turn].record(torch.cuda.current_stream(self.device))
        d = self.dev
        if num_cells:
            idx = d[self.off_cells : self.off_cells + num_cells].long()
            val = d[self.off_cells + num_cells : self.off_cells + 2 * num_cells]
            self.block_table.view(-1).index_copy_(0, idx, val)
        if num_placeholders:
            assert previous_samples is not None
            self._fill_placeholders(num_placeholders, t, previous_samples)
        return StepInputs(
            input_ids=d[self.off_ids : self.off_ids + t],
            positions=d[self.off_pos : self.off_pos + t],
            slot_mapping=d[self.off_slots : self.off_slots + t],
            query_start_loc=d[self.off_qsl : self.off_qsl + s + 1],
            seq_lens=d[self.off_seq_lens : self.off_seq_lens + s],
            logits_indices=d[self.off_logits : self.off_logits + num_logits],
            block_table_rows=d[self.off_rows : self.off_rows + s],
            num_tokens=t,
            num_seqs=s,
            num_logits=num_logits,
        )

    def _pack_placeholders(self, so: SchedulerOutput, previous_samples: torch.Tensor | None) -> int:
        """Write the (flat index, source row) pairs of the step's placeholders; returns how many."""
        n = len(so.placeholder_rows)
        if n and previous_samples is None:
            raise ValueError("the step has placeholder inputs but no previous step's samples to fill them")
        a = self.np
        a[self.off_ph_index : self.off_ph_index + n] = list(
            map(so.query_start_loc.__getitem__, so.placeholder_rows)
        )
        a[self.off_ph_source : self.off_ph_source + n] = so.placeholder_sources
        return n

    def _fill_placeholders(self, n: int, num_tokens: int, previous_samples: torch.Tensor) -> None:
        """input_ids[index[k]] = previous_samples[source[k]] on the device, for the n placeholders
        (after the step's copy to the device, which brought the pairs and the other ids)."""
        d = self.dev
        index = d[self.off_ph_index : self.off_ph_index + n].long()
        source = d[self.off_ph_source : self.off_ph_source + n]
        ids = previous_samples.index_select(0, source).to(torch.int32)
        d[self.off_ids : self.off_ids + num_tokens].index_copy_(0, index, ids)

    def graph_views(self, batch_size: int) -> dict[str, torch.Tensor]:
        """Fixed-address device views that a decode graph of `batch_size` sequences reads."""
        d = self.dev
        return {
            "input_ids": d[self.off_ids : self.off_ids + batch_size],
            "positions": d[self.off_pos : self.off_pos + batch_size],
            "slot_mapping": d[self.off_slots : self.off_slots + batch_size],
            "seq_lens": d[self.off_seq_lens : self.off_seq_lens + batch_size],
            "block_table_rows": d[self.off_rows : self.off_rows + batch_size],
        }
