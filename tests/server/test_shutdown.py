"""SIGTERM and SIGINT: stop accepting, finish in-flight requests within --shutdown-timeout (abort
the rest), exit 0."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from .server_process import ServerProcess


def stream_lines(url: str, body: dict, out: list[str]) -> None:
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as resp:
            out.extend(line for line in resp.iter_lines() if line)
    except httpx.HTTPError as e:
        out.append(f"error: {e}")


@pytest.mark.parametrize(
    "sig, n, finishes",
    [
        (signal.SIGTERM, 1, True),  # 40 tokens: done well within the 1 s grace period
        (signal.SIGINT, 64, False),  # 64 x 480 tokens: far longer than the grace period, so aborted
    ],
)
def test_signal_graceful_exit(stories260k_path, tmp_path, sig, n, finishes):
    server = ServerProcess(
        stories260k_path, ["--num-kv-blocks", "2100", "--shutdown-timeout", "1"], tmp_path / "server.log"
    )
    lines: list[str] = []
    body = {
        "prompt": "Once upon a time",
        "stream": True,
        "ignore_eos": True,
        "n": n,
        "max_tokens": 40 if finishes else 480,
    }
    t = threading.Thread(target=stream_lines, args=(server.url, body, lines))
    t.start()
    deadline = time.monotonic() + 10
    while not lines and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lines, server.log()
    code = server.stop(sig, timeout_s=30)
    t.join(30)
    assert code == 0, server.log()
    assert lines[-1] == "data: [DONE]", lines[-3:]
    last = json.loads(lines[-2][len("data:") :])
    if finishes:
        assert last["choices"][0]["finish_reason"] == "length"
    else:  # aborted by the shutdown: an error event, then [DONE]
        assert last["error"]["code"] == "shutting_down", last
    with pytest.raises(httpx.HTTPError):
        httpx.get(server.url + "/health", timeout=2)  # no longer listening
