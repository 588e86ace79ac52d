"""Models on a mesh (gemmalens.sharding) beside the same model on one device, in one run.

    python benchmarks/sharded.py                  # every device found; real presets
    python benchmarks/sharded.py --tiny           # tiny configs on 4 simulated CPU devices

On the devices it finds, for each case the model is built with random weights twice: on one
device without a mesh ("one device"), and over a ``(data=1, model=N)`` mesh of all N devices
("mesh"; ``--data D`` and ``--seq S`` make it ``(data=D, seq=S, model=N / (D x S))``: the
sweep's sites split over ``data``, every prompt along its tokens over ``seq``). Measured
for each: the first call (compiling included) and the steady time of

* a forward pass of 1 x ``--tokens`` tokens (tokens/s),
* `run_with_cache` of every attention pattern at 1 x ``--pattern-tokens``,
* a ``resid_pre`` patching sweep over the first ``--sweep-tokens`` tokens,

with each device's peak memory where the platform reports it (GPUs do; the CPU does not),
and the mesh's scaling efficiency: mesh tokens/s / (N x one-device tokens/s). Cases:

* Gemma 3 27B: float32 over the mesh beside bfloat16 on one device (float32 27B does not
  fit on one 80 GB device); with one device found, bfloat16 on a one-device mesh beside the
  plain model: the overhead of the sharded path itself;
* Gemma 4 26B-A4B: experts split over the mesh (expert parallelism) beside one device.

Prints a Markdown table and writes the figures as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path


def _args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny configs, simulated CPU devices")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--pattern-tokens", type=int, default=8192)
    parser.add_argument("--sweep-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data", type=int, default=1, help="the mesh's data axis (sites)")
    parser.add_argument("--seq", type=int, default=1, help="the mesh's seq axis (tokens)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    parser.add_argument(
        "--presets",
        default=None,
        help="comma-separated cases (default: gemma3_27b_text,gemma4_26b_a4b; with --tiny "
        "only the first: the smoke run checks the path both cases share)",
    )
    args = parser.parse_args(argv)
    if args.presets is None:
        args.presets = "gemma3_27b_text" if args.tiny else "gemma3_27b_text,gemma4_26b_a4b"
    if args.tiny:
        args.tokens, args.pattern_tokens, args.sweep_tokens, args.repeats = 16, 16, 8, 1

    return args


ARGS = _args()
if ARGS.tiny:  # must be set before JAX starts
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gemmalens as gl  # noqa: E402
from gemmalens import patching  # noqa: E402


def _timed(fn, repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def _peak_gib(devices):
    peaks = []
    for device in devices:
        stats = device.memory_stats() or {}
        if "peak_bytes_in_use" not in stats:
            return None
        peaks.append(stats["peak_bytes_in_use"] / 2**30)
    return max(peaks)


def _measure(m, devices, args):
    rs = np.random.RandomState(0)
    vocab = m.config.vocab_size
    out = {}
    tokens = rs.randint(3, vocab, (1, args.tokens))
    first, steady = _timed(lambda: m(tokens), args.repeats)
    out["forward"] = dict(first_s=first, steady_s=steady, tokens_per_s=args.tokens / steady)
    pattern_tokens = rs.randint(3, vocab, (1, args.pattern_tokens))
    first, steady = _timed(
        lambda: m.run_with_cache(pattern_tokens, "blocks.*.attn.hook_pattern")[0], args.repeats
    )
    out["patterns"] = dict(first_s=first, steady_s=steady)
    clean = rs.randint(3, vocab, (1, args.sweep_tokens))
    corrupted = clean.copy()
    corrupted[0, -2] = (corrupted[0, -2] + 1) % vocab

    def metric(logits):
        return logits[0, -1, 5] - logits[0, -1, 7]

    first, steady = _timed(
        lambda: patching.sweep(m, clean, corrupted, metric, site="resid_pre"), args.repeats
    )
    out["sweep"] = dict(first_s=first, steady_s=steady)
    out["peak_gib_per_device"] = _peak_gib(devices)
    return out


def _tiny(name):
    """A small config of each case's family (a few layers, real layer patterns)."""
    config = gl.preset(name)
    import dataclasses

    if config.family == "gemma3":
        return dataclasses.replace(
            config, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=512,
            layer_types=config.layer_types[:3],
        )  # fmt: skip
    return dataclasses.replace(
        config, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, num_global_key_value_heads=2,
        head_dim=32, global_head_dim=32, vocab_size=512, num_experts=8, top_k_experts=2,
        moe_intermediate_size=64, layer_types=config.layer_types[:3],
    )  # fmt: skip


def main():
    args = ARGS
    devices = jax.devices()
    n = len(devices)
    mesh = gl.sharding.make_mesh(data=args.data, seq=args.seq)  # model: the rest
    cases = [
        ("gemma3_27b_text", "float32" if n > 1 else "bfloat16", "bfloat16"),
        ("gemma4_26b_a4b", "bfloat16", "bfloat16"),
    ]
    cases = [case for case in cases if case[0] in args.presets.split(",")]
    results = dict(
        devices=[str(d) for d in devices],
        platform=platform.platform(),
        jax=jax.__version__,
        tiny=args.tiny,
        mesh=dict(mesh.shape),
        tokens=args.tokens,
        pattern_tokens=args.pattern_tokens,
        sweep_tokens=args.sweep_tokens,
        cases=[],
    )
    for name, mesh_dtype, one_dtype in cases:
        config = _tiny(name) if args.tiny else gl.preset(name)
        case = dict(preset=name, mesh_dtype=mesh_dtype, one_device_dtype=one_dtype)
        one = gl.build(config, dtype=one_dtype)
        case["one_device"] = _measure(one, devices[:1], args)
        del one
        jax.clear_caches()
        gc.collect()  # the one-device weights must be gone before the mesh copy is made
        sharded = gl.build(config, dtype=mesh_dtype, mesh=mesh)
        case["rules"] = sharded.sharding_rules
        case["mesh"] = _measure(sharded, devices, args)
        del sharded
        jax.clear_caches()
        ratio = (
            case["mesh"]["forward"]["tokens_per_s"] / case["one_device"]["forward"]["tokens_per_s"]
        )
        case["mesh_over_one_device"] = ratio
        case["scaling_efficiency"] = ratio / n
        results["cases"].append(case)

    print(f"{n} device(s): {results['devices'][0]} ...\n")
    print("| case | where | dtype | forward first call | forward steady | tokens/s "
          "| every pattern steady | sweep first / steady | peak GiB/device |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for case in results["cases"]:
        for where, dtype in (
            ("one_device", case["one_device_dtype"]),
            ("mesh", case["mesh_dtype"]),
        ):
            r = case[where]
            peak = r["peak_gib_per_device"]
            print(
                f"| {case['preset']} | {where.replace('_', ' ')} ({1 if where == 'one_device' else n}) "
                f"| {dtype} | {r['forward']['first_s']:.2f} s | {r['forward']['steady_s'] * 1e3:.1f} ms "
                f"| {r['forward']['tokens_per_s']:,.0f} | {r['patterns']['steady_s'] * 1e3:.1f} ms "
                f"| {r['sweep']['first_s']:.2f} s / {r['sweep']['steady_s'] * 1e3:.1f} ms "
                f"| {'n/a' if peak is None else f'{peak:.1f}'} |"
            )
    print()
    for case in results["cases"]:
        print(
            f"{case['preset']}: mesh / one device = {case['mesh_over_one_device']:.2f}x, "
            f"scaling efficiency {case['scaling_efficiency']:.0%}"
        )
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2, default=str))
        print(f"Figures written to {args.out}")


if __name__ == "__main__":
    main()
