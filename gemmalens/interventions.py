"""Ready-made interventions: each returns a ``{hook name: fn}`` dict for `Model.run_with_hooks`.

::

    from gemmalens import interventions as iv
    logits = m.run_with_hooks(tokens, iv.ablate_heads(3, [0, 2]))
    logits = m.run_with_hooks(tokens, iv.combine(iv.ablate_neurons(1, 17), iv.add_vector(4, v)))

An encoder-decoder's blocks are named by their stack: pass ``stack="encoder"`` or
``stack="decoder"`` (T5Gemma 2). Gemma 4's expert interventions (`force_expert`,
`forbid_expert`, `ablate_expert`) live with the family and are re-exported here.

Heads, neurons and positions are checked against the hook value's axis when the hooks run:
negative ones count from the end, and one outside the axis is an IndexError that names the
hook and its size (JAX's own indexing would drop such an update and change nothing).

Hook functions are part of the compiled program's static structure, so a new dict (or a
new array captured in one) compiles again; keep the dict to rerun it without recompiling.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from gemmalens.families.gemma4 import ablate_expert, forbid_expert, force_expert
from gemmalens.layers.hooks import HookFn, checked_indices

__all__ = [
    "ablate_expert",
    "ablate_heads",
    "ablate_neurons",
    "add_vector",
    "combine",
    "forbid_expert",
    "force_expert",
    "replace_with",
]

HookDict = dict[str, HookFn]


def _block(layer: int, stack: str | None) -> str:
    """The hook-name prefix of block ``layer``: ``blocks.3``, or ``decoder.blocks.3``."""
    return f"{stack}.blocks.{layer}" if stack else f"blocks.{layer}"


def ablate_heads(
    layer: int,
    heads: int | Iterable[int],
    replacement: jax.Array | None = None,
    *,
    stack: str | None = None,
) -> HookDict:
    """Ablates attention heads of block ``layer`` through ``blocks.{layer}.attn.hook_z``
    (an encoder-decoder's: ``stack="encoder"`` or ``"decoder"``, ``decoder.blocks...``).

    ``replacement`` None sets the heads' ``z`` to zero (so they write nothing before the
    post-attention norm). For mean ablation pass a mean of cached ``hook_z`` values, e.g.
    ``cache["z", layer].mean(0)`` (``[pos, head, d_head]``) or ``.mean((0, 1))``
    (``[head, d_head]``); the chosen heads' entries of it are used.
    """

    def fn(z: jax.Array, name: str) -> jax.Array:
        index = checked_indices(heads, z.shape[2], "head", repr(name))
        if replacement is None:
            return z.at[:, :, index].set(0)
        # [head, d_head] or [pos, head, d_head] -> [pos, head, d_head], same for every row.
        new = jnp.broadcast_to(jnp.asarray(replacement, z.dtype), z.shape[1:])
        return z.at[:, :, index].set(jnp.broadcast_to(new[:, index], z[:, :, index].shape))

    return {f"{_block(layer, stack)}.attn.hook_z": fn}


def ablate_neurons(
    layer: int,
    neurons: int | Iterable[int],
    replacement: jax.Array | None = None,
    *,
    stack: str | None = None,
) -> HookDict:
    """Ablates MLP neurons of block ``layer`` through ``blocks.{layer}.mlp.hook_post``
    (``stack`` as in `ablate_heads`).

    ``replacement`` None zeroes them; otherwise a mean of cached ``hook_post`` values,
    ``[pos, d_mlp]`` or ``[d_mlp]``, whose chosen neurons' entries are used.
    """

    def fn(post: jax.Array, name: str) -> jax.Array:
        index = checked_indices(neurons, post.shape[-1], "neuron", repr(name))
        if replacement is None:
            return post.at[..., index].set(0)
        new = jnp.broadcast_to(jnp.asarray(replacement, post.dtype), post.shape[1:])
        return post.at[..., index].set(jnp.broadcast_to(new[..., index], post[..., index].shape))

    return {f"{_block(layer, stack)}.mlp.hook_post": fn}


def add_vector(
    layer: int,
    vector: jax.Array,
    coefficient: float = 1.0,
    site: str = "hook_resid_pre",
    positions: int | Sequence[int] | None = None,
    *,
    stack: str | None = None,
) -> HookDict:
    """Adds ``coefficient * vector`` (``[d_model]``) to the residual stream (steering).

    ``site`` is the block's residual hook (``hook_resid_pre``, ``hook_resid_mid`` or
    ``hook_resid_post``); ``positions`` None adds at every position; ``stack`` as in
    `ablate_heads`.
    """
    vector = jnp.asarray(vector)

    def fn(resid: jax.Array, name: str) -> jax.Array:
        if vector.shape != resid.shape[-1:]:
            raise ValueError(
                f"add_vector: the vector has shape {vector.shape}, but '{name}' is "
                f"{resid.shape[-1]} wide; pass a [d_model] = [{resid.shape[-1]}] vector."
            )
        delta = (coefficient * vector).astype(resid.dtype)
        if positions is None:
            return resid + delta
        return resid.at[:, checked_indices(positions, resid.shape[1], "position", repr(name))].add(
            delta
        )

    return {f"{_block(layer, stack)}.{site}": fn}


def replace_with(
    values: Mapping[str, jax.Array],
    names: Iterable[str] | None = None,
    positions: int | Sequence[int] | None = None,
) -> HookDict:
    """Replaces hook values with cached ones (e.g. from another prompt's run_with_cache).

    ``values`` maps hook names to batch-first arrays (an `ActivationCache` works);
    ``names`` restricts which (default: all in ``values``); ``positions`` replaces only
    those positions (axis 1, for ``[batch, pos, ...]`` values).
    """
    chosen = list(values) if names is None else list(names)

    def make(stored: jax.Array) -> HookFn:
        def fn(value: jax.Array, name: str) -> jax.Array:
            new = jnp.asarray(stored, value.dtype)
            if positions is None:
                return new
            index = checked_indices(positions, value.shape[1], "position", repr(name))
            return value.at[:, index].set(new[:, index])

        return fn

    return {name: make(values[name]) for name in chosen}


def combine(*hook_dicts: Mapping[str, HookFn]) -> HookDict:
    """Merges hook dicts; hooks on the same name run one after the other, in order."""
    merged: dict[str, list[HookFn]] = {}
    for hooks in hook_dicts:
        for name, fn in hooks.items():
            merged.setdefault(name, []).append(fn)

    def chain(fns: list[HookFn]) -> HookFn:
        if len(fns) == 1:
            return fns[0]

        def fn(value: jax.Array, name: str) -> Any:
            for f in fns:
                result = f(value, name)
                value = value if result is None else result
            return value

        return fn

    return {name: chain(fns) for name, fns in merged.items()}
