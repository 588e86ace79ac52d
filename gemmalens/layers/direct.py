"""Named-axis arithmetic computed on the arrays directly, for quick tracing.

Penzai computes on named arrays through ``nmap``, which traces one ``vmap`` per named
axis. The program is the same, but tracing it is slow: the projections, residual sums,
norms and RoPE were most of a small model's first call on the CPU, and two thirds of the
tracing of a stacked model. Here the same operations are written on the underlying arrays
wherever the inputs are plain named arrays (`pz.nx.NamedArray`); anything else (views,
positional axes, unexpected shapes) takes penzai's own path, with its checks and messages.

- `Linear`: `pz.nn.Linear` whose contraction is one ``dot_general`` (`dot`);
- `Residual`: `pz.nn.Residual` whose sum is one ``add``;
- `elementwise` (and `add`, `subtract`, `multiply`): ``fn`` on the arrays, broadcast by
  axis name; `take`: one index along a named axis; `along`: a function of one named axis
  (a norm's statistics, a softmax); `dot` and `contract`: contractions; `renamed`: an axis
  renamed.
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


def _scalar(value: Any) -> bool:
    """A Python number or a 0-d array: what an elementwise function broadcasts as it is."""
    if isinstance(value, (pz.nx.NamedArray, pz.nx.NamedArrayView)):
        return False
    return isinstance(value, (int, float, bool)) or getattr(value, "ndim", None) == 0


def elementwise(fn: Callable[..., jax.Array], *args: Any) -> pz.nx.NamedArray:
    """``pz.nx.nmap(fn)(*args)`` for an elementwise ``fn``: on the arrays themselves when
    every named argument is plain (the others Python numbers or 0-d arrays), broadcasting
    by axis name as ``nmap`` does (axes in any order; an axis one argument lacks is
    broadcast), else through ``nmap`` (also for its message about mismatched sizes)."""
    named = [a for a in args if plain(a)]
    sizes: dict[str, int] = {}
    fast = bool(named) and all(plain(a) or _scalar(a) for a in args)
    for array in named if fast else ():
        for name, size in array.named_axes.items():
            fast = fast and sizes.setdefault(name, size) == size
    if not fast:
        return pz.nx.nmap(fn)(*args)
    names = tuple(sizes)
    return pz.nx.NamedArray(
        named_axes=collections.OrderedDict(sizes.items()),
        data_array=fn(*(aligned(a, names) for a in args)),
    )


def aligned(value: Any, names: tuple[str, ...]) -> Any:
    """A plain named array's data with its axes in the order of ``names`` and a new axis of
    size 1 for each name it lacks (so that arrays broadcast by name); anything else as it
    is."""
    if not isinstance(value, pz.nx.NamedArray):
        return value
    own = tuple(name for name in names if name in value.named_axes)
    data = value.data_array if tuple(value.named_axes) == own else value.unwrap(*own)
    if len(own) < len(names):
        data = data[tuple(slice(None) if name in value.named_axes else None for name in names)]
    return data


def renamed(array: pz.nx.NamedArray, old: str, new: str) -> pz.nx.NamedArray:
    """``array`` with its named axis ``old`` called ``new`` (the same data):
    ``array.untag(old).tag(new)`` without the view."""
    if not plain(array):
        return array.untag(old).tag(new)
    axes = collections.OrderedDict((new if n == old else n, s) for n, s in array.named_axes.items())
    return pz.nx.NamedArray(named_axes=axes, data_array=array.data_array)


def add(a: Any, b: Any) -> pz.nx.NamedArray:
    """``a + b`` (`elementwise`)."""
    return elementwise(jnp.add, a, b)


def subtract(a: Any, b: Any) -> pz.nx.NamedArray:
    """``a - b`` (`elementwise`)."""
    return elementwise(jnp.subtract, a, b)


def multiply(a: Any, b: Any) -> pz.nx.NamedArray:
    """``a * b`` (`elementwise`)."""
    return elementwise(jnp.multiply, a, b)


def contract(a: pz.nx.NamedArray, b: pz.nx.NamedArray, axis: str) -> pz.nx.NamedArray:
    """The sum over the named axis ``axis`` of ``a * b``, other shared axes element by
    element: `dot`, or penzai's ``nmap(jnp.dot)`` where that does not apply."""
    out = dot(a, b, (axis,))
    if out is None:
        out = pz.nx.nmap(jnp.dot)(a.untag(axis), b.untag(axis))
    return out


def take(array: pz.nx.NamedArray, axis: str, index: Any) -> pz.nx.NamedArray:
    """``array[{axis: index}]`` for one index (an int or a 0-d integer array, as numpy
    indexes): the named axis ``axis`` removed."""
    if not (plain(array) and axis in array.named_axes and _scalar(index)):
        return array[{axis: index}]
    position = tuple(array.named_axes).index(axis)
    data = array.data_array[(slice(None),) * position + (index,)]
    axes = collections.OrderedDict((n, s) for n, s in array.named_axes.items() if n != axis)
    return pz.nx.NamedArray(named_axes=axes, data_array=data)


def along(
    fn: Callable[[jax.Array], jax.Array],
    array: pz.nx.NamedArray,
    axis: str,
    new_axis: str | None = None,
) -> Any:
    """``fn`` applied along the named axis ``axis``: ``fn`` takes an array whose last
    axis is ``axis`` (and must treat any leading axes elementwise, as ``jnp.mean(v, -1)``
    does) and returns the same leading shape with a last axis (of any length, named
    ``new_axis``, by default ``axis``) or without one (the axis is reduced).
    ``pz.nx.nmap(fn)(array.untag(axis))``, tagged ``new_axis`` when an axis is left, for
    inputs that are not plain."""
    new_axis = new_axis or axis
    if not (plain(array) and axis in array.named_axes):
        out = pz.nx.nmap(fn)(array.untag(axis))
        return out.tag(new_axis) if out.positional_shape else out
    others = tuple(name for name in array.named_axes if name != axis)
    data = array.unwrap(*others, axis)
    out = fn(data)
    if out.shape[: len(others)] != data.shape[:-1] or out.ndim not in (len(others), data.ndim):
        raise ValueError(
            f"direct.along expects a function of the last axis ({axis!r}) that keeps the "
            f"others; it turned shape {data.shape} into {out.shape}. Use pz.nx.nmap for "
            "other functions."
        )
    sizes = {name: array.named_axes[name] for name in others}
    if out.ndim == data.ndim:
        sizes[new_axis] = out.shape[-1]
    return pz.nx.NamedArray(named_axes=collections.OrderedDict(sizes.items()), data_array=out)


def dot(left: pz.nx.NamedArray, right: pz.nx.NamedArray, contracted: tuple[str, ...]) -> Any:
    """The sum over the named axes ``contracted`` of ``left * right``, element by element
    over the other axes both share: one ``dot_general`` (in the two arrays' promoted
    dtype), its result's axes the shared ones, then ``left``'s, then ``right``'s. None
    where it does not apply (an array not plain, a contracted axis missing from either, or
    axes whose sizes differ): the caller then takes penzai's path."""
    if not (plain(left) and plain(right)):
        return None
    a, b = left.named_axes, right.named_axes
    if any(name not in a or a[name] != b.get(name) for name in contracted):
        return None
    if any(a[name] != b[name] for name in a if name in b):
        return None
    shared = [name for name in a if name in b and name not in contracted]
    left_free = [name for name in a if name not in b]
    right_free = [name for name in b if name not in a]
    a_names, b_names = list(a), list(b)

    def at(names: list[str], chosen: list[str] | tuple[str, ...]) -> tuple[int, ...]:
        return tuple(names.index(name) for name in chosen)

    dtype = jnp.result_type(left.data_array, right.data_array)
    out = jax.lax.dot_general(
        left.data_array.astype(dtype),
        right.data_array.astype(dtype),
        (
            (at(a_names, contracted), at(b_names, contracted)),
            (at(a_names, shared), at(b_names, shared)),
        ),
    )
    sizes = {**a, **b}
    return pz.nx.NamedArray(
        named_axes=collections.OrderedDict((n, sizes[n]) for n in shared + left_free + right_free),
        data_array=out,
    )


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
        out = None
        if plain(in_array) and not any(n in in_array.named_axes for n in self.out_axis_names):
            out = dot(in_array, weights, self.in_axis_names)
        return super().__call__(in_array, **side_inputs) if out is None else out


@pz.pytree_dataclass
class Residual(pz.nn.Residual):
    """`pz.nn.Residual`: ``value + delta(value)``, the sum as one ``add`` on the arrays."""

    delta: pz.nn.Layer

    def __call__(self, value: Any, **side_inputs: Any) -> Any:
        delta = self.delta(value, **side_inputs)
        if plain(value) and plain(delta):
            return elementwise(jnp.add, value, delta)
        return value + delta
