"""Token embedding (scaled by sqrt(d_model)), tied unembedding, and logit soft-capping."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
from penzai import pz

from gemmalens.layers import direct


def take_rows(
    table: pz.nx.NamedArray,
    ids: pz.nx.NamedArray,
    row_of: Callable[[jnp.ndarray], jnp.ndarray] = lambda i: i,
) -> pz.nx.NamedArray:
    """The rows of ``table`` (a named ``vocab`` axis) at ``row_of(ids)``: ``ids``' axes
    followed by the table's other named axes.

    Whole rows are gathered from the table as it lies in memory. Mapping the lookup over
    the table's other axes instead (``nmap`` of ``jnp.take`` over ``table.untag("vocab")``)
    puts a transpose of the whole table before the gather (2.6 GiB at Gemma 3 27B), which
    the compiler must then fuse away or copy (the CPU compiler fused it, converting the
    table to float32 inside the gather).
    """
    others = tuple(name for name in table.named_shape if name != "vocab")
    rows_first = table.untag("vocab", *others)
    rows = pz.nx.nmap(lambda t, i: jnp.take(t, row_of(i), axis=0))(rows_first, ids)
    return rows.tag(*others)


@pz.pytree_dataclass
class EmbedTokens(pz.nn.Layer):
    """Looks tokens up in the embedding table and multiplies by ``sqrt(d_model)``.

    The multiplier is rounded to the output's dtype first, as in transformers: in bfloat16
    ``sqrt(1152)`` becomes 34.0, not 33.94. The output's dtype is the table's, or
    ``activation_dtype`` when set (`gemmalens.Model.with_activation_dtype`): the rows are
    cast before the multiplication, so a bfloat16 table with ``"float32"`` gives what a
    float32 table holding the same values gives, and the layers after it compute in
    float32 by JAX's type promotion while their weights stay as stored.
    """

    table: pz.nn.ParameterLike[pz.nx.NamedArray]
    scale: float = dataclasses.field(metadata={"pytree_node": False})
    activation_dtype: str | None = dataclasses.field(default=None, metadata={"pytree_node": False})

    def __call__(self, tokens: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        embedded = take_rows(self.table.value, tokens)
        if self.activation_dtype is not None:
            embedded = embedded.astype(self.activation_dtype)
        return direct.multiply(
            embedded, jnp.asarray(self.scale, jnp.float32).astype(embedded.dtype)
        )

    @classmethod
    def with_model_width(cls, table: pz.Parameter, d_model: int) -> EmbedTokens:
        return cls(table=table, scale=math.sqrt(d_model))


def activation_dtype_of(tree: pz.nn.Layer) -> jnp.dtype | None:
    """The ``activation_dtype`` the token embeddings of ``tree`` set, or None."""
    for embed in pz.select(tree).at_instances_of(EmbedTokens).get_sequence():
        if embed.activation_dtype is not None:
            return jnp.dtype(embed.activation_dtype)
    return None


@pz.pytree_dataclass
class TiedUnembed(pz.nn.Layer):
    """Logits from the *unscaled* embedding table: ``logits = h @ E.T``."""

    table: pz.nn.ParameterLike[pz.nx.NamedArray]

    def __call__(self, h: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        return direct.contract(h, self.table.value, "embedding")


@pz.pytree_dataclass
class TanhSoftCap(pz.nn.Layer):
    """``cap * tanh(x / cap)``: bounds logits smoothly to (-cap, cap)."""

    cap: float = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        cap = jnp.asarray(self.cap, x.dtype)
        return direct.elementwise(lambda v: jnp.tanh(v / cap) * cap, x)
