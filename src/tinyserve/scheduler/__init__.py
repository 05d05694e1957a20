"""Token-budget continuous batching (chunked prefill, prefix-cache hits, preemption by recompute)."""

from __future__ import annotations

from .output import SchedulerOutput
from .scheduler import FinishCheck, Scheduler, stop_on_stop_token_ids

__all__ = ["FinishCheck", "Scheduler", "SchedulerOutput", "stop_on_stop_token_ids"]
