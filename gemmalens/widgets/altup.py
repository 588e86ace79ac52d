"""`AltUpViewer`: Gemma 3n's AltUp streams, predicted and corrected, layer by layer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import traitlets
from matplotlib.figure import Figure

from gemmalens.widgets import _figures
from gemmalens.widgets._base import (
    LayerViewer,
    batch_row,
    check_choice,
    ids_of,
    options_list,
    require_hook_points,
    require_layers,
    token_labels,
    tokenizer_of,
)

PREDICTIONS_HOOK = "blocks.{layer}.altup.hook_predictions"
CORRECTED_HOOK = "blocks.{layer}.altup.hook_corrected"

MEASURES = {
    "prediction": "‖prediction‖",
    "correction": "‖corrected‖",
    "difference": "‖corrected − prediction‖",
    "relative": "‖corrected − prediction‖ / ‖prediction‖",
}


class AltUpViewer(LayerViewer):
    """Gemma 3n's AltUp streams: what each block predicts, what it corrects, and by how much.

    Each block predicts all K streams from the streams it receives (a cheap linear mix,
    ``blocks.{i}.altup.hook_predictions``), runs the transformer layer on the *active*
    stream only, then spreads the layer's innovation (its output minus the active
    prediction) to every stream with a per-stream coefficient
    (``blocks.{i}.altup.hook_corrected``). The viewer shows, per layer, the norm of each
    stream at every position for the prediction, the correction and their difference, a
    line plot of one stream, and an overview of how strongly each layer corrects each
    stream (the mean of ``‖corrected − prediction‖ / ‖prediction‖`` over positions).

    Build it from a cache of a Gemma 3n model::

        names = ["blocks.*.altup.hook_predictions", "blocks.*.altup.hook_corrected"]
        logits, cache = m.run_with_cache(tokens, names=names)
        viewer = AltUpViewer(cache, tokens)

    or ``AltUpViewer.from_model(m, "Some text")``.

    Traitlets (synced):
      layer, stream: the layer and stream shown.
      measure: the quantity of the heatmap: ``prediction``, ``correction``,
        ``difference`` or ``relative`` (see `MEASURES`).
      selected_token: a highlighted position (-1: none).
      norms: ``{measure: [stream][pos]}`` for ``layer``.
      stream_norms: ``{measure: [pos]}`` for (``layer``, ``stream``).
      overview: ``[layer][stream]`` mean relative correction (every layer, fixed).
      layers: the layers in ``overview``'s order.
      active_stream: the stream the transformer layers compute (-1: unknown).
    """

    css_class = "gemmalens-altup"

    stream = traitlets.Int(0).tag(sync=True)
    measure = traitlets.Unicode("difference").tag(sync=True)
    norms = traitlets.Dict().tag(sync=True)
    stream_norms = traitlets.Dict().tag(sync=True)
    overview = traitlets.List().tag(sync=True)
    layers = traitlets.List(traitlets.Int()).tag(sync=True)
    active_stream = traitlets.Int(-1).tag(sync=True)
    measure_labels = traitlets.Dict(MEASURES).tag(sync=True)

    _data_controls = ("layer", "stream")

    def __init__(
        self,
        cache: Mapping[str, Any],
        tokens: Any = None,
        *,
        tokenizer: Any = None,
        layer: int | None = None,
        stream: int | None = None,
        measure: str = "difference",
        batch: int = 0,
        active_stream: int | None = None,
        embed_html: bool = True,
    ):
        """
        Args:
          cache: an `ActivationCache` of a Gemma 3n model holding
            ``blocks.{i}.altup.hook_predictions`` and ``hook_corrected``
            (``[batch, pos, stream, d_model]``) for at least one layer.
          tokens: the token ids of the cache (or labels); None labels positions by number.
          tokenizer: decodes the ids (default: the cache's model's tokenizer).
          layer, stream, measure: what is shown first (default stream: the active one).
          batch: which batch row to show.
          active_stream: the computed stream (default: the model config's
            ``altup_active_idx``).
          embed_html: add the static `to_html` copy to the notebook output.
        """
        layers = require_layers(
            cache,
            [PREDICTIONS_HOOK, CORRECTED_HOOK],
            "AltUpViewer (Gemma 3n only)",
            [PREDICTIONS_HOOK.format(layer="*"), CORRECTED_HOOK.format(layer="*")],
        )
        self._layers = layers
        self._norms = {i: self._layer_norms(cache, i, batch) for i in layers}
        streams, positions = self._norms[layers[0]]["prediction"].shape
        self._streams = streams
        if active_stream is None:
            config = getattr(getattr(cache, "model", None), "config", None)
            active_stream = getattr(config, "altup_active_idx", -1)
        overview = np.stack([self._norms[i]["relative"].mean(axis=1) for i in layers])
        labels = token_labels(tokens, tokenizer_of(cache, tokenizer), batch, positions)

        def stream_label(s: int) -> str:
            return f"{s} (active)" if s == active_stream else str(s)

        super().__init__(
            embed_html=embed_html,
            view="altup",
            title="AltUp streams: prediction and correction",
            tokens=labels,
            options={
                "layer": options_list(layers),
                "stream": options_list(range(streams), stream_label),
                "measure": [[key, text] for key, text in MEASURES.items()],
            },
            note=(
                "Each block predicts every stream, computes only the active one, and "
                "corrects all streams with the difference (the innovation)."
            ),
            overview=overview.tolist(),
            layers=layers,
            active_stream=int(active_stream),
            layer=layers[0] if layer is None else layer,
            stream=(active_stream if active_stream >= 0 else 0) if stream is None else stream,
            measure=measure,
        )

    @staticmethod
    def _layer_norms(cache: Mapping[str, Any], layer: int, batch: int) -> dict[str, np.ndarray]:
        predicted_name = PREDICTIONS_HOOK.format(layer=layer)
        predicted = batch_row(cache[predicted_name], batch, predicted_name)
        corrected_name = CORRECTED_HOOK.format(layer=layer)
        corrected = batch_row(cache[corrected_name], batch, corrected_name)
        if predicted.ndim != 3 or predicted.shape != corrected.shape:
            raise ValueError(
                f"{predicted_name} has shape {predicted.shape} and the corrected streams "
                f"{corrected.shape} per batch row; expected equal [pos, stream, d_model]."
            )
        # [pos, stream, d_model] -> [stream, pos]
        prediction = np.linalg.norm(predicted, axis=-1).T
        difference = np.linalg.norm(corrected - predicted, axis=-1).T
        return {
            "prediction": prediction,
            "correction": np.linalg.norm(corrected, axis=-1).T,
            "difference": difference,
            "relative": difference / np.maximum(prediction, 1e-12),
        }

    @classmethod
    def from_model(cls, m: Any, tokens: Any, **kwargs: Any) -> AltUpViewer:
        """Runs ``m`` on ``tokens`` (text or ids) capturing only the AltUp predictions
        and corrections, and builds the viewer."""
        require_hook_points(
            m,
            PREDICTIONS_HOOK,
            "AltUpViewer",
            "Gemma 3n's AltUp streams (Gemma 3n E2B / E4B, the gemma3n teaching model)",
        )
        ids = ids_of(m, tokens)
        names = [PREDICTIONS_HOOK.format(layer="*"), CORRECTED_HOOK.format(layer="*")]
        _, cache = m.run_with_cache(ids, names=names)
        return cls(cache, ids, **kwargs)

    @traitlets.validate("stream")
    def _check_stream(self, proposal: Any) -> int:
        return check_choice("stream", proposal["value"], list(range(self._streams)))

    @traitlets.validate("measure")
    def _check_measure(self, proposal: Any) -> str:
        return check_choice("measure", proposal["value"], list(MEASURES))

    def layer_norms(self, layer: int | None = None) -> dict[str, np.ndarray]:
        """``{measure: [stream, pos]}`` of ``layer`` (default: the one shown)."""
        layer = self.layer if layer is None else check_choice("layer", layer, self._layers)
        return dict(self._norms[layer])

    def _compute(self, controls: Mapping[str, Any]) -> dict[str, Any]:
        norms = self._norms[controls["layer"]]
        return {
            "norms": norms,
            "stream_norms": {name: values[controls["stream"]] for name, values in norms.items()},
        }

    def figure(self, figsize: tuple[float, float] | None = None) -> Figure:
        """The current layer as a matplotlib figure: the chosen measure per stream and
        position (heatmap), and the chosen stream's norms along the positions (lines)."""
        norms = self._norms[self.layer]
        positions = len(self.tokens)
        width, _ = _figures.fitted_size(positions, 4)
        figure = _figures.new_figure(width, 6.0, figsize=figsize)
        top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=[1, 1.3])
        image = top.imshow(
            norms[self.measure], cmap="viridis", aspect="auto", interpolation="nearest"
        )
        # The colour bar spans both panels so that their positions line up.
        figure.colorbar(image, ax=[top, bottom], label=MEASURES[self.measure], shrink=0.6)
        stream_names = [
            f"stream {s}" + (" (active)" if s == self.active_stream else "")
            for s in range(self._streams)
        ]
        _figures.tick_labels(top, stream_names, "y", fontsize=9, length=20)
        top.set_ylabel("stream")
        top.set_title(f"Layer {self.layer}: {MEASURES[self.measure]}", fontsize=10)
        x = np.arange(positions)
        styles = {"prediction": "-", "correction": "--", "difference": ":"}
        for name, style in styles.items():
            bottom.plot(x, norms[name][self.stream], style, marker="o", ms=3, label=MEASURES[name])
        if self.selected_token >= 0:
            bottom.axvline(self.selected_token, color="#d62728", linewidth=1)
        bottom.set_ylabel("norm")
        bottom.set_xlabel("position (token)")
        bottom.set_title(f"Stream {self.stream} along the sequence", fontsize=10)
        bottom.legend(fontsize=8)
        bottom.grid(alpha=0.3)
        _figures.tick_labels(bottom, self.tokens, "x")
        return figure
