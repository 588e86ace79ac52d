"""XLA flags side by side: one `real_size_speed.py` case in fresh processes, settings alternated.

    python benchmarks/xla_flags_ab.py --case ours --rounds 2 --out ab.json \\
        --kwargs '{"name": "gemma3_27b_text", "stacked": false, "tiny": false, "captures": false}' \\
        -- "" "--xla_gpu_enable_command_buffer="
    python benchmarks/xla_flags_ab.py --tiny                      # smoke run, CPU

How the compiler options of a real-size run were weighed (docs/benchmarks.md, runs p and
r): the order of processes on one machine moves compile-bound figures by up to half (a
machine's first processes pay more), so a fair comparison runs one untimed warm-up process
first, then the settings in turn, A B A B, each in a process of its own with the
persistent compilation cache off. The settings come last, after ``--`` (XLA's flags start
with dashes too). A setting is a string of XLA flags, appended to the
environment's ``XLA_FLAGS`` (where `gemmalens.compiling` sets the same option for its
programs, its value wins: flags reach what it leaves alone), and may start with
environment assignments for the case's process: ``GEMMALENS_XLA_OPTIONS=xla`` (XLA's
defaults instead of gemmalens' options), ``XLA_PYTHON_CLIENT_ALLOCATOR=cuda_async``.

Prints each figure of the case (``first_call_s``, ``steady_s``, ... flattened to
``1x4096/steady_s``) per setting: every value, the median, and the median's ratio to the
first setting's. ``--out`` keeps the raw rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_size_speed  # noqa: E402  (beside this script: the cases and their processes)

TINY_KWARGS = {"name": "gemma3_27b_text", "stacked": True, "tiny": True, "captures": False}
TINY_FLAGS = ["", "GEMMALENS_XLA_OPTIONS=xla --xla_gpu_dot_merger_threshold_mb=0"]
ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")


def environment(setting: str) -> dict[str, str]:
    """What one setting adds to the case's environment: its leading ``NAME=value`` words
    set variables, the rest are appended to ``XLA_FLAGS``."""
    words = setting.split()
    assignments = []
    while words and ASSIGNMENT.match(words[0]):
        assignments.append(words.pop(0).split("=", 1))
    flags = f"{os.environ.get('XLA_FLAGS', '')} {' '.join(words)}".strip()
    return {**dict(assignments), "XLA_FLAGS": flags}


def flattened(row: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a case's JSON row, nested keys joined by ``/``."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if isinstance(value, dict):
            out.update(flattened(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix + key] = float(value)
    return out


def run_case(case: str, kwargs: dict[str, Any], flags: str, timeout: float) -> dict[str, Any]:
    """One fresh process of a `real_size_speed` case under one setting (`environment`),
    the compilation cache off: its figures, or ``{"error": ...}``."""
    env = {**environment(flags), "GEMMALENS_COMPILATION_CACHE": "off"}
    (row,) = real_size_speed.in_one_process([(case, kwargs)], env, timeout)
    return row


def compare(
    case: str,
    kwargs: dict[str, Any],
    settings: list[str],
    rounds: int,
    timeout: float,
    warmup: bool = True,
    log: Any = print,
) -> dict[str, Any]:
    """``rounds`` processes per setting, the settings alternated, after one untimed
    warm-up process (the first setting) unless ``warmup`` is off."""
    if warmup:
        run_case(case, kwargs, settings[0], timeout)
    runs: dict[str, list[dict[str, Any]]] = {flags: [] for flags in settings}
    for round_ in range(rounds):
        for flags in settings:
            row = run_case(case, kwargs, flags, timeout)
            runs[flags].append(row)
            log(f"round {round_ + 1}, [{flags}]: {json.dumps(row)[:300]}")
    return {"case": case, "kwargs": kwargs, "settings": settings, "runs": runs}


def table(result: dict[str, Any]) -> str:
    settings = result["settings"]
    figures: dict[str, dict[str, list[float]]] = {flags: {} for flags in settings}
    for flags in settings:
        for row in result["runs"][flags]:
            for key, value in flattened(row).items():
                figures[flags].setdefault(key, []).append(value)
    keys = sorted({key for per in figures.values() for key in per} - {"process_s"})
    lines = [
        "| figure | setting | values | median | ratio to the first setting |",
        "|---|---|---|---:|---:|",
    ]
    for key in keys:
        baseline = figures[settings[0]].get(key)
        for flags in settings:
            values = figures[flags].get(key)
            if not values:
                lines.append(f"| {key} | `{flags or 'nothing added'}` | failed | | |")
                continue
            median = statistics.median(values)
            ratio = median / statistics.median(baseline) if baseline else float("nan")
            shown = ", ".join(f"{v:.4g}" for v in values)
            lines.append(
                f"| {key} | `{flags or 'nothing added'}` | {shown} | {median:.4g} | {ratio:.3f} |"
            )
    errors = [
        f"[{flags}] {row['error'][-500:]}"
        for flags in settings
        for row in result["runs"][flags]
        if "error" in row
    ]
    return "\n".join(lines + (["", "Failed runs:", *errors] if errors else []))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="ours", help="a real_size_speed.py case (ours)")
    parser.add_argument("--kwargs", help="the case's keyword arguments, as JSON")
    parser.add_argument(
        "settings",
        nargs="*",
        help='after --: XLA flags, after optional NAME=value words ("": nothing added)',
    )
    parser.add_argument("--rounds", type=int, default=2, help="processes per setting")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per process")
    parser.add_argument("--no-warmup", action="store_true", help="skip the warm-up process")
    parser.add_argument("--tiny", action="store_true", help="tiny widths on CPU (smoke run)")
    parser.add_argument("--out", type=Path, help="write the raw rows as JSON here")
    args = parser.parse_args(argv)
    if args.tiny:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    kwargs = json.loads(args.kwargs) if args.kwargs else TINY_KWARGS if args.tiny else None
    if kwargs is None:
        parser.error("--kwargs is needed (the case's arguments), except with --tiny")
    settings = args.settings or (TINY_FLAGS if args.tiny else None)
    if not settings or len(settings) < 2:
        parser.error('give two settings or more after -- ("": nothing added)')
    rounds = 1 if args.tiny else args.rounds
    warmup = not (args.no_warmup or args.tiny)
    result = compare(args.case, kwargs, settings, rounds, args.timeout, warmup)
    print(table(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    failed = [row for rows in result["runs"].values() for row in rows if "error" in row]
    if args.tiny and failed:
        raise SystemExit("a smoke run failed: see the table")
    return result


if __name__ == "__main__":
    main()
