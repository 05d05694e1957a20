"""Issue 7's saturation check: the server's output tok/s against the offline engine's, on the same
workload, model and card.

    python benchmarks/serve_vs_offline.py MODEL [engine flags...] [--num-prompts 256]
        [--input-len-range 100 1024] [--output-len-range 100 1024] [--max-token-id 10000]
        [--engine-core process thread]

Starts `tinyserve serve MODEL <engine flags>` on a free port, runs `tinyserve bench serve
--request-rate inf` (streaming) against it, stops it with SIGTERM, then runs `tinyserve bench
throughput` with the same engine flags and workload, and prints one table. With several
`--engine-core` values the server runs once with each (one offline run serves them all). Engine
flags are passed through unchanged (e.g. --load-format dummy --dtype bfloat16 --tokenizer DIR
--max-model-len 4096).
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def tinyserve(*args: str) -> list[str]:
    return [sys.executable, "-m", "tinyserve.cli", *args]


def start_server(model: str, engine_flags: list[str], log: Path) -> tuple[subprocess.Popen, int]:
    out = log.open("w")
    proc = subprocess.Popen(tinyserve("serve", model, *engine_flags, "--port", "0"), stdout=out, stderr=out)
    ready = re.compile(r"ready on http://[^:]+:(\d+)")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        match = ready.search(log.read_text())
        if match:
            return proc, int(match.group(1))
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited early:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not become ready in 600 s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--num-prompts", default="256")
    ap.add_argument("--input-len-range", nargs=2, default=["100", "1024"])
    ap.add_argument("--output-len-range", nargs=2, default=["100", "1024"])
    ap.add_argument("--max-token-id", default="10000")
    ap.add_argument("--engine-core", nargs="+", default=["process"], choices=["process", "thread"])
    args, engine_flags = ap.parse_known_args()
    workload = [
        "--num-prompts", args.num_prompts,
        "--input-len-range", *args.input_len_range,
        "--output-len-range", *args.output_len_range,
        "--max-token-id", args.max_token_id,
    ]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        served: dict[str, dict] = {}
        for core in args.engine_core:
            flags = [*engine_flags, "--engine-core", core]
            server, port = start_server(args.model, flags, tmp_path / f"server-{core}.log")
            try:
                result = tmp_path / f"serve-{core}.json"
                subprocess.run(
                    tinyserve("bench", "serve", "--port", str(port), *workload, "--request-rate", "inf",
                              "--warmup", "2", "--json", str(result)),
                    check=True,
                )  # fmt: skip
            finally:
                server.send_signal(signal.SIGTERM)
                server.wait(timeout=120)
            served[core] = json.loads(result.read_text())["results"][0]
        offline = tmp_path / "offline.json"
        subprocess.run(
            tinyserve(
                "bench", "throughput", "--model", args.model, *engine_flags, *workload, "--json", str(offline)
            ),
            check=True,
        )
        offline_result = json.loads(offline.read_text())
    offline_tps = offline_result["output_tok_per_s"]
    print(f"\n## Server at saturation vs offline — {offline_result['device_name']}, {args.model}")
    print(f"offline output tok/s: {offline_tps:,.0f}\n")
    print("| engine loop | server output tok/s (streaming, rate inf) | of offline | mean TTFT | mean ITL |")
    print("|---|---|---|---|---|")
    for core, r in served.items():
        tps = r["output_throughput"]
        print(
            f"| {core} | {tps:,.0f} | {tps / offline_tps:.0%} | {r['mean_ttft_ms']:.0f} ms | "
            f"{r['mean_itl_ms']:.1f} ms |"
        )


if __name__ == "__main__":
    main()
