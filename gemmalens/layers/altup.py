"""AltUp (alternating updates): a residual stream of K streams, one computed, the rest predicted.

Baykal et al., "Alternating Updates for Efficient Transformers" (NeurIPS 2023), as Gemma 3n
uses it. The residual value between blocks has a named axis ``stream`` of size K (4 in
Gemma 3n): ``[batch, seq, stream, embedding]``. Only stream ``a`` (``altup_active_idx``)
goes through the transformer layer; the others are updated cheaply around it:

* start (`AltUpExpand`): stream 0 is the token embedding ``e``; stream ``j >= 1`` is
  ``P_j e`` rescaled to the per-token RMS of ``e``.
* every block (`AltUpBlock`):

  1. router: ``m = tanh(W_router (norm(s[a]) / H))``, one weight per "modality" (K of them);
  2. predict: ``pred[r] = s[r] + sum_c C[r, c] s[c]`` with ``C = reshape(W_pred m)``
     (`AltUpPredict`);
  3. the transformer layer runs on ``pred[a]`` and returns ``y``;
  4. correct: ``corr[j] = pred[j] + (W_corr m' + 1)[j] * (y - pred[a])`` with
     ``m' = router(y)`` (`AltUpCorrect`): the innovation ``y - pred[a]`` of the computed
     stream is spread to every stream.

* end (`AltUpCollapse`): stream ``j >= 1`` is mapped back by ``U_j`` and rescaled to the
  RMS of stream 0; the output is the mean of the K streams.

Coefficient clipping (``altup_coef_clip``) is a training-time device and never applied here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from penzai import pz

from gemmalens.layers import direct
from gemmalens.layers.hooks import HookPoint
from gemmalens.layers.norms import RMSNorm, ScaleForm
from gemmalens.layers.params import ParamBuilder
from gemmalens.layers.transformer import RESID_AXES

STREAM_AXES = ("batch", "seq", "stream", "embedding")
MODALITY_AXES = ("batch", "seq", "modality")
PREDICTION_COEF_AXES = ("batch", "seq", "stream", "from_stream")
CORRECTION_COEF_AXES = ("batch", "seq", "stream")

_MIN_MEAN_SQUARE = 1e-5


def _root_mean_square(x: pz.nx.NamedArray) -> pz.nx.NamedArray:
    return direct.along(lambda v: jnp.mean(v * v, -1) ** 0.5, x, "embedding")


def _rescale_to(x: pz.nx.NamedArray, target_rms: pz.nx.NamedArray) -> pz.nx.NamedArray:
    """``x`` rescaled per token to RMS ``target_rms`` (its own mean square floored at 1e-5)."""
    mean_square = direct.along(lambda v: jnp.mean(v * v, -1), x, "embedding")
    magnitude = direct.elementwise(
        lambda m: jnp.sqrt(jnp.maximum(m, _MIN_MEAN_SQUARE)), mean_square
    )
    return direct.elementwise(lambda v, t, m: v * t / m, x, target_rms, magnitude)


def _project(linear: pz.nn.Linear, x: pz.nx.NamedArray) -> pz.nx.NamedArray:
    return linear(x).untag("projected").tag("embedding")


def _stream_projections(params: ParamBuilder, num_streams: int, d_model: int) -> list:
    return [
        params.linear(f"{j}", {"projected": d_model}, {"embedding": d_model})
        for j in range(num_streams - 1)
    ]


@pz.pytree_dataclass
class AltUpExpand(pz.nn.Layer):
    """``[batch, seq, embedding] -> [batch, seq, stream, embedding]``: the embedding and
    K-1 magnitude-matched projections of it (``projections[j-1]`` makes stream ``j``)."""

    projections: list[pz.nn.Linear]
    hook_streams: HookPoint

    def __call__(self, embedded: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        target = _root_mean_square(embedded)
        streams = [embedded] + [
            _rescale_to(_project(p, embedded), target) for p in self.projections
        ]
        return self.hook_streams(pz.nx.stack(streams, "stream"), **side_inputs)

    @classmethod
    def build(
        cls, params: ParamBuilder, hook_name: str, num_streams: int, d_model: int
    ) -> AltUpExpand:
        """Asks ``params`` for ``{j}.weights``, j = 0 .. K-2."""
        return cls(
            projections=_stream_projections(params, num_streams, d_model),
            hook_streams=HookPoint(hook_name, STREAM_AXES),
        )


@pz.pytree_dataclass
class AltUpCollapse(pz.nn.Layer):
    """``[batch, seq, stream, embedding] -> [batch, seq, embedding]``: the mean of stream 0
    and the K-1 streams mapped back by ``projections`` and rescaled to stream 0's RMS."""

    projections: list[pz.nn.Linear]
    hook_collapsed: HookPoint

    def __call__(self, streams: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        first = direct.take(streams, "stream", 0)
        target = _root_mean_square(first)
        unprojected = [first] + [
            _rescale_to(_project(p, direct.take(streams, "stream", j + 1)), target)
            for j, p in enumerate(self.projections)
        ]
        stacked = pz.nx.stack(unprojected, "stream")
        mean = direct.along(lambda v: jnp.mean(v, -1), stacked, "stream")
        return self.hook_collapsed(mean, **side_inputs)

    @classmethod
    def build(
        cls, params: ParamBuilder, hook_name: str, num_streams: int, d_model: int
    ) -> AltUpCollapse:
        """Asks ``params`` for ``{j}.weights``, j = 0 .. K-2."""
        return cls(
            projections=_stream_projections(params, num_streams, d_model),
            hook_collapsed=HookPoint(hook_name, RESID_AXES),
        )


@pz.pytree_dataclass
class AltUpRouter(pz.nn.Layer):
    """``[batch, seq, embedding] -> [batch, seq, modality]``:
    ``tanh(modality_router(router_norm(x) * input_scale))``, tanh in float32."""

    router_norm: RMSNorm
    modality_router: pz.nn.Linear
    input_scale: float = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        normed = self.router_norm(x)
        scale = jnp.asarray(self.input_scale, jnp.float32).astype(normed.dtype)
        routed = self.modality_router(direct.multiply(normed, scale))
        return direct.elementwise(lambda r: jnp.tanh(r.astype(jnp.float32)).astype(r.dtype), routed)


@pz.pytree_dataclass
class AltUpPredict(pz.nn.Layer):
    """Input ``(streams, modalities)``; output the predictions ``[batch, seq, stream,
    embedding]``: ``pred[r] = s[r] + sum_c C[r, c] s[c]``, ``C = prediction_coefs(m)``.

    Hooks: ``hook_modalities`` (the router output, ``[batch, seq, modality]``),
    ``hook_coefs`` (``C``, ``[batch, seq, stream, from_stream]``), ``hook_predictions``.
    """

    hook_modalities: HookPoint
    prediction_coefs: pz.nn.Linear
    hook_coefs: HookPoint
    hook_predictions: HookPoint

    def __call__(self, inputs, **side_inputs: Any) -> pz.nx.NamedArray:
        streams, modalities = inputs
        modalities = self.hook_modalities(modalities, **side_inputs)
        coefs = self.hook_coefs(self.prediction_coefs(modalities), **side_inputs)
        from_streams = direct.renamed(streams, "stream", "from_stream")
        mixed = direct.contract(coefs, from_streams, "from_stream")
        return self.hook_predictions(direct.add(streams, mixed), **side_inputs)


@pz.pytree_dataclass
class AltUpCorrect(pz.nn.Layer):
    """Input ``(predictions, computed, modalities)`` with ``computed`` the layer's output for
    the active stream; output ``corr[j] = pred[j] + coef[j] * (computed - pred[a])``.

    Hooks: ``hook_modalities`` (router output for ``computed``), ``hook_coefs``
    (``coef = correction_coefs(m) + 1``, ``[batch, seq, stream]``), ``hook_innovation``
    (``computed - pred[a]``, ``[batch, seq, embedding]``), ``hook_corrected``
    (``[batch, seq, stream, embedding]``).
    """

    active_index: int = dataclasses.field(metadata={"pytree_node": False})
    hook_modalities: HookPoint
    correction_coefs: pz.nn.Linear
    hook_coefs: HookPoint
    hook_innovation: HookPoint
    hook_corrected: HookPoint

    def __call__(self, inputs, **side_inputs: Any) -> pz.nx.NamedArray:
        predictions, computed, modalities = inputs
        modalities = self.hook_modalities(modalities, **side_inputs)
        coefs = direct.add(self.correction_coefs(modalities), 1.0)
        coefs = self.hook_coefs(coefs, **side_inputs)
        active = direct.take(predictions, "stream", self.active_index)
        innovation = self.hook_innovation(direct.subtract(computed, active), **side_inputs)
        corrected = direct.elementwise(lambda p, c, i: p + c * i, predictions, coefs, innovation)
        return self.hook_corrected(corrected, **side_inputs)


@pz.pytree_dataclass
class AltUpBlock(pz.nn.Layer):
    """One transformer layer wrapped in AltUp: route, predict, run ``layer`` on the active
    stream, correct. ``[batch, seq, stream, embedding]`` in and out.

    ``layer`` maps ``[batch, seq, embedding] -> [batch, seq, embedding]`` (the usual
    block, with its ``hook_resid_*`` points, which therefore see the active stream).
    The router (one set of weights) runs twice: on the active input stream before the
    prediction and on the layer's output before the correction.
    """

    router: AltUpRouter
    predict: AltUpPredict
    layer: pz.nn.Layer
    correct: AltUpCorrect

    def __call__(self, streams: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        active = self.correct.active_index
        modalities = self.router(direct.take(streams, "stream", active), **side_inputs)
        predictions = self.predict((streams, modalities), **side_inputs)
        computed = self.layer(direct.take(predictions, "stream", active), **side_inputs)
        modalities = self.router(computed, **side_inputs)
        return self.correct((predictions, computed, modalities), **side_inputs)

    @classmethod
    def build(
        cls,
        params: ParamBuilder,
        hook_prefix: str,
        layer: pz.nn.Layer,
        num_streams: int,
        active_index: int,
        d_model: int,
        eps: float,
        norm_form: ScaleForm = "plain",
    ) -> AltUpBlock:
        """Asks ``params`` for ``router_norm.scale``, ``modality_router.weights``,
        ``prediction_coefs.weights`` and ``correction_coefs.weights`` (the transformers
        names). Hooks: ``{hook_prefix}hook_prediction_modalities``, ``hook_prediction_coefs``,
        ``hook_predictions``, ``hook_correction_modalities``, ``hook_correction_coefs``,
        ``hook_innovation``, ``hook_corrected``."""
        if not 0 <= active_index < num_streams:
            raise ValueError(
                f"altup_active_idx is {active_index}, but there are only {num_streams} AltUp "
                f"streams; choose an index in [0, {num_streams})."
            )
        streams = {"stream": num_streams}
        modality = {"modality": num_streams}
        return cls(
            router=AltUpRouter(
                router_norm=RMSNorm.build(
                    params, "router_norm", "embedding", d_model, eps, norm_form
                ),
                modality_router=params.linear("modality_router", modality, {"embedding": d_model}),
                input_scale=1.0 / d_model,
            ),
            predict=AltUpPredict(
                hook_modalities=HookPoint(
                    f"{hook_prefix}hook_prediction_modalities", MODALITY_AXES
                ),
                prediction_coefs=params.linear(
                    "prediction_coefs", {**streams, "from_stream": num_streams}, modality
                ),
                hook_coefs=HookPoint(f"{hook_prefix}hook_prediction_coefs", PREDICTION_COEF_AXES),
                hook_predictions=HookPoint(f"{hook_prefix}hook_predictions", STREAM_AXES),
            ),
            layer=layer,
            correct=AltUpCorrect(
                active_index=active_index,
                hook_modalities=HookPoint(
                    f"{hook_prefix}hook_correction_modalities", MODALITY_AXES
                ),
                correction_coefs=params.linear("correction_coefs", streams, modality),
                hook_coefs=HookPoint(f"{hook_prefix}hook_correction_coefs", CORRECTION_COEF_AXES),
                hook_innovation=HookPoint(f"{hook_prefix}hook_innovation", RESID_AXES),
                hook_corrected=HookPoint(f"{hook_prefix}hook_corrected", STREAM_AXES),
            ),
        )
