"""The fragmentation demo prints the issue's line formats and allocates E from the scattered holes."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tinyserve.kv_cache import demo

ALLOCATING = re.compile(r"^Allocating sequence ([A-Z]) \(needs (\d+) blocks\)$")
ALLOCATED = re.compile(r"^User ([A-Z]) successfully allocated blocks: \[(\d+(?:, \d+)*)\]$")


def check_output(text: str) -> None:
    lines = text.splitlines()
    assert lines[-5:-2] == ["Free Blocks: 2", "Freeing users A and C", "Free Blocks: 6"]
    allocated: dict[str, list[int]] = {}
    for line in lines:
        if line.startswith("Free"):
            continue
        match = ALLOCATING.match(line) or ALLOCATED.match(line)
        assert match, f"unexpected line {line!r}"
        if match.re is ALLOCATED:
            allocated[match[1]] = [int(b) for b in match[2].split(", ")]
    assert lines[-2] == "Allocating sequence E (needs 5 blocks)"
    assert ALLOCATED.match(lines[-1])
    e = allocated["E"]
    assert len(e) == len(set(e)) == 5
    assert set(e) <= set(range(demo.NUM_BLOCKS)) - set(allocated["B"]) - set(allocated["D"])
    assert set(allocated["A"]) | set(allocated["C"]) <= set(e)  # the holes were reused
    assert sorted(e) != list(range(min(e), min(e) + 5)), "E's blocks should be scattered, not one run"


def test_demo_output_shape(capsys: pytest.CaptureFixture[str]) -> None:
    demo.main()
    check_output(capsys.readouterr().out)


def test_demo_runs_as_a_module() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tinyserve.kv_cache.demo"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    check_output(result.stdout)
