"""Greedy decoding under four sets of compiler options, side by side in one process.

    python benchmarks/decode_options.py                      # Gemma 3 1B preset, on a GPU
    python benchmarks/decode_options.py --cases 8x2048       # other batch x prompt cases
    python benchmarks/decode_options.py --tiny               # a smoke run on CPU

Generation programs compile with `gemmalens.compiling.DECODING_OPTIONS` (XLA's Triton
GEMMs and Triton norm fusions on). This script measures why: it builds a preset with random
bfloat16 weights and times `Model.generate` (greedy, ``--new`` tokens, never stopping at
EOS) with generation compiled under each set in turn, for ``--rounds`` rounds, so that
drift within the process shows:

* the forward's short-program options (`XLA_OPTIONS` + `SHORT_OPTIONS`: cuBLAS for every
  product, no Triton norm fusions), what generation compiled with before;
* Triton GEMMs on, norms off;
* Triton norms on, GEMMs off;
* both on: `DECODING_OPTIONS`.

Each figure is new tokens/s, the median of ``--repeats`` calls after a first one (which
compiles; its time is reported too). Prints a Markdown table; ``--out`` writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gemmalens as gl  # noqa: E402
from gemmalens import compiling  # noqa: E402


def variants() -> dict[str, dict]:
    """The option sets compared, by name (empty under ``GEMMALENS_XLA_OPTIONS=xla``)."""
    forward = {**compiling.XLA_OPTIONS, **compiling.SHORT_OPTIONS}
    triton_gemms = {k: v for k, v in forward.items() if k != "xla_gpu_enable_triton_gemm"}
    triton_norms = dict(compiling.XLA_OPTIONS)
    return {
        "forward's short-program options (before)": forward,
        "Triton GEMMs on": triton_gemms,
        "Triton norms on": triton_norms,
        "both on (DECODING_OPTIONS)": dict(compiling.DECODING_OPTIONS),
    }


def measure(m: gl.Model, prompt: np.ndarray, new: int, repeats: int) -> dict:
    def run():
        return jax.block_until_ready(
            m.generate(prompt, max_new_tokens=new, stop_at_eos=False).tokens
        )

    started = time.perf_counter()
    run()
    first = time.perf_counter() - started
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return {"tok_s": prompt.shape[0] * new / statistics.median(times), "first_call_s": first}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the teaching model on CPU (smoke)")
    parser.add_argument("--preset", default="gemma3_1b", help="a gl.presets() name")
    parser.add_argument("--cases", default="1x128,8x128", help="BATCHxPROMPT,...")
    parser.add_argument("--new", type=int, default=256, help="new tokens per row")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.tiny:
        m = gl.teaching_model("gemma3")
        cases, new, rounds, repeats = [(1, 8)], 4, 1, 1
    else:
        m = gl.build(gl.preset(args.preset), dtype=jnp.bfloat16)
        cases = [tuple(int(n) for n in c.split("x")) for c in args.cases.split(",")]
        new, rounds, repeats = args.new, args.rounds, args.repeats

    rng = np.random.default_rng(0)
    prompts = {case: rng.integers(3, 1000, case, dtype=np.int32) for case in cases}
    original = compiling.DECODING_OPTIONS
    results: dict[str, list] = {}
    try:
        for _ in range(rounds):
            for case, prompt in prompts.items():
                for name, options in variants().items():
                    compiling.DECODING_OPTIONS = options
                    key = f"{case[0]}x{case[1]} | {name}"
                    results.setdefault(key, []).append(measure(m, prompt, new, repeats))
    finally:
        compiling.DECODING_OPTIONS = original

    rows = ["| batch x prompt | options | new tokens/s | first call |", "|---|---|---:|---:|"]
    for key, runs in results.items():
        case, name = key.split(" | ")
        rate = ", ".join(f"{r['tok_s']:,.0f}" for r in runs)
        first = ", ".join(f"{r['first_call_s']:.1f} s" for r in runs)
        rows.append(f"| {case} | {name} | {rate} | {first} |")
    print("\n".join(rows))
    out = {
        "device": str(jax.devices()[0].device_kind),
        "preset": "teaching gemma3" if args.tiny else args.preset,
        "new_tokens": new,
        "results": results,
    }
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
