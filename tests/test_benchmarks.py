"""Every script in ``benchmarks/`` runs in its ``--tiny`` mode on the CPU and prints its table.

Only that they run: the figures of a tiny configuration mean nothing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests import background

# Helpers the scripts share start with an underscore (benchmarks/_timing.py).
BENCHMARKS = sorted(
    path
    for path in (Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py")
    if not path.stem.startswith("_")
)
TABLE_RULE = re.compile(r"^\|(\s*:?-+:?\s*\|)+\s*$", re.MULTILINE)


def test_there_are_benchmarks():
    assert BENCHMARKS


# cpu_first_call has a test of its own below, and real_size_agreement one in
# tests/test_real_size_agreement_smoke.py: each also checks what its script writes.
TINY = [path for path in BENCHMARKS if path.stem not in ("cpu_first_call", "real_size_agreement")]


CPU_ONLY = {"JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": ""}
# Each script runs in its own process, beside the rest of the suite (`tests.background`).
BACKGROUND = {
    **{
        path.stem: background.Job(
            (str(path), "--tiny"), CPU_ONLY, needed_by=(f"test_benchmark_runs_tiny[{path.stem}]",)
        )
        for path in TINY
    },
    "profile_forward_generate": background.Job(
        (
            str(BENCHMARKS[0].parent / "profile_forward.py"),
            "gemma3_1b",
            "--tiny",
            "--unstacked",
            "--shape",
            "2x8",
            "--generate",
            "4",
            "--repeats",
            "2",
            "--out",
            "{out}/profile.json",
        ),
        CPU_ONLY,
        needed_by=("test_profile_of_generation",),
    ),
    "real_size_alternate": background.Job(
        (
            str(BENCHMARKS[0].parent / "real_size_speed.py"),
            "--tiny",
            "--alternate",
            "2",
            "--models",
            "gemma3_27b_text",
            "--out",
            "{out}/alternate.json",
        ),
        CPU_ONLY,
        needed_by=("test_real_size_alternate",),
    ),
    "cpu_first_call": background.Job(
        (
            str(BENCHMARKS[0].parent / "cpu_first_call.py"),
            "--smoke",
            "--out",
            "{out}/first_call.json",
        ),
        CPU_ONLY,
        timeout=300,
        needed_by=("test_cpu_first_call_smoke",),
    ),
}


@pytest.mark.parametrize("script", TINY, ids=[path.stem for path in TINY])
def test_benchmark_runs_tiny(script):
    run = background.result(script.stem, BACKGROUND[script.stem])
    assert run.returncode == 0, f"{script.name} --tiny failed:\n{run.stderr[-4000:]}"
    assert TABLE_RULE.search(run.stdout), f"{script.name} printed no table:\n{run.stdout[-2000:]}"


def test_cpu_first_call_smoke():
    """The CPU first-call benchmark's quick mode: fresh processes for gemmalens (cache cold,
    then warm) and transformers, which load the same checkpoint and agree on its logits."""
    run = background.result("cpu_first_call", BACKGROUND["cpu_first_call"])
    assert run.returncode == 0, run.stderr[-4000:]
    assert TABLE_RULE.search(run.stdout), run.stdout[-2000:]
    results = json.loads((run.out / "first_call.json").read_text())
    (entry,) = results["models"].values()
    for kind in ("cold", "warm", "transformers"):
        assert "error" not in entry[kind], entry[kind]
        assert entry[kind]["forward_1"] > 0 and entry[kind]["to_first_logits_s"] > 0
    assert entry["cold"]["hooks"] > entry["cold"]["resid_hooks"] > 0
    assert entry["max_abs_diff_last_logits"] < 1e-3
    assert results["versions"]["cpus"] >= 1


def test_real_size_alternate():
    """``real_size_speed.py --alternate``: per-layer and transformers processes take turns;
    the means and the speed-up are computed from the figures of each process."""
    run = background.result("real_size_alternate", BACKGROUND["real_size_alternate"])
    assert run.returncode == 0, run.stderr[-4000:]
    assert TABLE_RULE.search(run.stdout), run.stdout[-2000:]
    rows = json.loads((run.out / "alternate.json").read_text())["alternate"]["gemma3_27b_text"]
    assert len(rows["per_layer"]) == len(rows["transformers"]) == 2
    (shape,) = rows["means"]["per_layer"]
    ours = [run[shape]["steady_s"] for run in rows["per_layer"]]
    theirs = [run[shape]["steady_s"] for run in rows["transformers"]]
    assert rows["means"]["per_layer"][shape] == pytest.approx(sum(ours) / 2)
    assert rows["means"]["per_layer_speed_up"][shape] == pytest.approx(sum(theirs) / sum(ours))
    assert rows["transformers"][0]["device"] == "cpu"


def test_profile_of_generation():
    """``profile_forward.py --generate``: each profiled call is a generation of that many
    new tokens, and the summary gives the time and the kernel launches per step."""
    run = background.result("profile_forward_generate", BACKGROUND["profile_forward_generate"])
    assert run.returncode == 0, run.stderr[-4000:]
    assert "kernel launches a step" in run.stdout and TABLE_RULE.search(run.stdout)
    result = json.loads((run.out / "profile.json").read_text())
    assert result["new_tokens"] == 4 and result["shape"] == "2x8" and not result["stacked"]
    assert result["wall_ms_per_step"] * 4 == pytest.approx(result["wall_ms_per_call"])
    assert result["launches_per_step"] > 0 and result["kernels"]
