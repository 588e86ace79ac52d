"""A Gemma 4 26B-A4B mixture-of-experts layer beside a dense MLP of the same active width.

    python benchmarks/moe_layer.py            # 26B-A4B shapes, bfloat16, on a GPU
    python benchmarks/moe_layer.py --tiny     # a smoke run on CPU

The 26B-A4B feed-forward branch is a dense gated MLP (width 2112) plus 8 of 128 experts
(width 704 each) chosen per token by a router. Its *active* width is therefore
2112 + 8 * 704 = 7744: a dense gated MLP of width 7744 does the same matrix-multiply work
per token, and is the yardstick. Rows of the table (forward only, jitted, median time):

* ``dense MLP, active width``: `GatedMLP` of width 7744 (the yardstick, ratio 1);
* ``MoE branch (gemmalens)``: `DenseAndExperts` as the model runs it: dense MLP, router
  with top-k, experts grouped by expert (`jax.lax.ragged_dot_general`), the extra norms;
* ``experts only, grouped``: just the expert mixture of 8 active experts, as the model
  runs it (on Hopper: JAX's Mosaic GPU grouped-matmul kernel);
* ``experts only, XLA ragged dot``: the same through `jax.lax.ragged_dot_general`, which
  XLA:GPU expands into a dense product over every expert (up to 2048 tokens only);
* ``experts only, every expert``: the naive form that runs all 128 experts on every token
  and masks (what the grouped form avoids; 16x the work; up to 8192 tokens).

The smallest token count also checks the grouped result against the XLA one.
Prints a Markdown table (time, tokens/s, ratio to the yardstick) and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from penzai import pz

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gemmalens.layers import moe as moe_layers  # noqa: E402
from gemmalens.layers.mlp import GatedMLP  # noqa: E402
from gemmalens.layers.moe import DenseAndExperts, grouped_experts  # noqa: E402
from gemmalens.layers.params import ParamBuilder, RandomInit  # noqa: E402

GEMMA4_26B_A4B = dict(d_model=2816, d_mlp=2112, num_experts=128, top_k=8, d_expert=704)
TINY = dict(d_model=64, d_mlp=48, num_experts=8, top_k=2, d_expert=16)


def timed(fn, *args, repeats: int) -> float:
    """Median wall time of ``fn(*args)`` in seconds, after one compiling call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def every_expert(x, indices, weights, gate_up, down):
    """All experts on all tokens, weighted by the dense weights (zero where unchosen)."""
    del indices
    fused = jnp.einsum("th,efh->tef", x, gate_up)
    gate, up = jnp.split(fused, 2, axis=-1)
    hidden = jax.nn.gelu(gate, approximate=True) * up
    out = jnp.einsum("tei,ehi->teh", hidden, down)
    return jnp.einsum("teh,te->th", out.astype(jnp.float32), weights).astype(x.dtype)


def tune(tokens, moe, gate_up, down, shape, dtype, repeats) -> None:
    """Times the grouped experts for each tile configuration of the Mosaic GPU kernel."""
    x = jax.random.normal(jax.random.key(0), (1, tokens, shape["d_model"])).astype(dtype)
    indices, weights = moe.moe.router(pz.nx.wrap(x).tag("batch", "seq", "embedding"))
    args = (
        x.reshape(tokens, -1),
        indices.unwrap("batch", "seq", "top_k").reshape(tokens, -1),
        weights.unwrap("batch", "seq", "expert").reshape(tokens, -1),
        gate_up,
        down,
    )
    narrow = min(2 * shape["d_expert"], shape["d_model"])
    print(f"| block_m | block_n | max_concurrent_steps | grid_block_n | ms ({tokens} tokens) |")
    print("|---:|---:|---:|---:|---:|")
    for block_m, block_n, steps, grid_n in itertools.product(
        (64, 128), (64, 128), (2, 4, 6), (1, 2)
    ):
        if (narrow // block_n) % grid_n:
            continue
        moe_layers._MOSAIC_TILES.update(
            block_m=block_m, block_n=block_n, max_concurrent_steps=steps, grid_block_n=grid_n
        )
        run = jax.jit(functools.partial(grouped_experts, implementation="mosaic_gpu"))
        try:
            seconds = timed(run, *args, repeats=repeats)
        except Exception as error:  # noqa: BLE001 - a configuration the kernel refuses
            print(
                f"| {block_m} | {block_n} | {steps} | {grid_n} | failed: {type(error).__name__} |"
            )
            continue
        print(f"| {block_m} | {block_n} | {steps} | {grid_n} | {seconds * 1e3:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, float32 (CPU smoke run)")
    parser.add_argument("--tokens", type=int, nargs="*", help="token counts to time")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--skip-naive", action="store_true", help="skip the every-expert row")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    parser.add_argument(
        "--tune", type=int, metavar="TOKENS", help="only sweep the Mosaic GPU kernel's tiles"
    )
    args = parser.parse_args()
    shape = TINY if args.tiny else GEMMA4_26B_A4B
    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    token_counts = args.tokens or ([16, 64] if args.tiny else [256, 2048, 8192, 32768])
    repeats = args.repeats or (3 if args.tiny else 20)
    active = shape["d_mlp"] + shape["top_k"] * shape["d_expert"]

    source = RandomInit(seed=0, dtype=dtype)
    moe = pz.freeze_params(
        DenseAndExperts.build(
            ParamBuilder(source).scope("blocks.0"),
            "blocks.0.",
            shape["d_model"],
            shape["d_mlp"],
            shape["num_experts"],
            shape["top_k"],
            shape["d_expert"],
            1e-6,
        )
    )
    dense = pz.freeze_params(
        GatedMLP.build(ParamBuilder(source).scope("dense"), "dense.", shape["d_model"], active)
    )
    experts = moe.moe.experts
    gate_up = experts.gate_up.value.unwrap("expert", "gate_up", "expert_neurons", "embedding")
    gate_up = gate_up.reshape(shape["num_experts"], 2 * shape["d_expert"], shape["d_model"])
    down = experts.down.value.unwrap("expert", "embedding", "expert_neurons")

    run_layer = jax.jit(lambda layer, x: layer(x).unwrap("batch", "seq", "embedding"))
    run_grouped = jax.jit(grouped_experts, static_argnames="implementation")
    run_xla = jax.jit(functools.partial(grouped_experts, implementation="xla"))
    run_naive = jax.jit(every_expert)

    if args.tune:
        tune(args.tune, moe, gate_up, down, shape, dtype, repeats)
        return

    rows = []
    for tokens in token_counts:
        key = jax.random.key(tokens)
        x = jax.random.normal(key, (1, tokens, shape["d_model"]), jnp.float32).astype(dtype)
        named = pz.nx.wrap(x).tag("batch", "seq", "embedding")
        # Routing for the experts-only rows: what the model's router chooses for x.
        indices, weights = moe.moe.router(named)
        flat_x = x.reshape(tokens, -1)
        flat_indices = indices.unwrap("batch", "seq", "top_k").reshape(tokens, -1)
        flat_weights = weights.unwrap("batch", "seq", "expert").reshape(tokens, -1)
        expert_args = (flat_x, flat_indices, flat_weights, gate_up, down)
        figures = {
            "dense MLP, active width": timed(run_layer, dense, named, repeats=repeats),
            "MoE branch (gemmalens)": timed(run_layer, moe, named, repeats=repeats),
            "experts only, grouped": timed(run_grouped, *expert_args, repeats=repeats),
        }
        if tokens == min(token_counts):
            grouped = run_grouped(*expert_args).astype(jnp.float32)
            reference = run_xla(*expert_args).astype(jnp.float32)
            error = float(jnp.abs(grouped - reference).max() / jnp.abs(reference).max())
            print(f"grouped vs XLA ragged dot at {tokens} tokens: max relative error {error:.2e}")
        if tokens <= 2048:  # XLA's dense expansion needs [tokens * k, experts * H]
            figures["experts only, XLA ragged dot"] = timed(run_xla, *expert_args, repeats=repeats)
        if not args.skip_naive and tokens <= 8192:  # [tokens, 128, H] gets too large past it
            figures["experts only, every expert"] = timed(run_naive, *expert_args, repeats=repeats)
        baseline = figures["dense MLP, active width"]
        for name, seconds in figures.items():
            rows.append(
                dict(
                    tokens=tokens,
                    what=name,
                    ms=seconds * 1e3,
                    tokens_per_s=tokens / seconds,
                    ratio=seconds / baseline,
                )
            )

    device = jax.devices()[0]
    print(
        f"\nGemma 4 26B-A4B-shaped feed-forward ({'tiny' if args.tiny else 'full'} shapes "
        f"{shape}, active width {active}, {jnp.dtype(dtype).name}) on "
        f"{device.device_kind} ({platform.node()}), jax {jax.__version__}\n"
    )
    print("| tokens | what | ms | tokens/s | time / dense MLP of active width |")
    print("|---:|---|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['tokens']} | {row['what']} | {row['ms']:.3f} | "
            f"{row['tokens_per_s']:,.0f} | {row['ratio']:.2f} |"
        )
    if args.out:
        args.out.write_text(
            json.dumps(
                dict(device=device.device_kind, shape=shape, dtype=jnp.dtype(dtype).name,
                     jax=jax.__version__, rows=rows),
                indent=2,
            )
        )  # fmt: skip


if __name__ == "__main__":
    main()
