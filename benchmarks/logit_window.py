"""Patching sweeps that compute the metric's logit positions only, against every position.

    python benchmarks/logit_window.py                 # four real presets, 1 x 16, a GPU
    python benchmarks/logit_window.py --tiny          # smoke run, CPU

A ``resid_pre`` sweep (``encoder.resid_pre`` for T5Gemma 2) through the general
(``vmap``-ed) program, whose metric reads the last position: with ``logit_positions="auto"``
(the final norm and the unembedding at that position only) and ``"all"`` (every position,
the program before 2026-12-07). Random bfloat16 weights (`gl.build`), one token of the
prompt corrupted. For each: the largest difference between the two sweeps beside the sweep's
range, the first call and one steady call of each (the "auto" sweep runs first, so its
first call also compiles the clean run's capture, which the "all" sweep then reuses), and
whether attribution patching (which takes the same window) is finite. Prints a Markdown
table; writes JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import median_seconds  # noqa: E402

PRESETS = {
    "gemma3n_e2b": "resid_pre",
    "gemma4_e2b": "resid_pre",
    "t5gemma2_270m_270m": "encoder.resid_pre",
    "gemma3_4b": "resid_pre",  # with its vision tower: the general program
}


def measure(m: Any, site: str, length: int) -> dict[str, Any]:
    import jax
    import numpy as np

    from gemmalens import patching

    rs = np.random.RandomState(0)
    tokens = rs.randint(3, 500, (1, length))
    corrupted = tokens.copy()
    corrupted[0, length // 3] = 77
    pairs = {"decoder_tokens": rs.randint(3, 500, (1, length // 2))} if "." in site else {}

    def metric(logits):
        return (logits[:, -1, 11] - logits[:, -1, 12]).mean()

    row: dict[str, Any] = {}
    scores = {}
    for positions in ("auto", "all"):

        def sweep(positions=positions):
            return jax.block_until_ready(
                patching.sweep(
                    m, tokens, corrupted, metric, site, logit_positions=positions, **pairs
                )
            )

        start = time.perf_counter()
        scores[positions] = np.asarray(sweep(), np.float64)
        first = time.perf_counter() - start
        row[positions] = {"first_s": first, "steady_s": median_seconds(sweep, 1, warmup=False)}
    row["sweep_shape"] = list(scores["auto"].shape)
    row["sweep_range"] = float(np.ptp(scores["all"]))
    row["sweep_max_abs_difference"] = float(np.abs(scores["auto"] - scores["all"]).max())
    estimate = patching.attribution_patching(m, tokens, corrupted, metric, site, **pairs)
    row["attribution_finite"] = bool(np.isfinite(np.asarray(estimate)).all())
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", choices=list(PRESETS), default=list(PRESETS))
    parser.add_argument("--length", type=int, default=16)
    parser.add_argument("--tiny", action="store_true", help="the Gemma 3n teaching model, CPU")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp

    import gemmalens as gl

    out: dict[str, Any] = {"device": jax.devices()[0].device_kind, "length": args.length}
    if args.tiny:  # a teaching model with AltUp: the general program
        out["gemma3n (teaching)"] = measure(gl.teaching_model("gemma3n"), "resid_pre", 8)
    else:
        for preset in args.presets:
            m = gl.build(preset, seed=0, dtype=jnp.bfloat16)
            out[preset] = measure(m, PRESETS[preset], args.length)
            del m
            jax.clear_caches()
    print(f"{out['device']}, 1 x {8 if args.tiny else args.length} tokens\n")
    print("| model | sweep | range | max difference | first call auto / all | steady auto / all |")
    print("|---|---|---|---|---|---|")
    for name, row in out.items():
        if not isinstance(row, dict):
            continue
        auto, every = row["auto"], row["all"]
        print(
            f"| {name} | {' x '.join(map(str, row['sweep_shape']))} | {row['sweep_range']:.3g} | "
            f"{row['sweep_max_abs_difference']:.2g} | {auto['first_s']:.1f} / "
            f"{every['first_s']:.1f} s | {auto['steady_s'] * 1e3:.0f} / "
            f"{every['steady_s'] * 1e3:.0f} ms |"
        )
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
