"""ServerState: what every route needs, built once by `create_app` and kept on `app.state`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tinyserve.engine.async_engine import AsyncEngine
    from tinyserve.tokenizer import Tokenizer

    from .metrics import ServerMetrics


@dataclass
class ServerState:
    """model_names: the names clients may use in `model` (the first is reported by /v1/models).
    api_key: when set, every /v1 and tokenizer route needs `Authorization: Bearer <api_key>`.
    max_batch_choices: most prompts x n in one completions request.
    shutdown_grace_s: how long in-flight requests may run on after SIGTERM/SIGINT before they are aborted.
    """

    engine: AsyncEngine
    model_names: list[str]
    model_path: str
    metrics: ServerMetrics
    api_key: str | None = None
    max_batch_choices: int = 1024
    shutdown_grace_s: float = 10.0
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def tokenizer(self) -> Tokenizer | None:
        """None when the engine runs without one (--skip-tokenizer-init)."""
        return self.engine.info.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.info.max_model_len

    @property
    def max_num_seqs(self) -> int:
        return self.engine.info.config.max_num_seqs

    @property
    def vocab_size(self) -> int:
        return self.engine.info.arch.vocab_size
