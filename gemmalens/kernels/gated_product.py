"""A prompt's gated product ``gelu(x @ gate.T) * (x @ up.T)`` as one Hopper kernel.

On a whole prompt the gated feed-forward block is bound by its three matrix products. XLA
runs the gate and the up projection as two cuBLAS products (the gate's GELU in cuBLAS'
epilogue) and their product as a third kernel that reads both results back from device
memory and writes the hidden units: at Gemma 3 27B's sizes and 4096 tokens that third
kernel moves 264 MB a layer. Here one kernel computes both projections of a tile of rows
and hidden units into two float32 accumulators and writes only ``gelu(gate) * up``.

Its result is rounded as the unfused block rounds (each projection, the activation and the
product to the input's dtype), so hooks downstream see the same values either way, up to
the order of the float32 sums inside the products.

The kernel is a persistent, warp-specialised Pallas kernel for Mosaic GPU (Hopper's
``wgmma`` and bulk tensor copies): one warpgroup streams tiles of ``x`` and of the two
weight matrices into shared memory, two warpgroups each multiply half of the rows. The
weights are read as stored, ``[hidden, embedding]`` (transformers' ``[out, in]``); the
tensor cores take them transposed from shared memory. GPUs only: there is no CPU version,
callers fall back to XLA's (`supported`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Block sizes: each of the two compute warpgroups owns ``rows`` rows and ``hidden``
    hidden units of the output (so a program's tile is ``2 * rows`` by ``hidden``);
    ``depth`` is the embedding slice per pipeline step; ``stages`` how many steps are in
    flight; ``snake`` how many row tiles a program sweeps before moving to the next
    hidden-unit tile (the weights' reuse in L2)."""

    rows: int = 64
    hidden: int = 128
    depth: int = 64
    stages: int = 3
    snake: int = 8
    # The epilogue writes the output through shared memory in tiles of this many columns.
    store_columns: int = 64


DEFAULT_TILING = Tiling()


def supported(rows: int, d_model: int, d_mlp: int, tiling: Tiling = DEFAULT_TILING) -> bool:
    """Whether `gated_product` tiles these sizes (on a Hopper GPU)."""
    return (
        rows % (2 * tiling.rows) == 0
        and d_model % tiling.depth == 0
        and d_mlp % tiling.hidden == 0
        and tiling.hidden % tiling.store_columns == 0
    )


def _gelu_tanh(g: jax.Array) -> jax.Array:
    return 0.5 * g * (1.0 + jnp.tanh(_SQRT_2_OVER_PI * (g + 0.044715 * (g * g * g))))


def _rounded_like_the_model(gate: jax.Array, up: jax.Array, dtype) -> jax.Array:
    """``gelu(gate) * up`` from float32 sums, rounded to ``dtype`` where the model's
    operations round (the projections, the activation, the product), so that the result is
    what the unfused block computes from the values its hooks would show."""

    def rounded(value):
        return value.astype(dtype).astype(jnp.float32)

    return (rounded(_gelu_tanh(rounded(gate))) * rounded(up)).astype(dtype)


def _kernel(x_gmem, gate_gmem, up_gmem, out_gmem, *, tiling: Tiling):
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    dtype = x_gmem.dtype
    m, k = x_gmem.shape
    n = gate_gmem.shape[0]
    rows, hidden, depth = tiling.rows, tiling.hidden, tiling.depth
    program_rows = 2 * rows
    row_tiles, hidden_tiles, steps = m // program_rows, n // hidden, k // depth

    swizzle = plgpu.find_swizzle(depth * jnp.dtype(dtype).itemsize * 8)
    operand_layout = (
        plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
        plgpu.SwizzleTransform(swizzle),
    )
    columns = tiling.store_columns
    store_swizzle = plgpu.find_swizzle(columns * jnp.dtype(dtype).itemsize * 8)
    store_layout = (
        plgpu.TilingTransform((8, store_swizzle // jnp.dtype(dtype).itemsize)),
        plgpu.SwizzleTransform(store_swizzle),
    )

    def block(shape):
        return plgpu.BlockSpec(
            shape, lambda step: (0, step), transforms=operand_layout, memory_space=plgpu.SMEM
        )

    def pipeline(body, compute_context):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(steps,),
            memory_registers=40,
            in_specs=[block((program_rows, depth)), block((hidden, depth)), block((hidden, depth))],
            wg_axis="wg",
            num_compute_wgs=2,
            max_concurrent_steps=tiling.stages,
            compute_context=compute_context,
        )

    def ignore(*_, **__):
        return None

    @functools.partial(
        pl.run_scoped,
        allocations=pipeline(ignore, ignore).get_allocations(x_gmem, gate_gmem, up_gmem),
        store_smem=plgpu.SMEM((2, 2, rows, columns), dtype, transforms=store_layout),
        collective_axes="wg",
    )
    def _scope(allocations, store_smem):
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((row_tiles * hidden_tiles,), collective_axes="sm")
        def _tile(loop_info):
            (linear,) = loop_info.index
            row_tile, hidden_tile = plgpu.planar_snake(
                linear, (row_tiles, hidden_tiles), 0, tiling.snake
            )
            program_slice = pl.ds(row_tile * program_rows, program_rows)
            hidden_slice = pl.ds(hidden_tile * hidden, hidden)
            my_rows = pl.ds(wg * rows, rows)

            def compute_context(run_pipeline):
                @functools.partial(
                    pl.run_scoped,
                    gate_acc=plgpu.ACC((rows, hidden), jnp.float32),
                    up_acc=plgpu.ACC((rows, hidden), jnp.float32),
                )
                def _accumulate(gate_acc, up_acc):
                    run_pipeline((gate_acc, up_acc))
                    product = _rounded_like_the_model(gate_acc[...], up_acc[...], dtype)
                    for c in range(hidden // columns):
                        slot = c % 2
                        # The store that last used this slot must have read it.
                        plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                        store_smem[wg, slot] = product[:, c * columns : (c + 1) * columns]
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(
                            store_smem.at[wg, slot],
                            out_gmem.at[program_slice, hidden_slice].at[
                                my_rows, pl.ds(c * columns, columns)
                            ],
                        )
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

            def multiply(_, x_smem, gate_smem, up_smem, accs):
                gate_acc, up_acc = accs
                x_rows = x_smem.at[my_rows]
                plgpu.wgmma(gate_acc, x_rows, plgpu.transpose_ref(gate_smem, (1, 0)))
                plgpu.wgmma(up_acc, x_rows, plgpu.transpose_ref(up_smem, (1, 0)))
                plgpu.wgmma_wait(0)
                return accs

            pipeline(multiply, compute_context)(
                x_gmem.at[program_slice, :],
                gate_gmem.at[hidden_slice, :],
                up_gmem.at[hidden_slice, :],
                allocations=allocations,
            )

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _sm_count() -> int:
    return jax.devices()[0].core_count


def gated_product(
    x: jax.Array, gate: jax.Array, up: jax.Array, tiling: Tiling = DEFAULT_TILING
) -> jax.Array:
    """``gelu_tanh(x @ gate.T) * (x @ up.T)`` with float32 accumulation, in ``x``'s dtype.

    Args:
      x: ``[rows, d_model]``, bfloat16 or float16.
      gate, up: ``[d_mlp, d_model]`` in ``x``'s dtype (transformers' layout).
      tiling: block sizes; ``supported(rows, d_model, d_mlp, tiling)`` must hold.

    Returns:
      ``[rows, d_mlp]``.
    """
    import jax.experimental.pallas.mosaic_gpu as plgpu

    (m, k), (n, k_gate) = x.shape, gate.shape
    if gate.shape != up.shape or k_gate != k:
        raise ValueError(
            f"gated_product: gate {gate.shape} and up {up.shape} must both be [d_mlp, {k}] "
            f"for x of shape {x.shape}."
        )
    if not (x.dtype == gate.dtype == up.dtype) or x.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(
            f"gated_product takes one 16-bit dtype for x, gate and up; got {x.dtype}, "
            f"{gate.dtype}, {up.dtype}."
        )
    if not supported(m, k, n, tiling):
        raise ValueError(
            f"gated_product cannot tile rows={m}, d_model={k}, d_mlp={n} with {tiling} "
            "(check `supported` first)."
        )
    run = plgpu.kernel(
        functools.partial(_kernel, tiling=tiling),
        out_type=jax.ShapeDtypeStruct((m, n), x.dtype),
        grid=(_sm_count(),),
        grid_names=("sm",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )
    return run(x, gate, up)
