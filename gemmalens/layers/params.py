"""Where parameter values come from.

Every builder in gemmalens asks a `ParamSource` for each parameter by label and named
shape. The same builder therefore makes a random model (`RandomInit`), a model read from
a checkpoint (`gemmalens.checkpoints`), or only the list of shapes (`ShapeOnly`, used to
count parameters and to validate a checkpoint before anything is read).

Axes are given as two ordered dicts, ``out_axes`` then ``in_axes``. The value's positional
layout is ``(*out_axes, *in_axes)``, which is exactly a torch ``nn.Linear`` weight
``[out, in]`` reshaped: checkpoint readers only need to reshape, never transpose. A
convolution kernel (``layout="conv"``) is stored with every axis kept, as torch's
``[out, in_channels, kernel_h, kernel_w]``; so is a raw tensor (``layout="raw"``: a table of
more than two axes, a 0-d buffer).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from collections.abc import Callable, Hashable
from typing import Any, Literal, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from gemmalens import sharding
from gemmalens.layers.direct import Linear
from gemmalens.layers.hooks import HookPoint

# "inf" / "-inf": bounds that clip nothing (Gemma 4's clipped linears before training).
Init = Literal["normal", "zeros", "ones", "inf", "-inf"]
# How a checkpoint stores the value: "linear" flattens to [out] or [out, in]; "conv" keeps
# every axis ([out, in_channels, kernel_h, kernel_w]); "raw" keeps every axis of a tensor
# stored as it is used ([2, positions, embedding]; a 0-d scalar as shape ()).
Layout = Literal["linear", "conv", "raw"]


@dataclasses.dataclass(frozen=True)
class ParamRequest:
    """One parameter a builder asks for."""

    label: str
    out_axes: dict[str, int]
    in_axes: dict[str, int]
    init: Init
    layout: Layout = "linear"

    @property
    def axes(self) -> dict[str, int]:
        return {**self.out_axes, **self.in_axes}

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.axes.values())

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def linear_shape(self) -> tuple[int, ...]:
        """The shape as a Hugging Face checkpoint stores it: [out] or [out, in] (a ``conv``
        kernel or a raw tensor: every axis, ``[out, in_channels, kernel_h, kernel_w]``)."""
        if self.layout in ("conv", "raw"):
            return self.shape
        out = math.prod(self.out_axes.values())
        if not self.in_axes:
            return (out,)
        return (out, math.prod(self.in_axes.values()))


class ParamSource(Protocol):
    """Supplies the value of each parameter a builder asks for."""

    dtype: jnp.dtype

    def __call__(self, request: ParamRequest) -> pz.Parameter: ...


def _wrap(request: ParamRequest, value: jax.Array) -> pz.Parameter:
    return pz.Parameter(
        value=pz.nx.wrap(value).tag(*request.axes.keys()),
        label=request.label,
    )


@functools.partial(jax.jit, donate_argnums=0)
def _write_layer(stack: jax.Array, value: jax.Array, index: int) -> jax.Array:
    return stack.at[index].set(value)


def _draw(init: Init, shape: tuple[int, ...], dtype: Any, std: float, key: jax.Array) -> jax.Array:
    """`RandomInit`'s value of a parameter (traceable)."""
    if init == "zeros":
        return jnp.zeros(shape, dtype)
    if init == "ones":
        return jnp.ones(shape, dtype)
    if init in ("inf", "-inf"):
        return jnp.full(shape, float(init), dtype)
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


@functools.cache
def _placed_draw(init: Init, shape: tuple[int, ...], dtype: Any, std: float, placed: Any) -> Any:
    """``draw(key)``: `_draw`'s value made straight into ``placed`` (a parameter's sharding);
    one program per kind of parameter, not one per parameter."""
    return jax.jit(lambda key: _draw(init, shape, dtype, std, key), out_shardings=placed)


@functools.cache
def _placed_zeros(shape: tuple[int, ...], dtype: Any, placed: Any) -> Any:
    """``make()``: zeros of ``shape`` straight into ``placed`` (a stack to write into)."""
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=placed)


@functools.cache
def _placed_writer(init: Init, shape: tuple[int, ...], dtype: Any, std: float, placed: Any) -> Any:
    """``write(stack, key, index)``: the stack (placed by ``placed``) with layer ``index``
    set to `_draw`'s value, made inside the program; one program per kind of layer, not
    one per layer."""

    def write(stack: jax.Array, key: jax.Array, index: jax.Array) -> jax.Array:
        return stack.at[index].set(_draw(init, shape, dtype, std, key))

    return jax.jit(write, donate_argnums=0, out_shardings=placed)


@dataclasses.dataclass
class RandomInit:
    """Random initialisation: normal(0, std) for matrices, zeros/ones where asked.

    Each parameter's key is derived from the seed and its label, so a model's weights do
    not depend on the order in which a builder asks for them.
    """

    seed: int = 0
    dtype: jnp.dtype = jnp.float32
    std: float = 0.02

    def value(self, request: ParamRequest) -> jax.Array:
        """The parameter's initial value (traceable: `stack` runs it inside one program)."""
        return _draw(request.init, request.shape, self.dtype, self.std, self.key(request))

    def key(self, request: ParamRequest) -> jax.Array:
        """The random key of the parameter's value, from the seed and its label."""
        return pz.nn.derive_param_key(jax.random.key(self.seed), request.label)

    def __call__(self, request: ParamRequest) -> pz.Parameter:
        placement = sharding.active()
        if placement is None:
            return _wrap(request, self.value(request))
        draw = _placed_draw(
            request.init,
            tuple(request.shape),
            jnp.dtype(self.dtype),
            self.std,
            placement.sharding(request.axes),
        )
        return _wrap(request, draw(self.key(request)))

    def stack(self, requests: list[ParamRequest]) -> jax.Array:
        """The values of ``requests`` (one per layer, one shape) stacked ``[layer, ...]``
        (`stacking.build_stacked`): the stack is allocated in one piece first, then each
        layer's value, made exactly as `__call__` makes it, is written into it. Inside
        `sharding.placing`, the stack is allocated in its placed layout
        (`sharding.Placement.stack_sharding`) and each layer's value is made and written
        by one program that outputs that layout (each device its own slice, where XLA
        partitions the random draw: JAX's default partitionable threefry), never on one
        device first."""
        shape = (len(requests), *requests[0].shape)
        placement = sharding.active()
        if placement is None:
            stack = jnp.zeros(shape, self.dtype)
            for index, request in enumerate(requests):
                stack = _write_layer(stack, self.value(request), index)
            return stack
        placed = placement.stack_sharding(requests[0].axes)
        stack = _placed_zeros(shape, jnp.dtype(self.dtype), placed)()
        for index, request in enumerate(requests):
            write = _placed_writer(
                request.init, request.shape, jnp.dtype(self.dtype), self.std, placed
            )
            stack = write(stack, self.key(request), index)
        return stack


@dataclasses.dataclass
class ShapeOnly:
    """Records every request and returns placeholders: nothing is allocated."""

    dtype: jnp.dtype = jnp.float32
    requests: list[ParamRequest] = dataclasses.field(default_factory=list)

    def __call__(self, request: ParamRequest) -> pz.Parameter:
        self.requests.append(request)
        placeholder = pz.nx.NamedArray(
            named_axes=collections.OrderedDict(request.axes),
            data_array=jax.ShapeDtypeStruct(request.shape, self.dtype),
        )
        return pz.ParameterValue(value=placeholder, label=request.label)


class CountsParameters:
    """For architecture configs with a ``build(source)`` method: ``num_params()`` builds
    with `ShapeOnly`, so counting a 27B model allocates nothing."""

    def num_params(self) -> int:
        """Parameter count (a tied embedding counted once), computed without allocating."""
        source = ShapeOnly()
        self.build(source)
        return sum(r.size for r in source.requests if self.counts_as_parameter(r.label))

    def counts_as_parameter(self, label: str) -> bool:
        """Whether ``num_params`` counts this parameter (all, unless a family says not)."""
        return True


def apply_once(selection: Any, key: Callable[[Any], Hashable], fn: Callable[[Any], Any]) -> Any:
    """``selection.apply(fn)`` calling ``fn`` once per ``key``: what stands at several places
    in a model (T5Gemma 2's decoder reads keys through one ``k_proj`` twice) stays one object
    in the result, so the parameters it holds stay shared."""
    done: dict[Hashable, Any] = {}

    def once(value: Any) -> Any:
        k = key(value)
        if k not in done:
            done[k] = fn(value)
        return done[k]

    return selection.apply(once)


def cast_parameters(
    tree: pz.nn.Layer, dtype: Any, where: Callable[[pz.Parameter], bool] | None = None
) -> pz.nn.Layer:
    """``tree`` with its parameters (those ``where`` accepts; all when None) converted to
    ``dtype`` under their labels. A parameter that stands at several places stays one
    (`apply_once`)."""
    selection = pz.select(tree).at_instances_of(pz.Parameter)
    if where is not None:
        selection = selection.where(where)

    def convert(param: pz.Parameter) -> pz.Parameter:
        return pz.Parameter(value=param.value.astype(dtype), label=param.label)

    return apply_once(selection, lambda param: param.label, convert)


def from_numpy(request: ParamRequest, array: np.ndarray, dtype: jnp.dtype) -> pz.Parameter:
    """Wraps a checkpoint array (already in ``linear_shape`` layout) as a parameter."""
    host = np.asarray(array).reshape(request.shape)  # a view of the memory map
    placement = sharding.active()
    if placement is None:
        return _wrap(request, jnp.asarray(host, dtype=dtype))
    return _wrap(request, placement.put(request.axes, host, dtype))


class ParamBuilder:
    """Small helper that builders use to ask for parameters with a label prefix."""

    def __init__(self, source: ParamSource, prefix: str = ""):
        self.source = source
        self.prefix = prefix

    @property
    def dtype(self) -> jnp.dtype:
        return self.source.dtype

    def scope(self, name: str) -> ParamBuilder:
        return ParamBuilder(self.source, f"{self.prefix}{name}.")

    def __call__(
        self,
        name: str,
        out_axes: dict[str, int],
        in_axes: dict[str, int] | None = None,
        init: Init = "normal",
        layout: Layout = "linear",
    ) -> pz.Parameter:
        return self.source(
            ParamRequest(self.prefix + name, dict(out_axes), dict(in_axes or {}), init, layout)
        )

    def hook(self, name: str, axes: tuple[str, ...]) -> HookPoint:
        """A hook point named in this scope: ``scope("blocks.3").hook("hook_resid_pre")``
        is ``blocks.3.hook_resid_pre``, beside the parameters ``blocks.3.*``."""
        return HookPoint(self.prefix + name, axes)

    def linear(
        self,
        name: str,
        out_axes: dict[str, int],
        in_axes: dict[str, int],
        layout: Layout = "linear",
    ) -> pz.nn.Linear:
        """A bias-free linear layer (`gemmalens.layers.direct.Linear`, penzai's
        `pz.nn.Linear` traced faster) whose weights are labelled ``{name}.weights``."""
        return Linear(
            weights=self(f"{name}.weights", out_axes, in_axes, layout=layout),
            in_axis_names=tuple(in_axes),
            out_axis_names=tuple(out_axes),
        )

    def affine(
        self,
        name: str,
        out_axes: dict[str, int],
        in_axes: dict[str, int],
        layout: Layout = "linear",
    ) -> pz.nn.Affine:
        """`linear` followed by a bias labelled ``{name}.bias`` over ``out_axes`` (SigLIP's
        projections, which have biases where Gemma's have none)."""
        return pz.nn.Affine(
            [
                self.linear(name, out_axes, in_axes, layout),
                pz.nn.AddBias(bias=self(f"{name}.bias", out_axes, init="zeros"), new_axis_names=()),
            ]
        )
