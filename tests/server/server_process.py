"""Start `tinyserve serve` as a subprocess (black-box), wait for its ready line, stop it with a signal."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

READY = re.compile(r"TinyServe ready on (http://[\d.]+:\d+)")


class ServerProcess:
    """`python -m tinyserve.cli serve MODEL --port 0 ARGS...`; output goes to `log_path`.

    The server binds port 0 (a free port, no race) and prints its address in the ready line."""

    def __init__(
        self, model: str | Path, args: list[str], log_path: Path, *, timeout_s: float = 120.0
    ) -> None:
        self.log_path = log_path
        cmd = [
            sys.executable,
            "-m",
            "tinyserve.cli",
            "serve",
            str(model),
            "--port",
            "0",
            "--device",
            "cpu",
            *args,
        ]
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.url = self._wait_ready(timeout_s)

    def _wait_ready(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            match = READY.search(self.log_path.read_text())
            if match:
                return match.group(1)
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.1)
        self.proc.kill()
        raise RuntimeError(f"the server was not ready after {timeout_s}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()[-5000:]

    def stop(self, sig: int = signal.SIGINT, timeout_s: float = 30.0) -> int:
        """Send `sig`, wait for the exit; returns the exit code (kills it after timeout_s)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
