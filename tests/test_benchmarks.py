"""Every script in ``benchmarks/`` runs in its ``--tiny`` mode on the CPU and prints its table.

Only that they run: the figures of a tiny configuration mean nothing.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))
TABLE_RULE = re.compile(r"^\|(\s*:?-+:?\s*\|)+\s*$", re.MULTILINE)


def test_there_are_benchmarks():
    assert BENCHMARKS


@pytest.mark.parametrize("script", BENCHMARKS, ids=[path.stem for path in BENCHMARKS])
def test_benchmark_runs_tiny(script):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run(
        [sys.executable, str(script), "--tiny"],
        capture_output=True,
        text=True,
        env=env,
        cwd=script.parents[1],
        timeout=900,
    )
    assert run.returncode == 0, f"{script.name} --tiny failed:\n{run.stderr[-4000:]}"
    assert TABLE_RULE.search(run.stdout), f"{script.name} printed no table:\n{run.stdout[-2000:]}"
