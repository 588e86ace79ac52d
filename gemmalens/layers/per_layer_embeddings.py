"""Per-layer embeddings (PLE): a small extra input for every layer, from the token and its
embedding.

Gemma 3n and Gemma 4 (E2B, E4B) give layer ``i`` its own ``P``-wide input ``ple[i]``
(``P = hidden_size_per_layer_input``, 256 in the released models):

* token part: ``t = E_ple[id] * sqrt(P)`` from a ``[vocab, layers * P]`` table, read as
  ``[layers, P]`` per token;
* context part: ``c = norm((e @ W^T) * H^-0.5)``, ``e`` the scaled token embedding and
  ``W`` a ``[layers * P, H]`` projection, normalised over ``P``;
* ``ple = (c + t) * 2^-0.5``, or ``c`` alone for models without a token table.

After layer ``i`` (`PerLayerInputGate`), the residual stream gets
``norm(W_proj(gelu(W_gate x) * ple[i]))`` added (Gemma 3n adds it to AltUp streams
1..K-1 only; Gemma 4 to its single residual stream).

`PerLayerInputs` computes all of ``ple`` once, at the bottom of the model; the blocks read
it from the side input ``per_layer_inputs`` (named axes ``batch``, ``seq``, ``layer``,
``per_layer``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from penzai import pz

from gemmalens.layers import direct
from gemmalens.layers.embeddings import take_rows
from gemmalens.layers.hooks import HookPoint
from gemmalens.layers.norms import RMSNorm, ScaleForm
from gemmalens.layers.params import ParamBuilder
from gemmalens.layers.stacking import LayerNumber
from gemmalens.layers.transformer import PER_LAYER_INPUTS

__all__ = ["PER_LAYER_INPUTS", "PerLayerInputGate", "PerLayerInputs"]

PER_LAYER_AXES = ("batch", "seq", "per_layer")


def _times(x: pz.nx.NamedArray, constant: float, in_activation_dtype: bool) -> pz.nx.NamedArray:
    """``x * constant``: the constant rounded to x's dtype first, or the product in float32."""
    if in_activation_dtype:
        return direct.multiply(x, jnp.asarray(constant, jnp.float32).astype(x.dtype))
    return direct.elementwise(
        lambda v: (v.astype(jnp.float32) * jnp.float32(constant)).astype(v.dtype), x
    )


@pz.pytree_dataclass
class PerLayerInputs(pz.nn.Layer):
    """Token and context parts of the per-layer inputs, for every layer at once.

    Input: ``(tokens, embeddings)``: ids ``[batch, seq]`` and the scaled token embeddings
    ``[batch, seq, embedding]``. Output ``[batch, seq, layer, per_layer]``.

    Attributes:
      token_table: ``[vocab, layer, per_layer]``, or None (context part only).
      token_scale: multiplies the table rows (``sqrt(P)``), rounded to the table dtype.
      out_of_range_row: ids outside ``[0, vocab)`` of the table read this row (Gemma 3n's
        multimodal ids, which are >= 262 144, all read row 0).
      placeholder_ids, placeholder_row: ids that read ``placeholder_row`` instead of their
        own row (Gemma 4 with images: the image, video and audio placeholders read the pad
        row, as transformers' multimodal model replaces them by the pad id).
      model_projection: ``embedding -> (layer, per_layer)``.
      projection_scale: multiplies the projection (``H ** -0.5``).
      projection_norm: RMS norm over ``per_layer``.
      combine_scale: multiplies ``context + token`` (``2 ** -0.5``).
      constants_in_activation_dtype: True rounds ``projection_scale`` and
        ``combine_scale`` to the activation dtype before multiplying (Gemma 3n stores them
        as buffers); False multiplies in float32 (Gemma 4 uses Python floats). The two
        agree exactly in float32.
    """

    token_table: pz.nn.ParameterLike[pz.nx.NamedArray] | None
    model_projection: pz.nn.Linear
    projection_norm: RMSNorm
    token_scale: float = dataclasses.field(metadata={"pytree_node": False})
    projection_scale: float = dataclasses.field(metadata={"pytree_node": False})
    combine_scale: float = dataclasses.field(default=2**-0.5, metadata={"pytree_node": False})
    out_of_range_row: int = dataclasses.field(default=0, metadata={"pytree_node": False})
    placeholder_ids: tuple[int, ...] = dataclasses.field(
        default=(), metadata={"pytree_node": False}
    )
    placeholder_row: int = dataclasses.field(default=0, metadata={"pytree_node": False})
    constants_in_activation_dtype: bool = dataclasses.field(
        default=True, metadata={"pytree_node": False}
    )

    def __call__(self, inputs, **side_inputs: Any) -> pz.nx.NamedArray:
        tokens, embeddings = inputs
        context = _times(
            self.model_projection(embeddings),
            self.projection_scale,
            self.constants_in_activation_dtype,
        )
        context = self.projection_norm(context)
        if self.token_table is None:
            return context
        table = self.token_table.value
        vocab = table.named_shape["vocab"]

        def row_of(token):
            token = jnp.where((token >= 0) & (token < vocab), token, self.out_of_range_row)
            if self.placeholder_ids:
                placeholder = jnp.isin(token, jnp.asarray(self.placeholder_ids))
                token = jnp.where(placeholder, self.placeholder_row, token)
            return token

        # The stream's dtype where it is wider than the table's (a bfloat16 model run with
        # float32 activations, `Model.with_activation_dtype`): rows and scale as a float32
        # table would give them.
        dtype = jnp.promote_types(table.dtype, context.dtype)
        token_part = take_rows(table, tokens, row_of).astype(dtype)
        token_scale = jnp.asarray(self.token_scale, jnp.float32).astype(dtype)
        token_part = direct.multiply(token_part, token_scale)
        combined = direct.add(context, token_part)
        return _times(combined, self.combine_scale, self.constants_in_activation_dtype)

    @classmethod
    def build(
        cls,
        params: ParamBuilder,
        num_layers: int,
        d_model: int,
        d_per_layer: int,
        vocab_size: int | None,
        eps: float,
        norm_form: ScaleForm = "plain",
        constants_in_activation_dtype: bool = True,
    ) -> PerLayerInputs:
        """Asks ``params`` for ``token_table`` (unless ``vocab_size`` is None),
        ``model_projection.weights`` and ``projection_norm.scale``."""
        per_layer = {"layer": num_layers, "per_layer": d_per_layer}
        table = None
        if vocab_size is not None:
            table = params("token_table", {"vocab": vocab_size}, per_layer)
        return cls(
            token_table=table,
            model_projection=params.linear("model_projection", per_layer, {"embedding": d_model}),
            projection_norm=RMSNorm.build(
                params, "projection_norm", "per_layer", d_per_layer, eps, norm_form
            ),
            token_scale=math.sqrt(d_per_layer),
            projection_scale=d_model**-0.5,
            constants_in_activation_dtype=constants_in_activation_dtype,
        )


@pz.pytree_dataclass
class PerLayerInputGate(pz.nn.Layer):
    """What layer ``layer_index`` adds to the residual stream from its per-layer input.

    ``x [batch, seq, embedding] -> norm(projection(gelu_tanh(gate(x)) * ple[layer_index]))``,
    ``[batch, seq, embedding]``, with ``ple`` read from the side input
    ``per_layer_inputs``. The slice ``ple[layer_index]`` passes through
    ``hook_per_layer_input`` (``[batch, seq, per_layer]``) first. The caller decides where
    the result is added (wrap in `pz.nn.Residual` for a plain residual stream).
    """

    layer_index: LayerNumber
    gate: pz.nn.Linear
    hook_per_layer_input: HookPoint
    projection: pz.nn.Linear
    norm: RMSNorm

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        if PER_LAYER_INPUTS not in side_inputs:
            raise ValueError(
                f"{self.hook_per_layer_input.name} needs the side input {PER_LAYER_INPUTS!r} "
                "(the output of PerLayerInputs); the model's top level passes it to the blocks."
            )
        own = direct.take(side_inputs[PER_LAYER_INPUTS], "layer", self.layer_index.value)
        own = self.hook_per_layer_input(own, **side_inputs)
        gated = direct.elementwise(
            lambda g, o: jax.nn.gelu(g, approximate=True) * o, self.gate(x), own
        )
        return self.norm(self.projection(gated))

    @classmethod
    def build(
        cls,
        params: ParamBuilder,
        hook_prefix: str,
        layer_index: int,
        d_model: int,
        d_per_layer: int,
        eps: float,
        norm_form: ScaleForm = "plain",
    ) -> PerLayerInputGate:
        """Asks ``params`` for ``per_layer_input_gate.weights``,
        ``per_layer_projection.weights`` and ``post_per_layer_input_norm.scale`` (the
        transformers names, minus ``.weight``); the hook is ``{hook_prefix}hook_per_layer_input``."""
        return cls(
            layer_index=LayerNumber(layer_index),
            gate=params.linear(
                "per_layer_input_gate", {"per_layer": d_per_layer}, {"embedding": d_model}
            ),
            hook_per_layer_input=HookPoint(f"{hook_prefix}hook_per_layer_input", PER_LAYER_AXES),
            projection=params.linear(
                "per_layer_projection", {"embedding": d_model}, {"per_layer": d_per_layer}
            ),
            norm=RMSNorm.build(
                params, "post_per_layer_input_norm", "embedding", d_model, eps, norm_form
            ),
        )
