"""KV sharing: late layers attend with keys and values that an earlier layer computed.

Gemma 3n and Gemma 4 (E2B, E4B) save memory by letting the last ``num_kv_shared_layers``
layers skip their own key and value projections. Each of these *consumer* layers reuses
the keys and values of its *producer*: the last earlier layer of the same attention type
(sliding or full), taken exactly as the producer attends with them (after the key norm
and RoPE, after the value norm, over the whole sequence). Consumers still compute their
own queries. `kv_sharing_sources` says who reads from whom; the rule is the same in both
families.

Three layers express this in the Penzai tree:

* `KVSharingScope` wraps the stack of blocks and opens a fresh `KVStore` for each call
  (side input ``kv_store``); nothing is kept between calls.
* `KVProducer` wraps a producer's `DotProductAttention`. It publishes the keys and values
  the mixer receives, i.e. *after* the producer's ``hook_k`` / ``hook_v`` points, so
  patching a producer's keys also changes what its consumers see. Because it publishes
  what reaches the mixer, a KV-cache wrapper that hands the mixer ``cache ++ new`` keys
  (with ``kv_positions``) shares the cached keys too.
* `SharedKVAttention` is a consumer's attention: its own query path, then keys and values
  read from the store, passed through the consumer's own ``hook_k`` / ``hook_v`` points
  (patching those changes this layer only).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from penzai import pz

from gemmalens.layers.attention import DotProductAttention
from gemmalens.layers.hooks import HookPoint

KV_STORE = "kv_store"


def kv_sharing_sources(
    layer_types: Sequence[str], num_kv_shared_layers: int
) -> tuple[int | None, ...]:
    """For each layer, the index of the layer whose keys and values it reuses, or None.

    The last ``num_kv_shared_layers`` layers are consumers; a consumer of type ``t`` reads
    from the last layer of type ``t`` before the first consumer.

    Example: ``layer_types = [S, S, F, S, F, S]``, ``num_kv_shared_layers = 2`` gives
    ``(None, None, None, None, 2, 3)``.

    Raises:
      ValueError: when a consumer's type has no layer before the first consumer.
    """
    num_layers = len(layer_types)
    if not 0 <= num_kv_shared_layers <= num_layers:
        raise ValueError(
            f"num_kv_shared_layers is {num_kv_shared_layers}; it must be between 0 and the "
            f"number of layers ({num_layers})."
        )
    first_consumer = num_layers - num_kv_shared_layers
    sources: list[int | None] = [None] * num_layers
    for index in range(first_consumer, num_layers):
        layer_type = layer_types[index]
        earlier = [j for j in range(first_consumer) if layer_types[j] == layer_type]
        if not earlier:
            raise ValueError(
                f"Layer {index} ({layer_type}) reuses keys and values, but no layer before the "
                f"first KV-sharing layer ({first_consumer}) is of type {layer_type!r}. Every "
                "layer type must occur before the shared layers: lower num_kv_shared_layers "
                "or change layer_types."
            )
        sources[index] = earlier[-1]
    return tuple(sources)


class KVStore:
    """Keys and values published during one forward pass, by producer name.

    Created by `KVSharingScope` for each call and passed down as the side input
    ``kv_store``; it never lives in the model tree.
    """

    def __init__(self):
        self._entries: dict[str, tuple[Any, Any, Any]] = {}

    def publish(self, name: str, keys: Any, values: Any, kv_positions: Any) -> None:
        self._entries[name] = (keys, values, kv_positions)

    def read(self, name: str, reader: str) -> tuple[Any, Any, Any]:
        """``(keys, values, kv_positions)`` published by ``name`` (positions may be None)."""
        if name not in self._entries:
            published = ", ".join(sorted(self._entries)) or "none"
            raise ValueError(
                f"{reader} reuses the keys and values of {name}, but {name} has not run yet in "
                f"this forward pass (published so far: {published}). The producer must come "
                "before its consumers in the block stack."
            )
        return self._entries[name]


def _store(side_inputs: dict[str, Any], who: str) -> KVStore:
    store = side_inputs.get(KV_STORE)
    if store is None:
        raise ValueError(
            f"{who} shares keys and values between layers and needs the side input "
            f"{KV_STORE!r}: wrap the block stack in gemmalens.layers.kv_sharing.KVSharingScope."
        )
    return store


@pz.pytree_dataclass
class KVSharingScope(pz.nn.Layer):
    """Runs ``body`` with a fresh `KVStore` (side input ``kv_store``) for each call."""

    body: pz.nn.Layer

    def __call__(self, x: Any, **side_inputs: Any) -> Any:
        return self.body(x, **{**side_inputs, KV_STORE: KVStore()})


@pz.pytree_dataclass
class KVProducer(pz.nn.Layer):
    """A producer's attention mixer: publishes its keys and values as ``share_as``, then
    attends exactly like the wrapped `DotProductAttention`.

    Input and output as `DotProductAttention`: ``(q, k, v)`` -> ``[batch, seq, heads,
    head_dim]``. The published entry is ``(k, v, kv_positions)`` with k and v as the mixer
    receives them (``[batch, seq, kv_heads, head_dim]``) and ``kv_positions`` the side input
    of that name when present (KV caching), else None.
    """

    share_as: str = dataclasses.field(metadata={"pytree_node": False})
    mixer: DotProductAttention

    @property
    def mask(self):
        """The wrapped mixer's mask (code that sizes caches by window reads this)."""
        return self.mixer.mask

    def __call__(self, qkv, **side_inputs: Any) -> pz.nx.NamedArray:
        _, k, v = qkv
        store = _store(side_inputs, f"Layer {self.share_as}")
        store.publish(self.share_as, k, v, side_inputs.get("kv_positions"))
        return self.mixer(qkv, **side_inputs)


@pz.pytree_dataclass
class SharedKVAttention(pz.nn.Layer):
    """Attention whose keys and values come from the earlier layer ``source``.

    Reads like `gemmalens.layers.Attention`, minus the key and value projections:
    ``query`` is the layer's own query path (projection, norm, RoPE, ``hook_q``); ``key``
    and ``value`` are applied to the borrowed keys and values (usually just the
    ``hook_k`` / ``hook_v`` points); then ``mixer``, ``hook_z``, ``output``.

    Input ``[batch, seq, embedding]``, output ``[batch, seq, embedding]``.
    """

    query: pz.nn.Sequential
    key: pz.nn.Sequential
    value: pz.nn.Sequential
    mixer: DotProductAttention
    hook_z: HookPoint
    output: pz.nn.Linear
    source: str = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        me = self.hook_z.name.rsplit(".", 1)[0]  # e.g. "blocks.20.attn"
        q = self.query(x, **side_inputs)
        k, v, kv_positions = _store(side_inputs, me).read(self.source, reader=me)
        k = self.key(k, **side_inputs)
        v = self.value(v, **side_inputs)
        mixer_inputs = dict(side_inputs)
        if kv_positions is not None:
            mixer_inputs["kv_positions"] = kv_positions
        z = self.mixer((q, k, v), **mixer_inputs)
        z = self.hook_z(z, **side_inputs)
        return self.output(z, **side_inputs)
