"""One decode step of attention as one GPU kernel: write the new key and value into the
cache and attend over it.

XLA compiles a decode step's attention into about seven small kernels (write the key cache,
write the value cache, the query and key paths, scores, softmax, weighted sum), each
costing one to four microseconds however little it computes. This kernel does the cache
write and the whole attention in one launch per layer.

It computes exactly what `gemmalens.sampling.CachingAttention` computes for one new token
per row: keys visible from the query at position ``p`` are the cached keys whose stored
position ``k`` satisfies ``0 <= k <= p`` and ``p - k < window`` (``window`` only for
sliding layers), except the slot the new key is written to (a ring-buffer slot being
overwritten holds a key its window no longer sees), plus the new key itself. The softmax is
computed online over blocks of keys in float32 (flash-decoding); with ``splits > 1`` the
keys are divided among several programs per row and the partial results combined after.

The kernel is written with Pallas for Triton (GPUs). ``interpret=True`` runs the same
kernel on any backend (the tests do this on the CPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Score given to keys a query may not see: far below any real score, yet finite so that
# exp(masked - max) is 0 and never NaN.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)
# Bytes of key and value blocks the pipelined loop may keep in shared memory (an H100 has
# 227 KiB a block; the rest is left for the compiler's own use).
_SHARED_MEMORY_BUDGET = 200 * 1024


def _kernel(
    query_ref,  # [rows, head_dim] block over [group, head_dim]: this kv head's query heads
    new_key_ref,  # [head_dim]
    new_value_ref,  # [head_dim]
    position_ref,  # []: the query's position
    cache_positions_ref,  # [length]: position of each cached key, -1 if empty
    key_cache_ref,  # [length, head_dim]
    value_cache_ref,  # [length, head_dim]
    # outputs
    out_ref,  # [rows, head_dim]: unnormalised weighted sum of values
    max_ref,  # [rows]: the largest score seen
    sum_ref,  # [rows]: sum of exp(score - max)
    key_cache_out_ref,  # aliases key_cache_ref
    value_cache_out_ref,  # aliases value_cache_ref
    *,
    scale: float,
    window: int | None,
    block_k: int,
    blocks_per_split: int,
    length: int,
    group: int,
):
    split = pl.program_id(2)
    rows, head_dim = query_ref.shape
    # The block has `rows` (>= 16, what a tensor-core product needs) rows; the array only
    # has this kv head's query heads: the rest load as zeros.
    query = plgpu.load(query_ref, mask=(jnp.arange(rows) < group)[:, None], other=0)
    position = position_ref[()]
    slot = position % length
    new_key = new_key_ref[...]
    new_value = new_value_ref[...]

    # The new token starts the first split's running softmax; other splits start empty.
    new_score = jnp.sum(query.astype(jnp.float32) * new_key.astype(jnp.float32)[None, :], axis=1)
    first = split == 0
    # (Arithmetic rather than a select on the scalar `first`, which Triton cannot lower.)
    in_first = first.astype(jnp.float32)
    running_max = in_first * (new_score * scale) + (1.0 - in_first) * _MASKED
    running_sum = in_first * jnp.ones((rows,), jnp.float32)
    acc = in_first * jnp.broadcast_to(new_value.astype(jnp.float32)[None, :], (rows, head_dim))

    def body(block, carry):
        acc, running_max, running_sum = carry
        start = (split * blocks_per_split + block) * block_k
        index = start + jnp.arange(block_k)
        inside = index < length
        keys = plgpu.load(key_cache_ref.at[pl.ds(start, block_k), :], mask=inside[:, None], other=0)
        values = plgpu.load(
            value_cache_ref.at[pl.ds(start, block_k), :], mask=inside[:, None], other=0
        )
        key_positions = plgpu.load(
            cache_positions_ref.at[pl.ds(start, block_k)], mask=inside, other=-1
        )
        visible = inside & (key_positions >= 0) & (key_positions <= position) & (index != slot)
        if window is not None:
            visible = visible & (position - key_positions < window)
        scores = jnp.dot(query, keys.T, preferred_element_type=jnp.float32) * scale
        scores = jnp.where(visible[None, :], scores, _MASKED)
        new_max = jnp.maximum(running_max, jnp.max(scores, axis=1))
        correction = jnp.exp(running_max - new_max)
        weights = jnp.where(visible[None, :], jnp.exp(scores - new_max[:, None]), 0.0)
        acc = acc * correction[:, None] + jnp.dot(
            weights.astype(values.dtype), values, preferred_element_type=jnp.float32
        )
        running_sum = running_sum * correction + jnp.sum(weights, axis=1)
        return acc, new_max, running_sum

    acc, running_max, running_sum = jax.lax.fori_loop(
        0, blocks_per_split, body, (acc, running_max, running_sum)
    )
    out_ref[...] = acc.astype(out_ref.dtype)
    max_ref[...] = running_max
    sum_ref[...] = running_sum

    @pl.when(first & (position >= 0))  # a negative position (padding) is never stored
    def _write_new_entry():
        key_cache_out_ref[pl.ds(slot, 1), :] = new_key[None, :].astype(key_cache_out_ref.dtype)
        value_cache_out_ref[pl.ds(slot, 1), :] = new_value[None, :].astype(
            value_cache_out_ref.dtype
        )


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def supported(head_dim: int, heads_per_kv_head: int) -> bool:
    """Whether the kernel handles this shape (Triton tiles need powers of two)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0 and heads_per_kv_head <= 128


@functools.partial(
    jax.jit,
    static_argnames=(
        "scale",
        "window",
        "splits",
        "block_k",
        "num_warps",
        "num_stages",
        "interpret",
    ),
)
def decode_attention(
    query: jax.Array,
    new_key: jax.Array,
    new_value: jax.Array,
    position: jax.Array,
    cache_positions: jax.Array,
    key_cache: jax.Array,
    value_cache: jax.Array,
    *,
    scale: float,
    window: int | None = None,
    splits: int = 1,
    block_k: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Attention of one new token per row over a KV cache, writing the new entry.

    Args:
      query: [batch, heads, head_dim], after the query norm and RoPE.
      new_key, new_value: [batch, kv_heads, head_dim], the new token's key (after norm and
        RoPE) and value.
      position: [batch] int32, the new token's position (>= 0); it is written at slot
        ``position % length``.
      cache_positions: [batch, length] int32, the position held by each slot (-1 if empty),
        *before* this step. (The caller updates it; the kernel only reads it.)
      key_cache, value_cache: [batch, length, kv_heads, head_dim].
      scale: multiplies the scores.
      window: a sliding window of this many keys (the query included), or None.
      splits: how many programs share the keys of one row (partial softmaxes combined after).
      block_k: keys per block in the inner loop (a power of two).

    Returns:
      ``(z, key_cache, value_cache)``: z is [batch, heads, head_dim] in the query's dtype;
      the caches are the inputs with the new entry written (in place under ``jax.jit`` when
      the inputs are donated or are loop carries).
    """
    batch, heads, head_dim = query.shape
    _, length, kv_heads, _ = key_cache.shape
    group = heads // kv_heads
    rows = max(16, _next_power_of_two(group))
    grouped = query.reshape(batch, kv_heads, group, head_dim)
    blocks_per_split = pl.cdiv(pl.cdiv(length, splits), block_k)
    kernel = functools.partial(
        _kernel,
        scale=scale,
        window=window,
        block_k=block_k,
        blocks_per_split=blocks_per_split,
        length=length,
        group=group,
    )
    row_head = lambda b, h, s: (b, h, 0)  # noqa: E731
    cache_spec = pl.BlockSpec((None, length, None, head_dim), lambda b, h, s: (b, 0, h, 0))
    out, running_max, running_sum, key_cache, value_cache = pl.pallas_call(
        kernel,
        grid=(batch, kv_heads, splits),
        in_specs=[
            pl.BlockSpec((None, None, rows, head_dim), lambda b, h, s: (b, h, 0, 0)),
            pl.BlockSpec((None, None, head_dim), row_head),
            pl.BlockSpec((None, None, head_dim), row_head),
            pl.BlockSpec((None,), lambda b, h, s: (b,)),
            pl.BlockSpec((None, length), lambda b, h, s: (b, 0)),
            cache_spec,
            cache_spec,
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rows, head_dim), lambda b, h, s: (s, b, h, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda b, h, s: (s, b, h, 0)),
            pl.BlockSpec((None, None, None, rows), lambda b, h, s: (s, b, h, 0)),
            cache_spec,
            cache_spec,
        ],
        out_shape=[
            jax.ShapeDtypeStruct((splits, batch, kv_heads, rows, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((splits, batch, kv_heads, rows), jnp.float32),
            jax.ShapeDtypeStruct((splits, batch, kv_heads, rows), jnp.float32),
            jax.ShapeDtypeStruct(key_cache.shape, key_cache.dtype),
            jax.ShapeDtypeStruct(value_cache.shape, value_cache.dtype),
        ],
        input_output_aliases={5: 3, 6: 4},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="gemmalens_decode_attention",
    )(grouped, new_key, new_value, position, cache_positions, key_cache, value_cache)
    # Combine the splits' partial softmaxes (one small fusion).
    overall_max = jnp.max(running_max, axis=0)
    weight = jnp.exp(running_max - overall_max[None])
    total = jnp.sum(running_sum * weight, axis=0)
    z = jnp.sum(out * weight[..., None], axis=0) / total[..., None]
    z = z[:, :, :group].reshape(batch, heads, head_dim).astype(query.dtype)
    return z, key_cache, value_cache


def launch_settings(length: int, head_dim: int = 256, itemsize: int = 2) -> dict:
    """Split and block sizes for a cache of ``length`` keys (tuned on an H100 in bfloat16).

    Blocks of keys and values, times the pipeline's three stages, must fit in shared
    memory: wider heads or float32 caches get fewer keys per block."""
    block_k = 64 if length >= 64 else 16
    stages = 3
    while block_k > 16 and stages * block_k * head_dim * itemsize * 2 > _SHARED_MEMORY_BUDGET:
        block_k //= 2
    splits = max(1, min(8, length // 192))
    return dict(splits=splits, block_k=block_k, num_stages=stages)
