"""Builders every family shares: attention, the embedding, the final norm, the unembedding,
and the layer-type pattern.

A family describes what differs (head shapes, norm form, scaling, mask, where keys and
values come from) as data, an `AttentionSpec` per layer, and these builders turn it into
Penzai layers. Hook names come from the parameter scope they are built in
(`ParamBuilder.hook`): the attention of block 3 asks for ``blocks.3.attn.q_proj.weights``
and names ``blocks.3.attn.hook_q``, so parameter labels and hook names cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from penzai import pz

from gemmalens.layers.attention import KV_AXES, QKV_AXES, Attention, AttentionMask
from gemmalens.layers.attention import attention_mixer as _mixer
from gemmalens.layers.embeddings import EmbedTokens, TanhSoftCap, TiedUnembed
from gemmalens.layers.kv_sharing import KVProducer, SharedKVAttention
from gemmalens.layers.norms import RMSNorm, ScaleForm
from gemmalens.layers.params import ParamBuilder
from gemmalens.layers.rope import AxialRopeConfig, RopeConfig
from gemmalens.layers.transformer import RESID_AXES

# Makes a projection: (name, out_axes, in_axes) -> layer (`ParamBuilder.linear` by default).
LinearFactory = Callable[[str, dict[str, int], dict[str, int]], pz.nn.Layer]

SLIDING = "sliding_attention"
FULL = "full_attention"
LAYER_TYPES = (SLIDING, FULL)


def alternating_layer_types(
    num_layers: int, pattern: int, last_full: bool = False
) -> tuple[str, ...]:
    """``pattern - 1`` sliding layers then a full one, repeated; with ``last_full`` the
    last layer is full whatever the pattern says (Gemma 4)."""
    types = [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(num_layers)]
    if last_full and types:
        types[-1] = FULL
    return tuple(types)


def check_layer_types(layer_types: Sequence[str], num_layers: int) -> None:
    """Raises a clear error for a wrong count or an unknown type."""
    if len(layer_types) != num_layers:
        raise ValueError(
            f"layer_types has {len(layer_types)} entries but num_hidden_layers is "
            f"{num_layers}; give one type per layer."
        )
    unknown = sorted(set(layer_types) - set(LAYER_TYPES))
    if unknown:
        raise ValueError(f"Unknown layer types {unknown}; use {SLIDING!r} or {FULL!r}.")


def decoder_mask(
    layer_type: str, window: int, bidirectional_reach: int | None = None
) -> AttentionMask:
    """A decoder layer's mask: causal, over ``window`` keys on sliding layers; with
    ``bidirectional_reach`` (embedding models) both ways, ``|q - k| < reach`` on sliding
    layers."""
    return AttentionMask.for_layer(layer_type == FULL, window, bidirectional_reach)


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """One attention layer, as data.

    Attributes:
      d_model, num_heads, num_kv_heads, head_dim: the shapes.
      rope: the rotary embedding of its layer type (an `AxialRopeConfig` for image patches).
      mask: which keys each query sees.
      scale: multiplies the scores (``query_pre_attn_scalar ** -0.5`` in Gemma 3, 1.0 where
        the query/key norms do the scaling).
      norm_form: the query and key norms' form (``"one_plus"`` or ``"plain"``).
      eps: their epsilon.
      value_norm: a weightless RMS norm on the values (Gemma 3n, Gemma 4).
      values_are_keys: the raw key projection is also the value (Gemma 4 K=V layers).
      kv_source: the earlier layer whose keys and values this one reads (KV sharing).
      publishes_kv: later layers read this layer's keys and values.
    """

    d_model: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: RopeConfig | AxialRopeConfig
    mask: AttentionMask
    scale: float
    norm_form: ScaleForm
    eps: float
    value_norm: bool = False
    values_are_keys: bool = False
    kv_source: int | None = None
    publishes_kv: bool = False


def build_attention(
    params: ParamBuilder, spec: AttentionSpec, linear: LinearFactory | None = None
) -> Attention | SharedKVAttention:
    """The attention layer ``spec`` describes, asking ``params`` (the layer's scope, e.g.
    ``blocks.3.attn``) for ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` and the norms.

    ``linear(name, out_axes, in_axes)`` makes each projection (default ``params.linear``;
    Gemma 4's vision tower passes one that clips inputs and outputs).

    Hook points, in ``params``' scope: ``hook_q``, ``hook_k``, ``hook_v``,
    ``hook_attn_scores``, ``hook_pattern``, ``hook_z``.
    """
    linear = linear or params.linear
    heads = {"heads": spec.num_heads, "head_dim": spec.head_dim}
    kv_heads = {"kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim}
    embedding = {"embedding": spec.d_model}

    def head_norm(name: str, form: ScaleForm) -> RMSNorm:
        return RMSNorm.build(params, name, "head_dim", spec.head_dim, spec.eps, form)

    query = pz.nn.Sequential(
        [
            linear("q_proj", heads, embedding),
            head_norm("q_norm", spec.norm_form),
            spec.rope.layer(),
            params.hook("hook_q", QKV_AXES),
        ]
    )
    mixer = _mixer(params.prefix, spec.mask, scale=spec.scale)
    hook_z = params.hook("hook_z", QKV_AXES)
    output = linear("o_proj", embedding, heads)
    if spec.kv_source is not None:
        return SharedKVAttention(
            query=query,
            key=pz.nn.Sequential([params.hook("hook_k", KV_AXES)]),
            value=pz.nn.Sequential([params.hook("hook_v", KV_AXES)]),
            mixer=mixer,
            hook_z=hook_z,
            output=output,
            source=f"blocks.{spec.kv_source}",
        )
    key_proj = linear("k_proj", kv_heads, embedding)
    # K=V: the value path starts from the same (raw, un-normed) key projection.
    value_proj = key_proj if spec.values_are_keys else linear("v_proj", kv_heads, embedding)
    value = [value_proj, head_norm("v_norm", "none")] if spec.value_norm else [value_proj]
    if spec.publishes_kv:
        # Consumers find the keys by block name: the scope without its trailing "attn.".
        mixer = KVProducer(share_as=params.prefix.removesuffix("attn.").rstrip("."), mixer=mixer)
    return Attention(
        query=query,
        key=pz.nn.Sequential(
            [
                key_proj,
                head_norm("k_norm", spec.norm_form),
                spec.rope.layer(),
                params.hook("hook_k", KV_AXES),
            ]
        ),
        value=pz.nn.Sequential([*value, params.hook("hook_v", KV_AXES)]),
        mixer=mixer,
        hook_z=hook_z,
        output=output,
    )


def embedding(params: ParamBuilder, vocab_size: int, d_model: int) -> tuple[pz.Parameter, list]:
    """The token table ``embed.embeddings`` and the layers that embed with it (scaled by
    sqrt(d_model)) and name the result ``hook_embed``. Returns ``(table, layers)``: the
    table is tied to the unembedding."""
    table = params("embed.embeddings", {"vocab": vocab_size}, {"embedding": d_model})
    layers = [EmbedTokens.with_model_width(table, d_model), params.hook("hook_embed", RESID_AXES)]
    return table, layers


def final_norm(params: ParamBuilder, d_model: int, eps: float, form: ScaleForm) -> pz.nn.Sequential:
    """``ln_final`` with its divisor named ``ln_final.hook_scale`` and its output
    ``ln_final.hook_normalized``."""
    scope = params.scope("ln_final")
    return pz.nn.Sequential(
        [
            RMSNorm.build(
                params,
                "ln_final",
                "embedding",
                d_model,
                eps,
                form,
                hook_scale=scope.hook("hook_scale", RESID_AXES),
            ),
            scope.hook("hook_normalized", RESID_AXES),
        ]
    )


def unembedding(table: pz.Parameter, softcap: float | None) -> pz.nn.Sequential:
    """The tied unembedding, then ``cap * tanh(logits / cap)`` when ``softcap`` is set."""
    layers: list[pz.nn.Layer] = [TiedUnembed(table)]
    if softcap is not None:
        layers.append(TanhSoftCap(softcap))
    return pz.nn.Sequential(layers)
