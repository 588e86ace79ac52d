"""A decode step's gated feed-forward block as two GPU kernels.

While decoding, the feed-forward block multiplies a few rows (one new token per sequence)
by three large weight matrices: bound by reading the weights, and by how many kernels run.
For 2 to 16 rows XLA makes four kernels of it (the merged gate and up product, the
activation ``gelu(gate) * up``, a split-K down projection, the sum of its partial
products). Here the activation is part of the gate and up kernel, and the down projection
reads its weights faster (measurements in docs/benchmarks.md):

- ``gate_up``: each program reads a block of rows of the gate and the up weights, multiplies
  them by the input (the weights are the tensor-core product's wide operand, the input the
  narrow one) and writes ``gelu(gate) * up`` for its block of hidden units;
- ``down``: the down projection with the hidden units split among programs (split-K); the
  float32 partial sums are added by whatever XLA fuses after.

Both kernels read and write blocks of 16 rows and mask the rows past the input's last:
Pallas' Triton lowering masks a block at an array's edge only where the kernel asks, and
masking is cheaper than padding the input (a kernel of its own in every layer).

Written with Pallas for Triton (GPUs); ``interpret=True`` runs the same kernels on any
backend (the tests do this on the CPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Tensor-core products need 16 rows: the kernels work on blocks of 16 rows, masked past the
# rows that exist.
MAX_ROWS = 16
# Contract dimension 1 of the weights block with dimension 1 of the input block.
_WEIGHTS_TIMES_INPUT = (((1,), (1,)), ((), ()))


def _largest_dividing(n: int, choices: tuple[int, ...]) -> int | None:
    return next((c for c in choices if n % c == 0), None)


def supported(rows: int, d_model: int, d_mlp: int) -> bool:
    """Whether `gated_mlp` tiles these sizes (block sizes must divide them)."""
    return (
        1 <= rows <= MAX_ROWS
        and _largest_dividing(d_model, (64, 32, 16)) is not None
        and _largest_dividing(d_mlp, (128, 64, 32, 16)) is not None
    )


def _row_mask(rows: int) -> jax.Array:
    # Pallas' Triton lowering masks nothing by itself: a block of 16 rows over `rows` rows
    # must mask its loads and stores, or it reads and writes past the array.
    return (jnp.arange(MAX_ROWS) < rows)[:, None]


def _gate_up_kernel(x_ref, gate_ref, up_ref, out_ref, *, block_k: int, rows: int):
    # x_ref [16, d_model] over `rows` rows; gate_ref, up_ref [block_n, d_model];
    # out_ref [16, block_n] over `rows` rows
    block_n, d_model = gate_ref.shape

    def accumulate(i, sums):
        at = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
        x = plgpu.load(x_ref.at[:, at], mask=_row_mask(rows), other=0)
        gate = lax.dot_general(
            gate_ref[:, at], x, _WEIGHTS_TIMES_INPUT, preferred_element_type=jnp.float32
        )
        up = lax.dot_general(
            up_ref[:, at], x, _WEIGHTS_TIMES_INPUT, preferred_element_type=jnp.float32
        )
        return sums[0] + gate, sums[1] + up

    zeros = jnp.zeros((block_n, MAX_ROWS), jnp.float32)
    gate, up = lax.fori_loop(0, d_model // block_k, accumulate, (zeros, zeros))
    hidden = (jax.nn.gelu(gate, approximate=True) * up).T.astype(out_ref.dtype)
    plgpu.store(out_ref, hidden, mask=_row_mask(rows))


def _down_kernel(h_ref, w_ref, out_ref, *, block_k: int, split_length: int, rows: int):
    # h_ref [16, d_mlp] over `rows` rows; w_ref [block_n, d_mlp]; out_ref [16, block_n] of
    # this split, over `rows` rows
    block_n = w_ref.shape[0]
    start = pl.program_id(1) * split_length

    def accumulate(i, total):
        at = pl.ds(pl.multiple_of(start + i * block_k, block_k), block_k)
        h = plgpu.load(h_ref.at[:, at], mask=_row_mask(rows), other=0)
        return total + lax.dot_general(
            w_ref[:, at], h, _WEIGHTS_TIMES_INPUT, preferred_element_type=jnp.float32
        )

    zeros = jnp.zeros((block_n, MAX_ROWS), jnp.float32)
    total = lax.fori_loop(0, split_length // block_k, accumulate, zeros).T
    plgpu.store(out_ref, total, mask=_row_mask(rows))


def _params(num_warps: int, num_stages: int):
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


@functools.partial(jax.jit, static_argnames=("interpret",))
def gated_mlp(
    x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, *, interpret: bool = False
) -> jax.Array:
    """``(gelu_tanh(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T`` for a few rows.

    Args:
      x: [rows, d_model], rows <= 16 (see `supported`).
      w_gate, w_up: [d_mlp, d_model]; w_down: [d_model, d_mlp] (torch ``nn.Linear``
        layout, as gemmalens stores them).
      interpret: run in Pallas' interpreter (any backend).

    Returns:
      [rows, d_model] in ``x.dtype``. The activation is computed from float32 sums and
      rounded once to ``x.dtype`` before the down projection.
    """
    rows, d_model = x.shape
    d_mlp = w_gate.shape[0]
    if not supported(rows, d_model, d_mlp):
        raise ValueError(
            f"decode_mlp.gated_mlp cannot tile {rows} rows, d_model {d_model}, d_mlp {d_mlp}: "
            "it needs at most 16 rows and sizes divisible by 16 (check decode_mlp.supported)."
        )
    # Blocks of 16 rows over the `rows` rows, masked: no padding before, no slicing after.
    # Measured on an H100 at Gemma 3 1B sizes (docs/benchmarks.md); smaller models take
    # the largest blocks that divide their sizes.
    block_n = _largest_dividing(d_mlp, (64, 32, 16))
    block_k = _largest_dividing(d_model, (64, 32, 16))
    hidden = pl.pallas_call(
        functools.partial(_gate_up_kernel, block_k=block_k, rows=rows),
        out_shape=jax.ShapeDtypeStruct((rows, d_mlp), x.dtype),
        grid=(d_mlp // block_n,),
        in_specs=[
            pl.BlockSpec((MAX_ROWS, d_model), lambda j: (0, 0)),
            pl.BlockSpec((block_n, d_model), lambda j: (j, 0)),
            pl.BlockSpec((block_n, d_model), lambda j: (j, 0)),
        ],
        out_specs=pl.BlockSpec((MAX_ROWS, block_n), lambda j: (0, j)),
        compiler_params=_params(num_warps=4, num_stages=5),
        interpret=interpret,
        name="gemmalens_decode_gate_up",
    )(x, w_gate, w_up)

    block_n = _largest_dividing(d_model, (32, 16))
    block_k = _largest_dividing(d_mlp, (128, 64, 32, 16))
    splits = next(s for s in (6, 8, 4, 3, 2, 1) if d_mlp % (s * block_k) == 0)
    partials = pl.pallas_call(
        functools.partial(_down_kernel, block_k=block_k, split_length=d_mlp // splits, rows=rows),
        out_shape=jax.ShapeDtypeStruct((splits, rows, d_model), jnp.float32),
        grid=(d_model // block_n, splits),
        in_specs=[
            pl.BlockSpec((MAX_ROWS, d_mlp), lambda j, s: (0, 0)),
            pl.BlockSpec((block_n, d_mlp), lambda j, s: (j, 0)),
        ],
        out_specs=pl.BlockSpec((None, MAX_ROWS, block_n), lambda j, s: (s, 0, j)),
        compiler_params=_params(num_warps=4, num_stages=3),
        interpret=interpret,
        name="gemmalens_decode_down",
    )(hidden, w_down)
    return partials.sum(axis=0).astype(x.dtype)
