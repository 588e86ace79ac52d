"""Token embedding (scaled by sqrt(d_model)), tied unembedding, and logit soft-capping."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
from penzai import pz


@pz.pytree_dataclass
class EmbedTokens(pz.nn.Layer):
    """Looks tokens up in the embedding table and multiplies by ``sqrt(d_model)``.

    The multiplier is rounded to the table's dtype first, as in transformers: in bfloat16
    ``sqrt(1152)`` becomes 34.0, not 33.94.
    """

    table: pz.nn.ParameterLike[pz.nx.NamedArray]
    scale: float = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, tokens: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        table = self.table.value
        embedded = pz.nx.nmap(lambda t, i: jnp.take(t, i, axis=0))(table.untag("vocab"), tokens)
        return embedded * jnp.asarray(self.scale, jnp.float32).astype(table.dtype)

    @classmethod
    def with_model_width(cls, table: pz.Parameter, d_model: int) -> EmbedTokens:
        return cls(table=table, scale=math.sqrt(d_model))


@pz.pytree_dataclass
class TiedUnembed(pz.nn.Layer):
    """Logits from the *unscaled* embedding table: ``logits = h @ E.T``."""

    table: pz.nn.ParameterLike[pz.nx.NamedArray]

    def __call__(self, h: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        return pz.nx.nmap(jnp.dot)(h.untag("embedding"), self.table.value.untag("embedding"))


@pz.pytree_dataclass
class TanhSoftCap(pz.nn.Layer):
    """``cap * tanh(x / cap)``: bounds logits smoothly to (-cap, cap)."""

    cap: float = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        cap = jnp.asarray(self.cap, x.dtype)
        return pz.nx.nmap(jnp.tanh)(x / cap) * cap
