"""Capturing an op sequence in a CUDA graph the way the runner does, for the ops' graph tests."""

from __future__ import annotations

from tinyserve.runner.linear_tuning import capture_graph as capture

__all__ = ["capture"]
