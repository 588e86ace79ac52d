"""The prompt's gated product as one kernel (`gemmalens.kernels.gated_product`) beside XLA's.

For each size (rows, d_model, d_mlp) and each tiling, one process, side by side:

- ``xla``: what the model runs today, ``gelu(x @ gate.T) * (x @ up.T)`` as XLA compiles it
  (two cuBLAS products, the gate's GELU in the epilogue, a third kernel for the product);
- ``kernel``: `gated_product` with the given tiling;
- ``one_product``: ``x @ gate.T`` alone, for scale (half the work, cuBLAS).

Reports milliseconds per call (median of repeats), TFLOP/s counting both products, the
ratio xla / kernel, and the kernel's largest error against a float32 reference beside
XLA's own. With ``--models``, a model-level check: a preset with random bfloat16 weights,
its logits and every ``mlp.hook_post`` with the kernel (``PROMPT_MLP_KERNEL="on"``)
against without (``"off"``). The kernel needs a Hopper GPU; ``--tiny`` (the CPU smoke
run) times XLA's side on a small size and runs the model check under ``"reference"``
(the kernel's path with XLA's arithmetic) on a tiny-width Gemma 3 1B.

    python benchmarks/gated_product_kernel.py --models gemma3_1b --out gated_product.json
    python benchmarks/gated_product_kernel.py --tiny
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from gemmalens.kernels import gated_product as gp
from gemmalens.layers import mlp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_size_speed  # noqa: E402  (beside this script: presets at tiny widths)

# Gemma 3 27B's and 4B's feed-forward sizes at 4096 tokens, and Gemma 3 1B's at 2 x 8192.
SIZES = {
    "gemma3_27b": (4096, 5376, 21504),
    "gemma3_4b": (4096, 2560, 10240),
    "gemma3_1b": (16384, 1152, 6912),
    "tiny": (256, 128, 256),
}
TILINGS = {
    "default": gp.DEFAULT_TILING,
    "4_stages": dataclasses.replace(gp.DEFAULT_TILING, stages=4),
    "2_stages": dataclasses.replace(gp.DEFAULT_TILING, stages=2),
    "rows128_hidden64": dataclasses.replace(gp.DEFAULT_TILING, rows=128, hidden=64),
    "snake4": dataclasses.replace(gp.DEFAULT_TILING, snake=4),
    "snake16": dataclasses.replace(gp.DEFAULT_TILING, snake=16),
}


def reference(x, gate, up):
    f32 = jnp.float32
    return mlp._gated_reference(x.astype(f32), gate.astype(f32), up.astype(f32))


def milliseconds(fn, *args, calls: int = 20, repeats: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / calls * 1e3)
    return statistics.median(times)


def measure(size: str, tilings: list[str]) -> dict:
    m, k, n = SIZES[size]
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
    gate = (jax.random.normal(keys[1], (n, k), jnp.float32) / k**0.5).astype(jnp.bfloat16)
    up = (jax.random.normal(keys[2], (n, k), jnp.float32) / k**0.5).astype(jnp.bfloat16)
    flops = 2 * 2 * m * k * n
    exact = jax.jit(reference)(x, gate, up)
    scale = float(jnp.abs(exact).max())

    def error(out):
        return float(jnp.abs(out.astype(jnp.float32) - exact).max()) / scale

    xla = jax.jit(mlp._gated_reference)  # what GatedMLP computes without the kernel
    row = {"size": size, "rows": m, "d_model": k, "d_mlp": n}
    row["xla_ms"] = milliseconds(xla, x, gate, up)
    row["xla_tflops"] = flops / row["xla_ms"] / 1e9
    row["xla_relative_error"] = error(xla(x, gate, up))
    row["one_product_ms"] = milliseconds(jax.jit(lambda a, b: a @ b.T), x, gate)
    for name in tilings:
        tiling = TILINGS[name]
        if not mlp._on_hopper(several_devices_ok=True):
            row[f"kernel_{name}"] = f"needs a Hopper GPU (this is {jax.devices()[0].device_kind})"
            continue
        if not gp.supported(m, k, n, tiling):
            row[f"kernel_{name}"] = "unsupported"
            continue
        kernel = jax.jit(lambda a, b, c, t=tiling: gp.gated_product(a, b, c, t))
        try:
            ms = milliseconds(kernel, x, gate, up)
            row[f"kernel_{name}"] = {
                "ms": ms,
                "tflops": flops / ms / 1e9,
                "xla_over_kernel": row["xla_ms"] / ms,
                "relative_error": error(kernel(x, gate, up)),
            }
        except Exception as failure:  # noqa: BLE001 - report and go on to the next tiling
            row[f"kernel_{name}"] = f"failed: {type(failure).__name__}: {str(failure)[:400]}"
        print(json.dumps({name: row[f"kernel_{name}"]}), flush=True)
    return row


def model_check(preset: str, tiny: bool, batch: int = 2, length: int = 512) -> dict:
    """Logits and ``blocks.*.mlp.hook_post`` of one forward with the kernel and without
    (without a Hopper GPU: with the kernel's path under ``"reference"``)."""
    import numpy as np

    import gemmalens as gl

    fused = "on" if mlp._on_hopper(several_devices_ok=True) else "reference"
    model = gl.build(real_size_speed.config_for(preset, tiny), dtype=jnp.bfloat16)
    vocab = model.config.vocab_size
    tokens = np.random.RandomState(0).randint(3, vocab, size=(batch, length))
    runs = {}
    for choice in ("off", fused):
        mlp.PROMPT_MLP_KERNEL = choice
        jax.clear_caches()
        logits, cache = model.run_with_cache(tokens, "blocks.*.mlp.hook_post")
        runs[choice] = (np.asarray(logits, np.float32), cache)
    mlp.PROMPT_MLP_KERNEL = "off"
    jax.clear_caches()
    (off, off_cache), (on, on_cache) = runs["off"], runs[fused]
    hidden = {}
    for name in off_cache.keys():
        a, b = (np.asarray(c[name], np.float32) for c in (off_cache, on_cache))
        hidden[name] = float(np.abs(a - b).max() / np.abs(a).max())
    return {
        "preset": preset,
        "tiny": tiny,
        "setting": fused,
        "tokens": [batch, length],
        "logits_max_abs_difference": float(np.abs(off - on).max()),
        "logits_scale": float(np.abs(off).max()),
        "top1_agreement": float((off.argmax(-1) == on.argmax(-1)).mean()),
        "hook_post_largest_relative_difference": max(hidden.values()),
        "hook_post_first_layer_relative_difference": next(iter(hidden.values())),
    }


def table(rows: list[dict], checks: list[dict]) -> str:
    lines = [
        "| size (rows x d_model x d_mlp) | XLA ms | kernel ms (tiling) | XLA / kernel "
        "| error vs float32: XLA, kernel |",
        "|---|---:|---:|---:|---|",
    ]
    for row in rows:
        size = f"{row['size']} ({row['rows']} x {row['d_model']} x {row['d_mlp']})"
        kernels = {
            key[len("kernel_") :]: value
            for key, value in row.items()
            if key.startswith("kernel_") and isinstance(value, dict)
        }
        if not kernels:
            why = next(v for k, v in row.items() if k.startswith("kernel_"))
            lines.append(f"| {size} | {row['xla_ms']:.3f} | {why} | | |")
            continue
        best = min(kernels, key=lambda name: kernels[name]["ms"])
        k = kernels[best]
        lines.append(
            f"| {size} | {row['xla_ms']:.3f} | {k['ms']:.3f} ({best}) | "
            f"{k['xla_over_kernel']:.3f} | {row['xla_relative_error']:.1e}, "
            f"{k['relative_error']:.1e} |"
        )
    if checks:
        lines += [
            "",
            "| model check | setting | max abs dlogit | top-1 agreement | hook_post, largest "
            "relative difference |",
            "|---|---|---:|---:|---:|",
        ]
        for c in checks:
            name = c["preset"] + (" (tiny widths)" if c["tiny"] else "")
            lines.append(
                f"| {name} | {c['setting']} | {c['logits_max_abs_difference']:.3g} | "
                f"{c['top1_agreement']:.1%} | {c['hook_post_largest_relative_difference']:.2g} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="*", default=None, choices=list(SIZES))
    parser.add_argument("--tilings", nargs="+", default=list(TILINGS), choices=list(TILINGS))
    parser.add_argument("--models", nargs="*", default=None, help="presets for the model check")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run (see above)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    default_sizes = ["tiny"] if args.tiny else [s for s in SIZES if s != "tiny"]
    sizes = default_sizes if args.sizes is None else args.sizes
    models = (["gemma3_1b"] if args.tiny else []) if args.models is None else args.models
    rows = []
    for size in sizes:
        rows.append(measure(size, ["default"] if args.tiny else args.tilings))
    checks = [model_check(preset, args.tiny, length=64 if args.tiny else 512) for preset in models]
    print(table(rows, checks))
    result = {
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "rows": rows,
        "model_checks": checks,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
