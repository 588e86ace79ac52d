"""`AttentionViewer`: attention patterns per layer and head, with the sliding window shown."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import traitlets
from matplotlib import colors
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from penzai import pz

from gemmalens.layers.attention import AttentionMask, DotProductAttention
from gemmalens.widgets import _figures
from gemmalens.widgets._base import (
    LayerViewer,
    ViewerError,
    batch_row,
    check_choice,
    ids_of,
    options_list,
    require_layers,
    token_labels,
    tokenizer_of,
)

PATTERN_HOOK = "{prefix}blocks.{layer}.attn.hook_pattern"
MEAN_HEAD = -1  # the ``head`` value that shows the mean over heads

# Colours of the cells a query cannot see (also in the JavaScript, for the widget).
FUTURE_COLOUR = "#eeeeee"  # masked by causality (keys after the query)
OUTSIDE_COLOUR = "#f6d7a7"  # allowed by causality but outside the sliding window


def window_of(mask: AttentionMask | None, layer_type: str | None = None) -> dict[str, Any]:
    """The ``window`` traitlet of a layer: its attention mask as plain data.

    ``{"type": "sliding" | "global" | "unknown", "causal": bool, "before": int | None,
    "after": int | None, "label": str}``: a key ``k`` is visible from query ``q`` when
    (not causal or ``k <= q``), ``q - k < before`` and ``k - q < after`` (None: no limit),
    as in `gemmalens.layers.attention.AttentionMask`.
    """
    if mask is None:
        kind = {"sliding_attention": "sliding", "full_attention": "global"}.get(layer_type or "")
        return {
            "type": kind or "unknown",
            "causal": True,
            "before": None,
            "after": None,
            "label": "attention mask unknown (no model)",
        }
    sliding = mask.window_before is not None or mask.window_after is not None
    if not sliding:
        label = "global attention: every earlier key" if mask.causal else "global attention"
    elif mask.causal:
        label = f"sliding window: each query sees its last {mask.window_before} keys"
    elif mask.window_before == mask.window_after:
        label = f"sliding window: keys less than {mask.window_before} positions away"
    else:  # lopsided, as in T5Gemma 2's encoder
        back = "all" if mask.window_before is None else mask.window_before - 1
        ahead = "all" if mask.window_after is None else mask.window_after - 1
        label = f"sliding window: {back} keys back, {ahead} ahead"
    return {
        "type": "sliding" if sliding else "global",
        "causal": bool(mask.causal),
        "before": mask.window_before,
        "after": mask.window_after,
        "label": label,
    }


def visibility(window: Mapping[str, Any], queries: int, keys: int) -> np.ndarray:
    """``[queries, keys]`` codes: 0 visible, 1 hidden by causality, 2 outside the window."""
    q = np.arange(queries)[:, None]
    k = np.arange(keys)[None, :]
    future = (k > q) if window.get("causal", True) else np.zeros((queries, keys), bool)
    outside = np.zeros((queries, keys), bool)
    if window.get("before") is not None:
        outside |= q - k >= window["before"]
    if window.get("after") is not None:
        outside |= k - q >= window["after"]
    return np.where(future, 1, np.where(outside, 2, 0))


def _masks_by_hook(model: Any) -> dict[str, AttentionMask]:
    """``{pattern hook name: AttentionMask}`` read off a gemmalens Model's Penzai tree."""
    tree = getattr(model, "model", None)
    if tree is None:
        return {}
    mixers = pz.select(tree).at_instances_of(DotProductAttention).get_sequence()
    return {mixer.hook_pattern.name: mixer.mask for mixer in mixers}


class AttentionViewer(LayerViewer):
    """Attention patterns, one layer and head at a time, with the sliding window visible.

    Tokens label both axes (queries down, keys across). On sliding-window layers the keys
    a query cannot see *because of the window* are hatched (the causally hidden future is
    plain grey), so local and global layers look different at a glance. Hover or click a
    token (or a cell) to see what it attends to (its row) and what attends to it (its
    column).

    Build it from a cache with the patterns captured::

        logits, cache = m.run_with_cache(tokens, names="blocks.*.attn.hook_pattern")
        viewer = AttentionViewer(cache, tokens)      # tokenizer taken from the cache's model
        viewer                                       # the live widget (Jupyter)
        viewer.layer, viewer.head = 5, 2             # or use its selectors
        viewer.figure()                              # a static matplotlib figure

    or in one step: ``AttentionViewer.from_model(m, "The cat sat on the mat")``. In Colab
    run ``from google.colab import output; output.enable_custom_widget_manager()`` once
    (anywidget does it when it detects Colab).

    Traitlets (synced with the front end):
      layer: the layer shown (one whose pattern the cache holds).
      head: the head shown; ``-1`` is the mean over heads.
      selected_token: the query position whose row and column are highlighted (-1: none).
      matrix: ``[query][key]`` the pattern of (layer, head) for batch row ``batch``.
      window: the layer's mask (`window_of`): type, causal, before, after, label.
      key_tokens: labels of the key axis (equal to ``tokens`` unless the keys differ).
    """

    css_class = "gemmalens-attention"

    head = traitlets.Int(0).tag(sync=True)
    matrix = traitlets.List().tag(sync=True)
    window = traitlets.Dict().tag(sync=True)
    key_tokens = traitlets.List(traitlets.Unicode()).tag(sync=True)

    _data_controls = ("layer", "head")

    def __init__(
        self,
        cache: Mapping[str, Any],
        tokens: Any = None,
        *,
        tokenizer: Any = None,
        config: Any = None,
        layer: int | None = None,
        head: int = 0,
        batch: int = 0,
        prefix: str = "",
        layers: Sequence[int] | None = None,
        selected_token: int = -1,
        embed_html: bool = True,
    ):
        """
        Args:
          cache: an `ActivationCache` holding ``blocks.{i}.attn.hook_pattern`` (``[batch,
            head, q_pos, k_pos]``) for at least one layer.
          tokens: the token ids the cache was computed from (``[batch, seq]`` or ``[seq]``)
            or a list of labels; None labels positions by number.
          tokenizer: decodes the ids (default: the cache's model's tokenizer).
          config: the model config, used for the layer types when the cache has no model.
          layer: the layer shown first (default: the first one captured).
          head: the head shown first (-1: mean over heads).
          batch: which batch row to show.
          prefix: hook name prefix for encoder-decoder stacks (``"encoder."``, ``"decoder."``).
          layers: show only these of the cached layers (default: all of them); fewer layers
            make a smaller static HTML copy.
          selected_token: the query highlighted first (-1: none).
          embed_html: add the static `to_html` copy to the notebook output.
        """
        template = PATTERN_HOOK.replace("{prefix}", prefix)
        cached = require_layers(cache, [template], "AttentionViewer", [template.format(layer="*")])
        layers = cached if layers is None else [int(i) for i in layers]
        missing = sorted(set(layers) - set(cached))
        if missing or not layers:
            raise ViewerError(
                f"layers={missing or layers} are not in the cache, which holds the patterns of "
                f"layers {cached}; capture them with names=['{template.format(layer='*')}']."
            )
        self._patterns = {
            i: batch_row(cache[template.format(layer=i)], batch, template.format(layer=i))
            for i in layers
        }
        first = self._patterns[layers[0]]
        if first.ndim != 3:
            raise ValueError(
                f"{template.format(layer=layers[0])} has shape {first.shape} per batch row; "
                "expected [head, q_pos, k_pos]."
            )
        self._layers = layers
        self._heads = first.shape[0]
        model = getattr(cache, "model", None)
        config = config if config is not None else getattr(model, "config", None)
        masks = _masks_by_hook(model)
        layer_types = getattr(config, "layer_types", None)
        self._windows = {
            i: window_of(
                masks.get(template.format(layer=i)),
                layer_types[i] if layer_types and i < len(layer_types) else None,
            )
            for i in layers
        }
        queries, keys = first.shape[1:]
        labels = token_labels(tokens, tokenizer_of(cache, tokenizer), batch, queries)
        key_labels = labels if keys == queries else [str(i) for i in range(keys)]
        options = {
            "layer": options_list(layers, lambda i: f"{i} ({self._windows[i]['type']})"),
            "head": options_list(
                [MEAN_HEAD, *range(self._heads)], lambda h: "mean" if h == MEAN_HEAD else str(h)
            ),
        }
        super().__init__(
            embed_html=embed_html,
            view="attention",
            title="Attention pattern",
            tokens=labels,
            key_tokens=key_labels,
            options=options,
            note="Rows: queries (the token attending); columns: keys (attended to).",
            layer=layers[0] if layer is None else layer,
            head=head,
            selected_token=selected_token,
        )

    @classmethod
    def from_model(
        cls, m: Any, tokens: Any, *, layers: Any = None, **kwargs: Any
    ) -> AttentionViewer:
        """Runs ``m`` on ``tokens`` (text or ids) capturing only the attention patterns
        (of ``layers``, default all) and builds the viewer."""
        ids = ids_of(m, tokens)
        chosen = range(m.config.num_hidden_layers) if layers is None else np.atleast_1d(layers)
        names = [PATTERN_HOOK.format(prefix="", layer=int(i)) for i in chosen]
        _, cache = m.run_with_cache(ids, names=names)
        return cls(cache, ids, **kwargs)

    # -------------------------------------------------------------- validation

    @traitlets.validate("layer")
    def _check_layer(self, proposal: Any) -> int:
        value = proposal["value"]
        if value not in self._layers and 0 <= value < max(self._layers) + 1:
            raise ViewerError(
                f"Layer {value}'s attention pattern is not in the cache (it holds layers "
                f"{self._layers}); capture it with names=['blocks.{value}.attn.hook_pattern']."
            )
        return check_choice("layer", value, self._layers)

    @traitlets.validate("head")
    def _check_head(self, proposal: Any) -> int:
        return check_choice(
            "head", proposal["value"], [MEAN_HEAD, *range(self._heads)], " (-1: mean over heads)"
        )

    # -------------------------------------------------------------- data

    def pattern(self, layer: int | None = None, head: int | None = None) -> np.ndarray:
        """``[q_pos, k_pos]`` attention weights of (layer, head); head -1 is the mean."""
        layer = self.layer if layer is None else check_choice("layer", layer, self._layers)
        head = self.head if head is None else head
        weights = self._patterns[layer]
        return weights.mean(axis=0) if head == MEAN_HEAD else weights[head]

    def _compute(self, controls: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "matrix": self.pattern(controls["layer"], controls["head"]),
            "window": self._windows[controls["layer"]],
        }

    def top_attended(self, token: int, k: int = 5) -> list[tuple[int, str, float]]:
        """What query ``token`` attends to most (its row): ``[(key_pos, label, weight)]``."""
        row = self.pattern()[token]
        order = np.argsort(-row, kind="stable")[:k]
        return [(int(i), self.key_tokens[i], float(row[i])) for i in order]

    def top_attending(self, token: int, k: int = 5) -> list[tuple[int, str, float]]:
        """Which queries attend to key ``token`` most (its column)."""
        column = self.pattern()[:, token]
        order = np.argsort(-column, kind="stable")[:k]
        return [(int(i), self.tokens[i], float(column[i])) for i in order]

    # -------------------------------------------------------------- figure

    def figure(self, figsize: tuple[float, float] | None = None, cmap: str = "Blues") -> Figure:
        """The pattern of the current layer and head as a matplotlib figure: keys outside
        the sliding window shaded, the selected token's row and column outlined."""
        matrix = self.pattern()
        window = self._windows[self.layer]
        queries, keys = matrix.shape
        figure = _figures.new_figure(*_figures.fitted_size(keys, queries), figsize=figsize)
        ax = figure.add_subplot()
        code = visibility(window, queries, keys)
        shown = np.ma.masked_where(code != 0, matrix)
        image = ax.imshow(shown, cmap=cmap, vmin=0.0, aspect="auto", interpolation="nearest")
        hidden = np.zeros((queries, keys, 4))
        hidden[code == 1] = colors.to_rgba(FUTURE_COLOUR)
        hidden[code == 2] = colors.to_rgba(OUTSIDE_COLOUR)
        ax.imshow(hidden, aspect="auto", interpolation="nearest")
        if (code == 2).any():
            ax.legend(
                handles=[Patch(color=OUTSIDE_COLOUR, label="outside the sliding window")],
                loc="upper right",
                fontsize=8,
                framealpha=0.9,
            )
        if self.selected_token >= 0:
            t = self.selected_token
            style = dict(fill=False, edgecolor="#d62728", linewidth=1.5)
            ax.add_patch(Rectangle((-0.5, t - 0.5), keys, 1, **style))
            if t < keys:
                ax.add_patch(Rectangle((t - 0.5, -0.5), 1, queries, **style))
        _figures.tick_labels(ax, self.key_tokens, "x")
        _figures.tick_labels(ax, self.tokens, "y")
        ax.set_xlabel("key (attended to)")
        ax.set_ylabel("query (attending)")
        head = "mean over heads" if self.head == MEAN_HEAD else f"head {self.head}"
        ax.set_title(f"Layer {self.layer}, {head} ({window['label']})", fontsize=10)
        figure.colorbar(image, ax=ax, label="attention weight", shrink=0.8)
        return figure
