"""Analyses of a bfloat16 model against float32: how much of a patching effect is rounding?

    python benchmarks/bf16_precision.py                        # the teaching models, CPU
    python benchmarks/bf16_precision.py --preset gemma3_4b     # a real preset on a GPU
    python benchmarks/bf16_precision.py --tiny                 # smoke run, CPU

Three forms of one set of weights (stored in bfloat16): the bfloat16 model, the same model
with float32 activations (`Model.with_activation_dtype`), and the float32 model holding the
same values. For each: the largest logit difference from the float32 model, and a
``resid_pre`` patching sweep (one token of the prompt corrupted; the metric is the
difference of the float32 model's two most likely next tokens, averaged over the batch),
its largest difference from the float32 sweep beside the float32 sweep's range (what the
effects span). Also the steady forward time of the float32-activation model over the
bfloat16 one. The teaching models ship in bfloat16; a preset gets random bfloat16 weights
(`gl.build`). Prints a Markdown table; writes JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

TEACHING = ["gemma3", "gemma3n", "gemma4_moe", "t5gemma2"]


def _as_float32(m: Any) -> Any:
    """``m`` with every parameter converted to float32 (the same values)."""
    import jax.numpy as jnp

    from gemmalens.layers.params import cast_parameters

    return m.with_tree(cast_parameters(m.model, jnp.float32))


def _steady_seconds(m: Any, tokens: Any, inputs: dict, repeats: int) -> float:
    import jax

    jax.block_until_ready(m(tokens, **inputs))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(m(tokens, **inputs))
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure(half: Any, shape: tuple[int, int], repeats: int, seed: int = 0) -> dict[str, Any]:
    """The three forms of ``half`` (a bfloat16 model) on random tokens of ``shape``."""
    import numpy as np

    from gemmalens import patching

    full = _as_float32(half)
    mixed = half.with_activation_dtype("float32")
    encoder_decoder = hasattr(half, "decode")
    rng = np.random.RandomState(seed)
    vocab = half.config.decoder.vocab_size if encoder_decoder else half.config.vocab_size
    tokens = rng.randint(3, min(vocab, 4096), shape)
    corrupted = tokens.copy()
    corrupted[:, shape[1] // 3] = rng.randint(3, min(vocab, 4096), shape[0])
    inputs, pairs, site = {}, {}, "resid_pre"
    if encoder_decoder:
        decoder = rng.randint(3, min(vocab, 4096), (shape[0], max(2, shape[1] // 2)))
        inputs = {"decoder_tokens": decoder}
        pairs = {"decoder_tokens": decoder, "corrupted_decoder_tokens": decoder}
        site = "encoder.resid_pre"

    reference = np.asarray(full(tokens, **inputs), np.float64)
    order = np.argsort(-reference[:, -1].mean(0))
    first, second = int(order[0]), int(order[1])

    def metric(logits):
        return (logits[:, -1, first] - logits[:, -1, second]).mean()

    sweep = np.asarray(patching.sweep(full, tokens, corrupted, metric, site=site, **pairs))
    row: dict[str, Any] = {
        "logits_max_abs": float(np.abs(reference).max()),
        "sweep_range": float(np.ptp(sweep)),
    }
    for label, m in (("bfloat16", half), ("float32_activations", mixed)):
        logits = np.asarray(m(tokens, **inputs), np.float64)
        other = np.asarray(patching.sweep(m, tokens, corrupted, metric, site=site, **pairs))
        row[label] = {
            "logits_max_abs_difference": float(np.abs(logits - reference).max()),
            "sweep_max_abs_difference": float(np.abs(other - sweep).max()),
        }
    half_time = _steady_seconds(half, tokens, inputs, repeats)
    mixed_time = _steady_seconds(mixed, tokens, inputs, repeats)
    row["forward_seconds"] = {"bfloat16": half_time, "float32_activations": mixed_time}
    row["float32_activations_time_ratio"] = mixed_time / half_time
    return row


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| model | max logit | logits: bf16 / f32 act | sweep range | sweep: bf16 / f32 act "
        "| f32 act time / bf16 |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        b, f = r["bfloat16"], r["float32_activations"]
        lines.append(
            f"| {name} | {r['logits_max_abs']:.1f} | {b['logits_max_abs_difference']:.2g} / "
            f"{f['logits_max_abs_difference']:.2g} | {r['sweep_range']:.3g} | "
            f"{b['sweep_max_abs_difference']:.2g} / {f['sweep_max_abs_difference']:.2g} | "
            f"{r['float32_activations_time_ratio']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", help="a real preset (random bfloat16 weights) instead")
    parser.add_argument("--shape", default=None, help="batch x tokens (default 4x12; 1x64)")
    parser.add_argument("--tiny", action="store_true", help="one teaching model, 2 x 8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp

    import gemmalens as gl

    default_shape = "1x64" if args.preset else ("2x8" if args.tiny else "4x12")
    shape = tuple(int(n) for n in (args.shape or default_shape).split("x"))
    results: dict[str, dict[str, Any]] = {}
    if args.preset:
        half = gl.build(args.preset, seed=0, dtype=jnp.bfloat16)
        results[args.preset] = measure(half, shape, args.repeats)
    else:
        for name in TEACHING[:1] if args.tiny else TEACHING:
            half = gl.teaching_model(name, dtype="bfloat16")
            results[name] = measure(half, shape, args.repeats)
    out = {
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "shape": list(shape),
        "results": results,
    }
    print(f"{out['device']}, {shape[0]} x {shape[1]} tokens\n")
    print(table(results))
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    sys.exit(main() and 0)
