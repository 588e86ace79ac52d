"""`PatchingViewer`: activation patching results as layer x position / layer x head maps."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import traitlets
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from gemmalens import patching
from gemmalens.widgets import _figures
from gemmalens.widgets._base import (
    Viewer,
    check_choice,
    ids_of,
    token_labels,
    token_row,
)

SHOW = {
    "metric": "metric of the patched run",
    "change": "change from the corrupted run",
    "restored": "fraction of the clean − corrupted gap restored",
}
UNIT_TITLES = {"pos": "position (token)", "head": "head", "kv_head": "KV head"}


def _unit_of(site: str, units: int, positions: int) -> str:
    try:
        return patching.site_spec(site).unit
    except ValueError:  # a result under a name of the user's own
        return "pos" if units == positions else "head"


class PatchingViewer(Viewer):
    """Activation patching sweeps (`gemmalens.patching.sweep`) as heatmaps.

    Each result is ``[layer, unit]``: the metric of the corrupted run with one site
    (a position of a residual-stream hook, or a head) set to its clean value. Sites by
    position show tokens across; head sites show heads. Colours are diverging (RdBu)
    and centred at 0: with both baselines known the default shows the fraction of the
    clean − corrupted gap each patch restores (1: fully restored).

    Build it from sweeps you ran::

        scores = {site: patching.sweep(m, clean, corrupted, metric, site=site)
                  for site in ("resid_pre", "z")}
        viewer = PatchingViewer(scores, clean, corrupted_tokens=corrupted,
                                clean_value=metric(m(clean)), corrupted_value=metric(m(corrupted)))

    or let it run them: ``PatchingViewer.from_model(m, clean, corrupted, metric)``.

    Traitlets (synced):
      site: the sweep shown (one of ``options["site"]``).
      show: ``"metric"``, ``"change"`` (minus the corrupted run's metric) or
        ``"restored"`` (``(x - corrupted) / (clean - corrupted)``); what is offered
        depends on the baselines given.
      selected_cell: ``[layer, unit]`` highlighted (``[-1, -1]``: none).
      matrix: ``[layer][unit]`` values of ``site`` as ``show`` says.
      row_labels, col_labels: labels of layers and units (tokens for positions).
      unit: ``"pos"``, ``"head"`` or ``"kv_head"``.
      limit: the colour scale runs from ``-limit`` to ``limit``.
      value_label: what the colours mean.
      baselines: ``{"clean": float | None, "corrupted": float | None}``.
    """

    css_class = "gemmalens-patching"

    site = traitlets.Unicode("").tag(sync=True)
    show = traitlets.Unicode("metric").tag(sync=True)
    selected_cell = traitlets.List(traitlets.Int(), [-1, -1]).tag(sync=True)
    matrix = traitlets.List().tag(sync=True)
    row_labels = traitlets.List(traitlets.Unicode()).tag(sync=True)
    col_labels = traitlets.List(traitlets.Unicode()).tag(sync=True)
    unit = traitlets.Unicode("pos").tag(sync=True)
    limit = traitlets.Float(1.0).tag(sync=True)
    value_label = traitlets.Unicode("").tag(sync=True)
    baselines = traitlets.Dict().tag(sync=True)

    _data_controls = ("site", "show")

    def __init__(
        self,
        results: Mapping[str, Any] | Any,
        tokens: Any = None,
        *,
        site: str | None = None,
        corrupted_tokens: Any = None,
        decoder_tokens: Any = None,
        corrupted_decoder_tokens: Any = None,
        tokenizer: Any = None,
        clean_value: float | None = None,
        corrupted_value: float | None = None,
        metric_name: str = "metric",
        show: str | None = None,
        batch: int = 0,
        embed_html: bool = True,
    ):
        """
        Args:
          results: ``{site: [layer, unit] scores}`` as `patching.sweep` returns them (or
            one array, with ``site`` naming it).
          tokens: the clean token ids (or labels), for the position axis.
          site: the site shown first (default: the first of ``results``).
          corrupted_tokens: the corrupted ids; positions where they differ are labelled
            ``clean/corrupted``.
          decoder_tokens, corrupted_decoder_tokens: encoder-decoder models: the decoder's
            ids, which label the positions of ``decoder.*`` sites (``tokens`` label the
            ``encoder.*`` ones).
          tokenizer: decodes the ids.
          clean_value, corrupted_value: the metric of the clean and corrupted runs
            (enable ``show="change"`` / ``"restored"``).
          metric_name: what the metric is called on the colour bar.
          show: what is shown first (default: the most informative the baselines allow).
          batch: which batch row of the tokens labels the positions.
          embed_html: add the static `to_html` copy to the notebook output.
        """
        if not isinstance(results, Mapping):
            results = {site or "sweep": results}
        if not results:
            raise ValueError("PatchingViewer needs at least one sweep result.")
        self._scores = {}
        for name, scores in results.items():
            array = np.asarray(scores, np.float64)
            if array.ndim != 2:
                raise ValueError(
                    f"The {name!r} result has shape {array.shape}; a sweep result is "
                    "[layer, unit] (make the metric return a scalar)."
                )
            self._scores[str(name)] = array
        self._baselines = {
            "clean": None if clean_value is None else float(np.asarray(clean_value)),
            "corrupted": None if corrupted_value is None else float(np.asarray(corrupted_value)),
        }
        self._shows = ["metric"]
        if self._baselines["corrupted"] is not None:
            self._shows.append("change")
            if self._baselines["clean"] is not None:
                self._shows.append("restored")
        self.metric_name = metric_name
        self._labels = self._position_labels(tokens, corrupted_tokens, tokenizer, batch)
        self._decoder_labels = self._position_labels(
            decoder_tokens,
            decoder_tokens if corrupted_decoder_tokens is None else corrupted_decoder_tokens,
            tokenizer,
            batch,
        )
        super().__init__(
            embed_html=embed_html,
            view="patching",
            title="Activation patching",
            tokens=self._labels or [],
            options={
                "site": [[name, name] for name in self._scores],
                "show": [[s, SHOW[s]] for s in self._shows],
            },
            note=(
                "Each cell: the corrupted run with that one site set to its clean value. "
                "Blue raises the metric, red lowers it."
            ),
            baselines=self._baselines,
            site=site or next(iter(self._scores)),
            show=show or self._shows[-1],
        )

    def _position_labels(
        self, tokens: Any, corrupted: Any, tokenizer: Any, batch: int
    ) -> list[str] | None:
        if tokens is None:
            return None
        length = len(token_row(tokens, batch))
        labels = token_labels(tokens, tokenizer, batch, length)
        if corrupted is not None:
            other = token_labels(corrupted, tokenizer, batch, length)
            labels = [a if a == b else f"{a}/{b}" for a, b in zip(labels, other)]
        return labels

    @classmethod
    def from_model(
        cls,
        m: Any,
        clean_tokens: Any,
        corrupted_tokens: Any,
        metric: Callable[[Any], Any],
        sites: Sequence[str] | None = None,
        metric_name: str = "metric",
        decoder_tokens: Any = None,
        corrupted_decoder_tokens: Any = None,
        **kwargs: Any,
    ) -> PatchingViewer:
        """Runs `patching.sweep` for each of ``sites`` (and the two baseline runs) and
        builds the viewer. ``kwargs`` go to the viewer (``site``, ``show``, ...).

        Default sites: ``resid_pre``, ``attn_out``, ``mlp_out`` and ``z``; on an
        encoder-decoder (which also needs ``decoder_tokens``; ``corrupted_decoder_tokens``
        defaults to them) ``encoder.resid_pre``, ``decoder.resid_pre`` and ``decoder.z``."""
        clean, corrupted = ids_of(m, clean_tokens), ids_of(m, corrupted_tokens)
        seq2seq = {}
        if "decoder_tokens" in m.input_streams:
            if decoder_tokens is None:
                raise ValueError(
                    "This is an encoder-decoder model: pass decoder_tokens (and, to corrupt the "
                    "decoder's input, corrupted_decoder_tokens)."
                )
            decoder = ids_of(m, decoder_tokens)
            other = (
                decoder if corrupted_decoder_tokens is None else ids_of(m, corrupted_decoder_tokens)
            )
            seq2seq = {"decoder_tokens": decoder, "corrupted_decoder_tokens": other}
            sites = sites or ("encoder.resid_pre", "decoder.resid_pre", "decoder.z")
            clean_logits = m(clean, decoder_tokens=decoder)
            corrupted_logits = m(corrupted, decoder_tokens=other)
        else:
            sites = sites or ("resid_pre", "attn_out", "mlp_out", "z")
            clean_logits, corrupted_logits = m(clean), m(corrupted)
        results = {
            site: patching.sweep(m, clean, corrupted, metric, site=site, **seq2seq)
            for site in sites
        }
        return cls(
            results,
            clean,
            corrupted_tokens=corrupted,
            decoder_tokens=seq2seq.get("decoder_tokens"),
            corrupted_decoder_tokens=seq2seq.get("corrupted_decoder_tokens"),
            tokenizer=kwargs.pop("tokenizer", m.tokenizer),
            clean_value=float(metric(clean_logits)),
            corrupted_value=float(metric(corrupted_logits)),
            metric_name=metric_name,
            **kwargs,
        )

    @traitlets.validate("site")
    def _check_site(self, proposal: Any) -> str:
        return check_choice("site", proposal["value"], list(self._scores))

    @traitlets.validate("show")
    def _check_show(self, proposal: Any) -> str:
        hint = "" if len(self._shows) == 3 else " (pass clean_value / corrupted_value for more)"
        return check_choice("show", proposal["value"], self._shows, hint)

    @traitlets.validate("selected_cell")
    def _check_cell(self, proposal: Any) -> list[int]:
        row, unit = proposal["value"]
        if [row, unit] != [-1, -1]:
            layers, units = self._scores[self.site].shape
            check_choice("selected_cell layer", row, list(range(layers)))
            check_choice("selected_cell unit", unit, list(range(units)))
        return [row, unit]

    def values(self, site: str | None = None, show: str | None = None) -> np.ndarray:
        """``[layer, unit]`` of ``site`` as ``show`` says (defaults: the current ones)."""
        site = self.site if site is None else check_choice("site", site, list(self._scores))
        show = self.show if show is None else check_choice("show", show, self._shows)
        scores = self._scores[site]
        clean, corrupted = self._baselines["clean"], self._baselines["corrupted"]
        if show == "change":
            return scores - corrupted
        if show == "restored":
            gap = clean - corrupted
            if gap == 0:
                return np.full_like(scores, np.nan)
            return (scores - corrupted) / gap
        return scores

    def _value_label(self, show: str) -> str:
        if show == "metric":
            return self.metric_name
        if show == "change":
            return f"{self.metric_name} − corrupted run's"
        return "fraction of the gap restored"

    def _compute(self, controls: Mapping[str, Any]) -> dict[str, Any]:
        site, show = controls["site"], controls["show"]
        values = self.values(site, show)
        layers, units = values.shape
        labels = self._decoder_labels if site.startswith("decoder.") else self._labels
        unit = _unit_of(site, units, len(labels or []))
        if unit == "pos" and labels is not None and len(labels) == units:
            columns = list(labels)
        else:
            prefix = {"pos": "", "head": "H", "kv_head": "KV"}[unit]
            columns = [f"{prefix}{u}" for u in range(units)]
        return {
            "matrix": values,
            "row_labels": [str(i) for i in range(layers)],
            "col_labels": columns,
            "unit": unit,
            "limit": _figures.symmetric_limit(values),
            "value_label": self._value_label(show),
        }

    def figure(
        self,
        figsize: tuple[float, float] | None = None,
        cmap: str = "RdBu",
        site: str | None = None,
    ) -> Figure:
        """One sweep (default: the current site) as a matplotlib heatmap, diverging
        colours centred at 0."""
        data = self._compute({"site": site or self.site, "show": self.show})
        values = data["matrix"]
        layers, units = values.shape
        figure = _figures.new_figure(*_figures.fitted_size(units, layers), figsize=figsize)
        ax = figure.add_subplot()
        limit = data["limit"]
        image = ax.imshow(
            values, cmap=cmap, vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest"
        )
        row, unit = self.selected_cell
        if row >= 0 and (site is None or site == self.site):
            ax.add_patch(
                Rectangle((unit - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="#222", lw=1.5)
            )
        _figures.tick_labels(
            ax, data["col_labels"], "x", rotation=60 if data["unit"] == "pos" else 0
        )
        ax.set_yticks(np.arange(layers), data["row_labels"], fontsize=8)
        ax.set_xlabel(UNIT_TITLES[data["unit"]])
        ax.set_ylabel("layer")
        ax.set_title(f"Activation patching: {site or self.site}", fontsize=10)
        figure.colorbar(image, ax=ax, label=data["value_label"], shrink=0.8)
        return figure
