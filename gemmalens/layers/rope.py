"""Rotary position embeddings (rotate-half pairing, as in transformers): over a token's
position (`ApplyRoPE`), or over a patch's (x, y) place in an image grid (`AxialRoPE`,
Gemma 4's vision tower)."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from gemmalens.layers.direct import aligned, plain

RopeType = Literal["default", "linear", "proportional"]


def inverse_frequencies(
    head_dim: int,
    theta: float,
    rope_type: RopeType = "default",
    factor: float = 1.0,
    partial_rotary_factor: float = 1.0,
) -> np.ndarray:
    """Per-pair inverse frequencies, float32, shape [head_dim // 2].

    * ``default``: ``theta ** (-2j / head_dim)``.
    * ``linear``: the same divided by ``factor`` (positions stretched by ``factor``).
    * ``proportional``: only the first ``int(partial_rotary_factor * head_dim // 2)`` pairs
      rotate (their exponent still uses the full ``head_dim``); the rest get frequency 0,
      i.e. pass through unchanged. Then divided by ``factor``.
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)
    if rope_type == "proportional":
        rotated = int(partial_rotary_factor * head_dim // 2)
        inv_freq[rotated:] = 0.0
    if rope_type in ("linear", "proportional"):
        inv_freq = inv_freq / np.float32(factor)
    return inv_freq.astype(np.float32)


# The side input that holds each token's (x, y) grid position (named axes ``batch``,
# ``seq``, ``xy``), read by `AxialRoPE`.
GRID_POSITIONS = "grid_positions"


def rotate_pairs(
    v: jax.Array, position: jax.Array, inv_freq: jax.Array, axis: int = -1
) -> jax.Array:
    """``v`` rotated by ``position`` along ``axis`` (of size ``d``): pairs ``(j, j + d/2)``
    turn by ``position * inv_freq[j]``. ``position`` broadcasts against ``v`` with size 1
    along ``axis`` (a scalar for one vector). cos and sin are computed in float32 and cast
    to ``v``'s dtype, as transformers does."""
    axis = axis % v.ndim
    frequencies = inv_freq.reshape([-1 if i == axis else 1 for i in range(v.ndim)])
    angles = jnp.asarray(position).astype(jnp.float32) * frequencies
    angles = jnp.concatenate([angles, angles], axis=axis)
    cos = jnp.cos(angles).astype(v.dtype)
    sin = jnp.sin(angles).astype(v.dtype)
    first, second = jnp.split(v, 2, axis=axis)
    rotated_half = jnp.concatenate([-second, first], axis=axis)
    return v * cos + rotated_half * sin


@pz.pytree_dataclass
class ApplyRoPE(pz.nn.Layer):
    """Rotates pairs ``(j, j + d/2)`` of ``axis`` by ``position * inv_freq[j]``.

    Positions come from the side input ``token_positions`` (named axes ``batch``, ``seq``).
    cos and sin are computed in float32 and cast to the activation dtype before use, as
    transformers does.
    """

    axis: str = dataclasses.field(metadata={"pytree_node": False})
    theta: float = dataclasses.field(metadata={"pytree_node": False})
    rope_type: RopeType = dataclasses.field(default="default", metadata={"pytree_node": False})
    factor: float = dataclasses.field(default=1.0, metadata={"pytree_node": False})
    partial_rotary_factor: float = dataclasses.field(default=1.0, metadata={"pytree_node": False})

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        positions = side_inputs["token_positions"]
        head_dim = x.named_shape[self.axis]
        inv_freq = jnp.asarray(
            inverse_frequencies(
                head_dim, self.theta, self.rope_type, self.factor, self.partial_rotary_factor
            )
        )

        fast = self._on_the_data(x, positions, inv_freq)
        if fast is not None:
            return fast

        def one(v, position):
            return rotate_pairs(v, position, inv_freq)

        return pz.nx.nmap(one)(x.untag(self.axis), positions).tag(self.axis)

    def _on_the_data(
        self, x: pz.nx.NamedArray, positions: pz.nx.NamedArray, inv_freq: jax.Array
    ) -> pz.nx.NamedArray | None:
        """`rotate_pairs` on ``x``'s array, the positions broadcast over its other axes
        (`gemmalens.layers.direct` says why); None where that does not apply (positional
        axes, views, positions with axes ``x`` lacks)."""
        if not (plain(x) and plain(positions)):
            return None
        names = list(x.named_axes)
        if self.axis in positions.named_axes or not set(positions.named_axes) <= set(names):
            return None
        position = aligned(positions, tuple(names))
        rotated = rotate_pairs(x.data_array, position, inv_freq, axis=names.index(self.axis))
        return pz.nx.NamedArray(named_axes=x.named_axes, data_array=rotated)


@pz.pytree_dataclass
class AxialRoPE(pz.nn.Layer):
    """2-D RoPE over image patches: the first half of ``axis`` rotates by the patch's x, the
    second half by its y, each half as a `ApplyRoPE` of half the width (frequencies
    ``theta ** (-2j / (d/2))``). Positions come from the side input ``grid_positions``
    (named axes ``batch``, ``seq``, ``xy``; Gemma 4 gives padding patches (-1, -1), which
    rotate by -1 as in transformers)."""

    axis: str = dataclasses.field(metadata={"pytree_node": False})
    theta: float = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        if GRID_POSITIONS not in side_inputs:
            raise ValueError(
                f"AxialRoPE needs the side input {GRID_POSITIONS!r}: each token's (x, y) "
                "position, named axes batch, seq, xy."
            )
        half = x.named_shape[self.axis] // 2
        inv_freq = jnp.asarray(inverse_frequencies(half, self.theta))

        def one(v, xy):
            return jnp.concatenate(
                [rotate_pairs(v[:half], xy[0], inv_freq), rotate_pairs(v[half:], xy[1], inv_freq)]
            )

        positions = side_inputs[GRID_POSITIONS].untag("xy")
        return pz.nx.nmap(one)(x.untag(self.axis), positions).tag(self.axis)


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """RoPE of one layer type, as a config: base frequency, scaling, rotated fraction.

    ``rope_type`` is ``default``, ``linear`` (positions divided by ``factor``) or
    ``proportional`` (only the first ``partial_rotary_factor`` of the pairs rotate; their
    frequencies still use the full head dim).
    """

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    partial_rotary_factor: float = 1.0

    def layer(self, axis: str = "head_dim") -> ApplyRoPE:
        """The `ApplyRoPE` layer for this config."""
        return ApplyRoPE(
            axis=axis,
            theta=self.theta,
            rope_type=self.rope_type,
            factor=self.factor,
            partial_rotary_factor=self.partial_rotary_factor,
        )


@dataclasses.dataclass(frozen=True)
class AxialRopeConfig:
    """2-D RoPE over an image's patch grid (transformers' ``rope_type="axial"``), as a
    config: `layer` makes the `AxialRoPE`. Gemma 4's vision tower uses theta 100."""

    theta: float = 100.0

    def layer(self, axis: str = "head_dim") -> AxialRoPE:
        return AxialRoPE(axis=axis, theta=self.theta)
