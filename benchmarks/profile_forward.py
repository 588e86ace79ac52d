"""Where a forward pass spends its time: the device's kernels over a few steady calls.

    python benchmarks/profile_forward.py gemma4_26b_a4b --shape 1x4096   # on a GPU
    python benchmarks/profile_forward.py gemma3_27b_text --unstacked
    python benchmarks/profile_forward.py gemma3_1b --unstacked --shape 8x128 --generate 64
    python benchmarks/profile_forward.py gemma4_26b_a4b --tiny           # smoke run, CPU

With ``--generate NEW`` each profiled call is ``Model.generate`` (greedy, ``NEW`` new tokens,
never stopping at EOS) on prompts of ``--shape``'s batch x length, instead of a forward:
the rows are then per call of NEW decode steps plus the prompt, and the summary adds the
time and the kernel launches per step.

Builds the preset with random bfloat16 weights (stacked unless ``--unstacked``; tiny widths
with ``--tiny``, as `real_size_speed.py` makes them), makes one call to compile,
then records ``--repeats`` calls with JAX's profiler and sums the time of each kernel the
device ran. Prints the kernels that took the most time: the name the device reports (a
cuBLAS GEMM, a Triton or Mosaic kernel, an XLA fusion) and the operation of the program
that launched it (its HLO name and JAX's name for it, where the profile records them;
``--hlo`` writes the optimised program, to look the HLO names up).

Each row gives milliseconds per call and the share of the summed kernel time. Off the GPU
the host's XLA threads are summed instead, which says less (they overlap). Writes the
rows as JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_size_speed  # noqa: E402  (beside this script: presets at tiny widths, tokens)


def read_profile(trace_dir: str) -> Any:
    """The profile JAX's profiler wrote under ``trace_dir`` (`jax.profiler.ProfileData`)."""
    from jax.profiler import ProfileData

    (path,) = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
    return ProfileData.from_file(path)


def kernel_times(
    trace_dir: str,
) -> tuple[dict[str, int], dict[str, str], str, dict[str, int]]:
    """``({kernel: ns}, {kernel: operation}, where, {kernel: launches})``: each kernel's
    time summed over a profile's device lines (the host's XLA threads when no device plane
    was recorded), the program operation that launched it, and how often it ran; ``where``
    also names the statistics the events carried."""
    profile = read_profile(trace_dir)
    planes = [p for p in profile.planes if p.name.startswith("/device:")]
    where = "device"
    if not planes:
        planes = [p for p in profile.planes if p.name == "/host:CPU"]
        where = "host XLA threads"
    by_kernel: collections.Counter = collections.Counter()
    launches: collections.Counter = collections.Counter()
    operation_of: dict[str, str] = {}
    stat_names: set[str] = set()
    for plane in planes:
        for line in plane.lines:
            # A GPU plane lists each kernel on its stream's line and again on summary
            # lines ("XLA Ops", "XLA Modules", ...): the streams alone count each once.
            if where == "device" and not line.name.startswith("Stream"):
                continue
            if where != "device" and "XLA" not in line.name:
                continue
            for event in line.events:
                by_kernel[event.name] += int(event.duration_ns)
                launches[event.name] += 1
                stats = dict(event.stats)
                stat_names.update(stats)
                if event.name not in operation_of:
                    parts = (stats.get("hlo_op"), stats.get("tf_op"))
                    operation_of[event.name] = " ".join(str(p) for p in parts if p)
    return dict(by_kernel), operation_of, f"{where}; stats: {sorted(stat_names)}", launches


def device_timeline(trace_dir: str, calls: int, limit: int = 8) -> dict[str, Any] | None:
    """Where the device sat idle inside the ``calls`` profiled calls: the time from a call's
    first kernel to its last, the time kernels covered (overlaps merged), and the largest
    gaps between one kernel's end and the next one's start, with the kernels on either
    side. The ``calls - 1`` largest gaps are taken to be those between calls (the host
    waiting for the result, then dispatching the next call) and left out. None without a
    device plane or kernels on it (the CPU)."""
    planes = [p for p in read_profile(trace_dir).planes if p.name.startswith("/device:")]
    if not planes:
        return None
    kernels = sorted(
        (event.start_ns, event.end_ns, event.name)
        for line in planes[0].lines
        if line.name.startswith("Stream")
        for event in line.events
    )
    if not kernels:
        return None
    busy, gaps = 0, []
    reached, before = kernels[0][0], kernels[0][2]
    for start, end, name in kernels:
        if start > reached:
            gaps.append((start - reached, before, name))
        busy += max(0, end - max(start, reached))
        if end > reached:
            reached, before = end, name
    gaps.sort(reverse=True)
    between, inside = gaps[: calls - 1], gaps[calls - 1 :]
    span = reached - kernels[0][0] - sum(gap for gap, _, _ in between)
    return {
        "span_ms_per_call": span / calls / 1e6,
        "busy_ms_per_call": busy / calls / 1e6,
        "idle_ms_per_call": (span - busy) / calls / 1e6,
        "gaps_per_call": len(inside) / calls,
        "between_calls_ms": [gap / 1e6 for gap, _, _ in between],
        "largest_gaps": [
            {"us": ns / 1e3, "after": after, "before": following}
            for ns, after, following in inside[:limit]
        ],
    }


def top(
    times: dict[str, int],
    operation_of: dict[str, str],
    calls: int,
    limit: int,
    launches: dict[str, int],
) -> list[dict[str, Any]]:
    total = sum(times.values()) or 1
    rows = sorted(times.items(), key=lambda item: -item[1])[:limit]
    return [
        {
            "kernel": name,
            "operation": operation_of.get(name, ""),
            "ms_per_call": ns / calls / 1e6,
            "share": ns / total,
            "launches_per_call": launches[name] / calls,
        }
        for name, ns in rows
    ]


PRESETS = sorted(real_size_speed.REAL) + ["gemma3_1b", "gemma3_4b_text"]


def model_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments this script and `profile_compile.py` share: the model, its form, the
    tokens' shape, the table's length and the JSON file."""
    parser.add_argument("preset", nargs="?", default="gemma4_26b_a4b", choices=PRESETS)
    parser.add_argument("--shape", help="batch x length (1x4096; --tiny: 1x64)")
    parser.add_argument("--unstacked", action="store_true", help="per-layer parameters")
    parser.add_argument("--tiny", action="store_true", help="tiny widths on CPU (smoke run)")
    parser.add_argument("--top", type=int, default=25, help="rows per table")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")


def batch_and_length(args: argparse.Namespace) -> tuple[int, int]:
    shape = args.shape or ("1x64" if args.tiny else "1x4096")
    batch, length = (int(n) for n in shape.lower().split("x"))
    return batch, length


def built(preset: str, stacked: bool, tiny: bool) -> Any:
    """The preset with random weights (bfloat16; float32 at tiny widths), on the device."""
    import jax
    import jax.numpy as jnp

    import gemmalens as gl

    config = real_size_speed.config_for(preset, tiny)
    m = gl.build(config, dtype=jnp.float32 if tiny else jnp.bfloat16, stack_layers=stacked)
    jax.block_until_ready(m.model)
    return m


def described(preset: str, batch: int, length: int, stacked: bool, tiny: bool) -> dict:
    """What was measured, for the JSON: the model, the shape, the form and the device."""
    import jax

    return {
        "preset": preset,
        "shape": f"{batch}x{length}",
        "stacked": stacked,
        "tiny": tiny,
        "device": jax.devices()[0].device_kind,
    }


def profile(
    preset: str,
    batch: int,
    length: int,
    stacked: bool,
    tiny: bool,
    repeats: int,
    limit: int,
    hlo: Path | None = None,
    new_tokens: int = 0,
) -> dict[str, Any]:
    import jax

    from gemmalens import lens
    from gemmalens.compiling import Distinct

    m = built(preset, stacked, tiny)
    ids = real_size_speed.tokens(batch, length, m.config.vocab_size)

    def call() -> Any:
        if new_tokens:
            return m.generate(ids, max_new_tokens=new_tokens, stop_at_eos=False).tokens
        return m(ids)

    jax.block_until_ready(call())
    started = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(call())
    wall = (time.perf_counter() - started) / repeats
    dispatch = []  # host time until the call returns, its kernels queued or running
    for _ in range(repeats):
        started = time.perf_counter()
        result = call()
        dispatch.append(time.perf_counter() - started)
        jax.block_until_ready(result)
    with tempfile.TemporaryDirectory(prefix="gemmalens-profile-") as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(repeats):
                jax.block_until_ready(call())
        by_kernel, operation_of, where, launches = kernel_times(trace_dir)
        timeline = device_timeline(trace_dir, repeats)
    if hlo:  # the program as XLA optimised it: what each kernel's operation is
        inputs = m._prepare(ids, None, {})
        model = Distinct(m._treedef, m._leaves)
        lowered = lens._run_distinct.lower(m.logits_of, model, inputs)
        hlo.write_text(lowered.compile().as_text())
    per_step = {}
    if new_tokens:
        per_step = {
            "new_tokens": new_tokens,
            "wall_ms_per_step": wall * 1e3 / new_tokens,
            "launches_per_step": sum(launches.values()) / repeats / new_tokens,
        }
    return {
        **described(preset, batch, length, stacked, tiny),
        **per_step,
        "wall_ms_per_call": wall * 1e3,
        "summed_ms_per_call": sum(by_kernel.values()) / repeats / 1e6,
        "summed_over": where,
        "dispatch_ms": min(dispatch) * 1e3,
        "timeline": timeline,
        "kernels": top(by_kernel, operation_of, repeats, limit, launches),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hlo", type=Path, help="write the optimised program (HLO) here")
    parser.add_argument(
        "--generate",
        type=int,
        default=0,
        metavar="NEW",
        help="profile Model.generate with NEW new tokens (greedy) instead of a forward",
    )
    args = parser.parse_args(argv)
    if args.generate and args.hlo:
        parser.error("--hlo writes the forward's program; leave it out with --generate")
    if args.generate < 0:
        parser.error(f"--generate takes a number of new tokens, not {args.generate}")
    real_size_speed.use_memory_settings(ours=True)  # before JAX starts
    batch, length = batch_and_length(args)
    result = profile(
        args.preset,
        batch,
        length,
        not args.unstacked,
        args.tiny,
        args.repeats,
        args.top,
        args.hlo,
        args.generate,
    )
    print(
        f"{result['preset']} {result['shape']} ({'stacked' if result['stacked'] else 'per-layer'}"
        f", {result['device']}): {result['wall_ms_per_call']:.2f} ms a call, kernels "
        f"{result['summed_ms_per_call']:.2f} ms ({result['summed_over']})"
    )
    print(f"host dispatch (until the call returns): {result['dispatch_ms']:.2f} ms")
    if args.generate:
        print(
            f"generate, {args.generate} new tokens a call: {result['wall_ms_per_step']:.3f} ms "
            f"and {result['launches_per_step']:.0f} kernel launches a step (prompt included)"
        )
    timeline = result["timeline"]
    if timeline:
        print(
            f"device, per call: span {timeline['span_ms_per_call']:.2f} ms, kernels busy "
            f"{timeline['busy_ms_per_call']:.2f} ms, idle {timeline['idle_ms_per_call']:.2f} ms "
            f"in {timeline['gaps_per_call']:.0f} gaps; largest:"
        )
        for gap in timeline["largest_gaps"]:
            print(f"  {gap['us']:.0f} us between {gap['after'][:50]} and {gap['before'][:50]}")
    print(
        "\n| kernel | operation | ms a call | launches a call | share |\n|---|---|---:|---:|---:|"
    )
    for row in result["kernels"]:
        print(
            f"| `{row['kernel'][:60]}` | `{row['operation'][:90]}` | "
            f"{row['ms_per_call']:.3f} | {row['launches_per_call']:.0f} | {row['share']:.1%} |"
        )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
