"""Where a first call's time goes: tracing, lowering, and XLA's compiler, pass by pass.

    python benchmarks/profile_compile.py gemma4_26b_a4b                # on a GPU
    python benchmarks/profile_compile.py gemma3_27b_text --unstacked
    python benchmarks/profile_compile.py gemma4_26b_a4b --tiny          # smoke run, CPU

Builds the preset with random bfloat16 weights (stacked unless ``--unstacked``; tiny widths
with ``--tiny``, as `real_size_speed.py` makes them) and times the three steps of its first
forward one by one: JAX tracing the model, lowering it to StableHLO (where Pallas and
Mosaic kernels are lowered too), and XLA compiling it. The compile runs under JAX's
profiler, which records the compiler's own named regions (its pass pipelines, code
generation, the assembler, cuDNN's graph builds, autotuning); the tables list the regions
that took the most time, by their inclusive time (a region's nested regions count in it,
so rows overlap) and by self time (the time in no nested region of the same thread; a
thread waiting for another, as the Python thread waits for the compiler's, counts the wait
as its own).
``--python`` adds the Python functions of tracing and lowering that took the most time
(cumulative, from the same profiler).

The compilation cache is off here (a first call is the question). Writes the rows as JSON
with ``--out``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import profile_forward  # noqa: E402  (beside this script: arguments, models, descriptions)
import real_size_speed  # noqa: E402  (presets at tiny widths, tokens, memory settings)


def region_times(trace_dir: str, python: bool) -> tuple[dict[str, int], dict[str, int]]:
    """``(inclusive, self)`` nanoseconds per named region on the host's threads: the
    compiler's regions, or (``python``) the Python functions the profiler recorded (their
    names start with ``$``). A region's self time leaves out the regions nested in it on
    the same thread, and its name says the thread (``Compile [python]``)."""
    planes = [p for p in profile_forward.read_profile(trace_dir).planes if p.name == "/host:CPU"]
    inclusive: collections.Counter = collections.Counter()
    own: collections.Counter = collections.Counter()
    for plane in planes:
        for line in plane.lines:
            events = sorted(
                (
                    (e.start_ns, e.end_ns, e.name)
                    for e in line.events
                    if e.name.startswith("$") == python
                ),
                key=lambda e: (e[0], -e[1]),
            )
            open_regions: list[list] = []  # [start, end, name, time in nested regions]

            thread = line.name.split("/")[0]

            def close(region: list, thread: str = thread) -> None:
                start, end, name, nested = region
                own[f"{name} [{thread}]"] += max(0, end - start - nested)

            for start, end, name in events:
                while open_regions and open_regions[-1][1] <= start:
                    close(open_regions.pop())
                inclusive[name] += end - start
                if open_regions:
                    open_regions[-1][3] += end - start
                open_regions.append([start, end, name, 0])
            while open_regions:
                close(open_regions.pop())
    return dict(inclusive), dict(own)


def top(times: dict[str, int], limit: int) -> list[dict[str, Any]]:
    rows = sorted(times.items(), key=lambda item: -item[1])[:limit]
    return [{"region": name, "ms": ns / 1e6} for name, ns in rows]


def profile(
    preset: str, batch: int, length: int, stacked: bool, tiny: bool, limit: int, python: bool
) -> dict[str, Any]:
    import jax

    from gemmalens import lens
    from gemmalens.compiling import Distinct

    m = profile_forward.built(preset, stacked, tiny)
    inputs = m._prepare(real_size_speed.tokens(batch, length, m.config.vocab_size), None, {})
    model = Distinct(m._treedef, m._leaves)
    options = jax.profiler.ProfileOptions()
    # Recording every Python call slows tracing and lowering several times over.
    options.python_tracer_level = 1 if python else 0
    with tempfile.TemporaryDirectory(prefix="gemmalens-compile-profile-") as trace_dir:
        with jax.profiler.trace(trace_dir, profiler_options=options):
            started = time.perf_counter()
            traced = lens._run_distinct.trace(m.logits_of, model, inputs)
            traced_at = time.perf_counter()
            lowered = traced.lower()
            lowered_at = time.perf_counter()
            lowered.compile()
            compiled_at = time.perf_counter()
        inclusive, own = region_times(trace_dir, python=False)
        py_inclusive = region_times(trace_dir, python=True)[0] if python else {}
    return {
        **profile_forward.described(preset, batch, length, stacked, tiny),
        "trace_s": traced_at - started,
        "lower_s": lowered_at - traced_at,
        "compile_s": compiled_at - lowered_at,
        "hlo_lines": lowered.as_text().count("\n"),
        "compiler_inclusive": top(inclusive, limit),
        "compiler_self": top(own, limit),
        "python_cumulative": top(py_inclusive, limit),
        "python_tracer": python,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    profile_forward.model_arguments(parser)
    parser.add_argument("--python", action="store_true", help="also the Python functions")
    args = parser.parse_args(argv)
    os.environ["GEMMALENS_COMPILATION_CACHE"] = "off"  # before gemmalens is imported
    real_size_speed.use_memory_settings(ours=True)  # before JAX starts
    batch, length = profile_forward.batch_and_length(args)
    result = profile(
        args.preset, batch, length, not args.unstacked, args.tiny, args.top, args.python
    )
    print(
        f"{result['preset']} {result['shape']} ({'stacked' if result['stacked'] else 'per-layer'}"
        f", {result['device']}): trace {result['trace_s']:.2f} s, lower {result['lower_s']:.2f} s"
        f", compile {result['compile_s']:.2f} s ({result['hlo_lines']} lines of StableHLO)"
        + (" - the Python tracer slows the first two" if args.python else "")
    )
    tables = [("compiler_self", "self"), ("compiler_inclusive", "inclusive")]
    if args.python:
        tables.append(("python_cumulative", "cumulative"))
    for key, kind in tables:
        print(f"\n| {key.replace('_', ' ')} | ms ({kind}) |\n|---|---:|")
        for row in result[key]:
            print(f"| `{row['region'][:100]}` | {row['ms']:.1f} |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
