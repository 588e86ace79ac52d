"""Stacked against per-layer on one device: the same weights, the same logits?

    python benchmarks/stacked_agreement.py                        # on a GPU
    JAX_DEFAULT_MATMUL_PRECISION=highest python benchmarks/stacked_agreement.py
    python benchmarks/stacked_agreement.py --real gemma4_26b_a4b  # and a real preset, bf16
    python benchmarks/stacked_agreement.py --tiny                 # smoke run, CPU

A stacked model (`Model.stacked`, `stack_layers=True`) runs its layers as loops over
stacks, which compile differently from the per-layer program: on a GPU, with
dynamic-slice fusion reading each layer's weights inside the matrix products
(`gemmalens.compiling`). The test suite checks the two forms agree on the CPU; this
script checks them on the device the programs are meant for.

For each preset's layer pattern at tiny widths (float32, as `real_size_speed.py` makes
them): the largest difference of the logits and of every ``hook_resid_post`` between the
forms, beside the logits' largest magnitude. With ``--real``, the real preset in bfloat16
at 1 x 512 tokens, built once per form from the same random initialisation (the two do
not fit on one card together at 26B): largest logit difference and top-1 agreement. Run
with ``JAX_DEFAULT_MATMUL_PRECISION=highest`` to compare at full float32 (GPUs otherwise
multiply float32 in TF32, and the two programs' kernels round differently). Prints a
Markdown table; writes JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_size_speed  # noqa: E402  (beside this script: presets at tiny widths, tokens)

PRESETS = ["gemma3_27b_text", "gemma4_26b_a4b", "gemma4_31b", "gemma3_1b"]


def tiny_agreement(name: str) -> dict[str, Any]:
    import jax.numpy as jnp
    import numpy as np

    import gemmalens as gl

    config = real_size_speed.tiny_config(name)
    per_layer = gl.build(config, dtype=jnp.float32)
    stacked = per_layer.stacked()
    ids = real_size_speed.tokens(2, 64, config.vocab_size)
    names = [n for n in per_layer.hook_names if n.endswith("hook_resid_post")]
    logits, cache = per_layer.run_with_cache(ids, names)
    stacked_logits, stacked_cache = stacked.run_with_cache(ids, names)
    residual = max(
        float(np.abs(np.asarray(cache[n]) - np.asarray(stacked_cache[n])).max()) for n in names
    )
    return {
        "logits_max_abs_difference": float(np.abs(np.asarray(logits - stacked_logits)).max()),
        "logits_max_abs": float(np.abs(np.asarray(logits)).max()),
        "resid_post_max_abs_difference": residual,
    }


def real_agreement(name: str, length: int = 512) -> dict[str, Any]:
    import jax.numpy as jnp
    import numpy as np

    import gemmalens as gl

    config = gl.preset(name)
    ids = real_size_speed.tokens(1, length, config.vocab_size)
    logits = {}
    for stacked in (False, True):
        m = gl.build(config, dtype=jnp.bfloat16, stack_layers=stacked)
        logits[stacked] = np.asarray(m(ids).astype(jnp.float32))
        del m
        gc.collect()
    plain, stacked = logits[False], logits[True]
    return {
        "logits_max_abs_difference": float(np.abs(plain - stacked).max()),
        "logits_max_abs": float(np.abs(plain).max()),
        "top1_agreement": float((plain.argmax(-1) == stacked.argmax(-1)).mean()),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="two layouts, CPU (smoke run)")
    parser.add_argument("--real", nargs="*", default=[], help="real presets too (bfloat16)")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    real_size_speed.use_memory_settings(ours=True)  # before JAX starts
    import jax

    results: dict[str, Any] = {
        "device": jax.devices()[0].device_kind,
        "matmul_precision": str(jax.config.jax_default_matmul_precision),
        "tiny": {},
        "real": {},
    }
    for name in PRESETS[:2] if args.tiny else PRESETS:
        results["tiny"][name] = tiny_agreement(name)
    for name in args.real:
        results["real"][name] = real_agreement(name)
    print(f"{results['device']}, matmul precision {results['matmul_precision']}\n")
    print("| layout | max abs dlogit | max abs logit | max abs d resid_post | top-1 |")
    print("|---|---:|---:|---:|---:|")
    for kind, rows in (("tiny", results["tiny"]), ("real, bf16", results["real"])):
        for name, row in rows.items():
            residual = row.get("resid_post_max_abs_difference")
            top1 = row.get("top1_agreement")
            print(
                f"| {name} ({kind}) | {row['logits_max_abs_difference']:.3g} | "
                f"{row['logits_max_abs']:.3g} | "
                f"{'' if residual is None else f'{residual:.3g}'} | "
                f"{'' if top1 is None else f'{top1:.1%}'} |"
            )
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
