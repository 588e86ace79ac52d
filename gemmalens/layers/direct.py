"""Named-axis arithmetic computed on the arrays directly, for quick tracing.

Penzai computes on named arrays through ``nmap``, which traces one ``vmap`` per named
axis. The program is the same, but tracing it is slow: the projections, residual sums,
norms and RoPE were most of a small model's first call on the CPU, and two thirds of the
tracing of a stacked model. Here the same operations are written on the underlying arrays
wherever the inputs are plain named arrays (`pz.nx.NamedArray`); anything else (views,
positional axes, unexpected shapes) takes penzai's own path, with its checks and messages.

- `Linear`: `pz.nn.Linear` whose contraction is one ``dot_general``;
- `Residual`: `pz.nn.Residual` whose sum is one ``add``;
- `elementwise`: ``fn`` on arrays whose named axes agree, ``nmap`` otherwise.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from penzai import pz


def plain(array: Any) -> bool:
    """Whether ``array`` is a `pz.nx.NamedArray` with named axes only (not a view)."""
    return isinstance(array, pz.nx.NamedArray) and not array.positional_shape


def elementwise(fn: Callable[..., jax.Array], *arrays: pz.nx.NamedArray) -> pz.nx.NamedArray:
    """``pz.nx.nmap(fn)(*arrays)`` for an elementwise ``fn``: on the arrays themselves when
    every argument is plain and names the same axes (any order: the others are transposed
    to the first's), else through ``nmap``."""
    first = arrays[0]
    if not all(plain(a) and a.named_axes == dict(first.named_axes) for a in arrays):
        return pz.nx.nmap(fn)(*arrays)  # also for nmap's message about mismatched sizes
    names = tuple(first.named_axes)
    data = [a.data_array if tuple(a.named_axes) == names else a.unwrap(*names) for a in arrays]
    return pz.nx.NamedArray(named_axes=first.named_axes, data_array=fn(*data))


@pz.pytree_dataclass
class Linear(pz.nn.Linear):
    """`pz.nn.Linear` (contracts ``in_axis_names``, adds ``out_axis_names``; axes the
    input and the weights share are kept, element by element), with its contraction as
    one ``dot_general``. Inputs it does not expect go to `pz.nn.Linear`'s own call, for its
    checks and messages."""

    # penzai asks a subclass to restate its fields.
    weights: pz.nn.ParameterLike[pz.nx.NamedArray]
    in_axis_names: tuple[str, ...] = dataclasses.field(metadata={"pytree_node": False})
    out_axis_names: tuple[str, ...] = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, in_array: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        weights = self.weights.value
        if not (plain(in_array) and plain(weights)):
            return super().__call__(in_array, **side_inputs)
        left, right = in_array.named_axes, weights.named_axes
        contracted = self.in_axis_names
        if (
            any(name not in left or left[name] != right.get(name) for name in contracted)
            or any(name in left for name in self.out_axis_names)
            or any(left[name] != right[name] for name in left if name in right)
        ):
            return super().__call__(in_array, **side_inputs)
        shared = [name for name in left if name in right and name not in contracted]
        left_free = [name for name in left if name not in right]
        right_free = [name for name in right if name not in left]
        left_names, right_names = list(left), list(right)

        def at(names, chosen):
            return tuple(names.index(name) for name in chosen)

        dtype = jnp.result_type(in_array.data_array, weights.data_array)
        out = jax.lax.dot_general(
            in_array.data_array.astype(dtype),
            weights.data_array.astype(dtype),
            (
                (at(left_names, contracted), at(right_names, contracted)),
                (at(left_names, shared), at(right_names, shared)),
            ),
        )
        sizes = {**left, **right}
        return pz.nx.NamedArray(
            named_axes=collections.OrderedDict(
                (name, sizes[name]) for name in shared + left_free + right_free
            ),
            data_array=out,
        )


@pz.pytree_dataclass
class Residual(pz.nn.Residual):
    """`pz.nn.Residual`: ``value + delta(value)``, the sum as one ``add`` on the arrays."""

    delta: pz.nn.Layer

    def __call__(self, value: Any, **side_inputs: Any) -> Any:
        delta = self.delta(value, **side_inputs)
        if plain(value) and plain(delta):
            return elementwise(jnp.add, value, delta)
        return value + delta
