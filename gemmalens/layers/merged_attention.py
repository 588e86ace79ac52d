"""Merged attention: a decoder layer attends to its own tokens and the encoder's in one softmax.

T5Gemma 2's decoder has no separate cross-attention block. Each decoder attention layer
takes keys and values from two places, with one set of ``k_proj`` / ``v_proj`` / ``k_norm``
weights, and normalises over both at once::

    self part:   k = RoPE(k_norm(k_proj(x)))      v = v_proj(x)       causal (or sliding) mask
    cross part:  k = k_norm(k_proj(encoder))      v = v_proj(encoder) only encoder padding masked
    pattern = softmax(q [k_self ++ k_cross]^T * scale)      one row sums to one over both parts

The encoder's keys get no rotary embedding: the decoder sees the encoder output as an
unordered set of positions, and the sliding window of a local layer only limits the self part.

In the Penzai tree this is an ordinary `gemmalens.layers.Attention` whose ``mixer`` is a
`MergedDotProductAttention`. The query, key and value paths (and their hook points) are the
decoder's self-attention paths unchanged, so `gemmalens.sampling.with_kv_cache` caches the
self part as for any decoder. The mixer holds the cross part: `EncoderKeysValues` computes it
from the side inputs ``encoder_output`` and ``encoder_positions``; for generation,
`fix_encoder_keys_values` replaces it with `FixedEncoderKeysValues`, computed once per prompt.

Hook points of the mixer (``{prefix}`` = e.g. ``decoder.blocks.0.attn.``):

* ``hook_cross_k`` / ``hook_cross_v`` ``[batch, enc_pos, kv_head, d_head]``: the encoder's keys
  and values as this layer sees them;
* ``hook_attn_scores`` / ``hook_pattern`` ``[batch, head, q_pos, k_pos + enc_pos]``: the whole
  merged row, self keys first;
* ``hook_self_pattern`` ``[batch, head, q_pos, k_pos]`` and ``hook_cross_pattern``
  ``[batch, head, q_pos, enc_pos]``: the two parts of that one softmax (together they sum to
  one per query row; each alone does not). The output is computed from these two, so
  patching either changes the layer's output.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from penzai import pz

from gemmalens.compiling import Distinct
from gemmalens.layers.attention import KV_AXES, PATTERN_AXES, QKV_AXES, Attention, AttentionMask
from gemmalens.layers.hooks import HookPoint
from gemmalens.layers.rope import ApplyRoPE

ENCODER_OUTPUT = "encoder_output"  # side input: [batch, seq (encoder), embedding]
ENCODER_POSITIONS = "encoder_positions"  # side input: [batch, seq (encoder)], -1 = padding


class CrossKeysValues(NamedTuple):
    """The encoder's keys and values for one decoder layer, and which encoder tokens are real.

    ``keys`` and ``values`` have named axes ``batch``, ``seq`` (encoder positions),
    ``kv_heads``, ``head_dim``; ``positions`` has ``batch``, ``seq`` (-1 on padding).
    """

    keys: pz.nx.NamedArray
    values: pz.nx.NamedArray
    positions: pz.nx.NamedArray


@pz.pytree_dataclass
class EncoderKeysValues(pz.nn.Layer):
    """Projects the encoder output (side input ``encoder_output``) to keys and values.

    ``key`` and ``value`` are the decoder layer's own projection paths without RoPE (they
    share the self part's weights). The input argument is ignored: the encoder output and
    its positions come from the side inputs.
    """

    key: pz.nn.Sequential
    value: pz.nn.Sequential

    def __call__(self, _: Any, **side_inputs: Any) -> CrossKeysValues:
        if ENCODER_OUTPUT not in side_inputs or ENCODER_POSITIONS not in side_inputs:
            raise ValueError(
                "This decoder layer attends to the encoder output and needs the side inputs "
                f"{ENCODER_OUTPUT!r} and {ENCODER_POSITIONS!r}: run it through the "
                "encoder-decoder model (m(tokens, decoder_tokens=...)), not on its own."
            )
        encoder_output = side_inputs[ENCODER_OUTPUT]
        return CrossKeysValues(
            keys=self.key(encoder_output, **side_inputs),
            values=self.value(encoder_output, **side_inputs),
            positions=side_inputs[ENCODER_POSITIONS],
        )


@pz.pytree_dataclass
class FixedEncoderKeysValues(pz.nn.Layer):
    """The cross part computed once (for one batch of prompts): decoding steps reuse it."""

    keys: pz.nx.NamedArray
    values: pz.nx.NamedArray
    positions: pz.nx.NamedArray

    def __call__(self, _: Any, **side_inputs: Any) -> CrossKeysValues:
        return CrossKeysValues(self.keys, self.values, self.positions)


def _to_kv_seq(x: pz.nx.NamedArray) -> pz.nx.NamedArray:
    return x.untag("seq").tag("kv_seq")


def _concat_kv(a: pz.nx.NamedArray, b: pz.nx.NamedArray) -> pz.nx.NamedArray:
    return pz.nx.nmap(lambda x, y: jnp.concatenate([x, y]))(
        a.untag("kv_seq"), b.untag("kv_seq")
    ).tag("kv_seq")


def _kv_slice(x: pz.nx.NamedArray, start: int, stop: int | None) -> pz.nx.NamedArray:
    return pz.nx.nmap(lambda v: v[start:stop])(x.untag("kv_seq")).tag("kv_seq")


@pz.pytree_dataclass
class MergedDotProductAttention(pz.nn.Layer):
    """One softmax over the decoder's own keys and the encoder's keys.

    Input ``(q, k, v)`` as for `gemmalens.layers.DotProductAttention` (the self part; with a
    KV cache, ``k`` and ``v`` are the cached keys and the side input ``kv_positions`` their
    positions); the cross part comes from ``cross`` (see the module docstring). Output
    ``[batch, seq, heads, head_dim]``.

    The weights are materialised only when ``implementation == "explicit"`` or a pattern or
    score hook is replaced; otherwise one fused kernel attends over both parts.

    Attributes:
      scale: multiplies the scores (``query_pre_attn_scalar ** -0.5``).
      mask: the self part's mask (causal, or causal sliding window); code that sizes KV
        caches reads it. The cross part masks only encoder padding.
      cross: `EncoderKeysValues` or `FixedEncoderKeysValues`.
    """

    scale: float = dataclasses.field(metadata={"pytree_node": False})
    mask: AttentionMask
    cross: pz.nn.Layer
    hook_cross_k: HookPoint
    hook_cross_v: HookPoint
    hook_attn_scores: HookPoint
    hook_pattern: HookPoint
    hook_self_pattern: HookPoint
    hook_cross_pattern: HookPoint
    implementation: Literal["auto", "explicit", "fused"] = dataclasses.field(
        default="auto", metadata={"pytree_node": False}
    )

    def uses_explicit_weights(self) -> bool:
        if self.implementation != "auto":
            return self.implementation == "explicit"
        pattern_hooks = (
            self.hook_attn_scores,
            self.hook_pattern,
            self.hook_self_pattern,
            self.hook_cross_pattern,
        )
        return any(type(hook) is not HookPoint for hook in pattern_hooks)

    def __call__(self, qkv, **side_inputs: Any) -> pz.nx.NamedArray:
        q, self_k, self_v = qkv
        cross = self.cross(side_inputs.get(ENCODER_OUTPUT), **side_inputs)
        cross_k = self.hook_cross_k(cross.keys, **side_inputs)
        cross_v = self.hook_cross_v(cross.values, **side_inputs)
        visible = self._visible(cross.positions, **side_inputs)
        if self.uses_explicit_weights():
            return self._explicit(q, (self_k, cross_k), (self_v, cross_v), visible, **side_inputs)
        return self._fused(q, (self_k, cross_k), (self_v, cross_v), visible)

    def _visible(self, cross_positions: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        """Boolean ``[batch, seq, kv_seq]`` over self keys followed by encoder keys."""
        own = self.mask.visible(**side_inputs)
        queries = side_inputs["token_positions"]
        real_encoder_tokens = _to_kv_seq(cross_positions) >= 0
        encoder = pz.nx.nmap(jnp.logical_and)(
            real_encoder_tokens, pz.nx.nmap(jnp.ones_like)(queries).astype(bool)
        )
        return _concat_kv(own, encoder)

    def _explicit(self, q, keys, values, visible, **side_inputs):
        groups = q.named_shape["heads"] // keys[0].named_shape["kv_heads"]

        def per_query_head(x):
            x = pz.nx.nmap(lambda a: jnp.repeat(a, groups, axis=0))(x.untag("kv_heads"))
            return _to_kv_seq(x.tag("heads"))

        self_k, cross_k = map(per_query_head, keys)
        self_v, cross_v = map(per_query_head, values)
        num_self = self_k.named_shape["kv_seq"]
        all_keys = _concat_kv(self_k, cross_k)
        scores = pz.nx.nmap(jnp.dot)(q.untag("head_dim"), all_keys.untag("head_dim"))
        scores = scores * jnp.asarray(self.scale, scores.dtype)
        scores = pz.nx.nmap(jnp.where)(visible, scores, jnp.finfo(scores.dtype).min)
        scores = self.hook_attn_scores(scores, **side_inputs)
        pattern = pz.nx.nmap(lambda s: jax.nn.softmax(s.astype(jnp.float32)).astype(q.dtype))(
            scores.untag("kv_seq")
        ).tag("kv_seq")
        pattern = self.hook_pattern(pattern, **side_inputs)
        self_pattern = self.hook_self_pattern(_kv_slice(pattern, 0, num_self), **side_inputs)
        cross_pattern = self.hook_cross_pattern(_kv_slice(pattern, num_self, None), **side_inputs)
        from_self = pz.nx.nmap(jnp.dot)(self_pattern.untag("kv_seq"), self_v.untag("kv_seq"))
        from_encoder = pz.nx.nmap(jnp.dot)(cross_pattern.untag("kv_seq"), cross_v.untag("kv_seq"))
        return from_self + from_encoder

    def _fused(self, q, keys, values, visible):
        def joined(pair):
            return jnp.concatenate([x.unwrap(*KV_AXES) for x in pair], axis=1)

        out = jax.nn.dot_product_attention(
            query=q.unwrap(*QKV_AXES),
            key=joined(keys),
            value=joined(values),
            scale=self.scale,
            mask=visible.unwrap("batch", "seq", "kv_seq")[:, None, :, :],
        )
        return pz.nx.wrap(out).tag(*QKV_AXES)


def merge_with_encoder(attention: Attention) -> Attention:
    """``attention`` (a decoder self-attention layer) made to attend to the encoder as well.

    The encoder's keys and values go through the layer's own key and value paths minus
    RoPE and hook points (same projection and key norm weights). The existing
    ``hook_attn_scores`` / ``hook_pattern`` now show the merged row; ``hook_self_pattern``,
    ``hook_cross_pattern``, ``hook_cross_k`` and ``hook_cross_v`` are added beside them.
    """
    mixer = attention.mixer
    prefix = mixer.hook_pattern.name.rsplit(".", 1)[0] + "."

    def without_rope_and_hooks(path: pz.nn.Sequential) -> pz.nn.Sequential:
        return pz.nn.Sequential(
            [layer for layer in path.sublayers if not isinstance(layer, (ApplyRoPE, HookPoint))]
        )

    merged = MergedDotProductAttention(
        scale=mixer.scale,
        mask=mixer.mask,
        cross=EncoderKeysValues(
            key=without_rope_and_hooks(attention.key),
            value=without_rope_and_hooks(attention.value),
        ),
        hook_cross_k=HookPoint(prefix + "hook_cross_k", KV_AXES),
        hook_cross_v=HookPoint(prefix + "hook_cross_v", KV_AXES),
        hook_attn_scores=mixer.hook_attn_scores,
        hook_pattern=mixer.hook_pattern,
        hook_self_pattern=HookPoint(prefix + "hook_self_pattern", PATTERN_AXES),
        hook_cross_pattern=HookPoint(prefix + "hook_cross_pattern", PATTERN_AXES),
    )
    return dataclasses.replace(attention, mixer=merged)


@jax.jit
def _project(plan: Distinct, encoder_output, encoder_positions):
    cross_layers = plan.tree()  # ``Distinct.of(list of EncoderKeysValues)``: each stack once
    side_inputs = {ENCODER_OUTPUT: encoder_output, ENCODER_POSITIONS: encoder_positions}
    return [layer(None, **side_inputs) for layer in cross_layers]


def fix_encoder_keys_values(
    decoder: pz.nn.Layer, encoder_output: pz.nx.NamedArray, encoder_positions: pz.nx.NamedArray
) -> pz.nn.Layer:
    """``decoder`` with every merged layer's cross part computed once from ``encoder_output``
    (``[batch, seq, embedding]``, positions ``[batch, seq]``, -1 on padding).

    The result runs without the ``encoder_output`` / ``encoder_positions`` side inputs:
    decoding steps then only project their own new token. ``decoder`` must have frozen
    parameters (`pz.freeze_params`).
    """
    selection = pz.select(decoder).at_instances_of(EncoderKeysValues)
    cross_layers = Distinct.of(list(selection.get_sequence()))
    computed = _project(cross_layers, encoder_output, encoder_positions)
    return selection.set_sequence(
        [FixedEncoderKeysValues(c.keys, c.values, c.positions) for c in computed]
    )
