"""Rotary position embeddings (rotate-half pairing, as in transformers)."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax.numpy as jnp
import numpy as np
from penzai import pz

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

        def rotate(v, position):
            angles = position.astype(jnp.float32) * inv_freq
            angles = jnp.concatenate([angles, angles])
            cos = jnp.cos(angles).astype(v.dtype)
            sin = jnp.sin(angles).astype(v.dtype)
            half = head_dim // 2
            rotated_half = jnp.concatenate([-v[half:], v[:half]])
            return v * cos + rotated_half * sin

        return pz.nx.nmap(rotate)(x.untag(self.axis), positions).tag(self.axis)


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
