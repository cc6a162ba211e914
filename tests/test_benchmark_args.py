"""The benchmark scripts answer bad arguments like the command-line tools: exit code 2 and one
line naming the argument, before anything is built (no traceback, no half-run benchmark)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_longact.errors import at_least

ROOT = Path(__file__).resolve().parent.parent

CASES = [
    ("optimizer_overhead.py", ["--cases", "small,bogus"], "--cases: unknown case 'bogus'"),
    ("optimizer_overhead.py", ["--iters", "0"], "argument --iters: got 0, expected an integer >= 1"),
    ("step_overhead.py", ["rl.top_k=-3"], "rl.top_k: got -3, expected a number >= 0"),
    ("vs_trl.py", ["--warmup", "-1"], "argument --warmup: got -1, expected an integer >= 0"),
    ("generation.py", ["--new-tokens", "6,x"], "--new-tokens: got 'x', expected an integer >= 1"),
    ("gpu_profile.py", ["--parts", "optimizer,bogus"], "--parts: got 'optimizer,bogus'"),
]


@pytest.mark.parametrize("script,argv,expected", CASES, ids=[f"{c[0]} {' '.join(c[1])}" for c in CASES])
def test_bad_benchmark_arguments_exit_2_with_one_line(script, argv, expected, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *argv], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert expected in lines[-1], lines[-1]
    assert proc.stdout == ""  # nothing was measured


def test_at_least_parses_integers_and_names_the_bound():
    assert at_least(1)("3") == 3 and at_least(0)("0") == 0
    for text, bound in (("0", 1), ("-2", 0), ("1.5", 1), ("x", 1)):
        with pytest.raises(argparse.ArgumentTypeError, match=f"expected an integer >= {bound}"):
            at_least(bound)(text)
