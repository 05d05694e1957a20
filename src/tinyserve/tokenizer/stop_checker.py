"""StopChecker: finds stop strings in a request's growing output text, across token boundaries, and
decides which part of the text is safe to stream."""

from __future__ import annotations

from collections.abc import Sequence


class StopChecker:
    """Accumulates text deltas (from IncrementalDetokenizer) and watches for stop strings.

    When a stop string appears, `text` is cut just before it (or just after it when
    include_stop_str_in_output) and `stop_reason` holds the string. While streaming, the last
    (longest stop string - 1) characters are held back, so a partly matched stop string is never sent;
    with include_stop_str_in_output nothing needs holding back. Streamed deltas always concatenate to
    the final `text`.
    """

    def __init__(self, stop: Sequence[str] = (), include_stop_str_in_output: bool = False) -> None:
        if any(not s for s in stop):
            raise ValueError(f"stop strings must be non-empty, got {list(stop)!r}")
        self._stop = list(stop)
        self._include = include_stop_str_in_output
        max_len = max((len(s) for s in self._stop), default=0)
        self._hold_back = 0 if include_stop_str_in_output else max(max_len - 1, 0)
        self._max_len = max_len
        self.text = ""  # the output text so far (final once stopped)
        self.stop_reason: str | None = None  # the stop string that matched
        self._num_sent = 0  # characters of `text` already returned as deltas

    @property
    def stopped(self) -> bool:
        return self.stop_reason is not None

    def append(self, delta: str) -> str:
        """Add newly decoded text; returns the text that may be streamed now.

        After a stop string matched, the returned piece ends the stream (further calls return "").
        """
        if self.stopped or not delta:
            return ""
        start = max(0, len(self.text) - self._max_len + 1)  # a new match must end inside `delta`
        self.text += delta
        match = self._find(start)
        if match is not None:
            index, stop = match
            self.text = self.text[: index + len(stop)] if self._include else self.text[:index]
            self.stop_reason = stop
            return self._send(len(self.text))
        return self._send(len(self.text) - self._hold_back)

    def flush(self) -> str:
        """The request ended for another reason (length, EOS): release the held-back tail."""
        return self._send(len(self.text))

    def _find(self, start: int) -> tuple[int, str] | None:
        """Earliest stop string at or after `start` (the first listed wins a tie)."""
        best: tuple[int, str] | None = None
        for stop in self._stop:
            index = self.text.find(stop, start)
            if index >= 0 and (best is None or index < best[0]):
                best = (index, stop)
        return best

    def _send(self, end: int) -> str:
        end = max(end, self._num_sent)
        piece = self.text[self._num_sent : end]
        self._num_sent = end
        return piece
