"""The engine: Engine.step() = schedule -> execute -> update; the offline LLM facade."""

from .engine import Engine, EngineStats
from .llm import LLM
from .outputs import CompletionOutput, Logprob, RequestOutput

__all__ = ["LLM", "CompletionOutput", "Engine", "EngineStats", "Logprob", "RequestOutput"]
