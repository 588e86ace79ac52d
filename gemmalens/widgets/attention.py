"""`AttentionViewer`: attention patterns per layer and head, with the sliding window shown;
for encoder-decoder models (T5Gemma 2) the encoder's, and the decoder's self and cross parts."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import traitlets
from matplotlib import colors
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from penzai import pz

from gemmalens.encdec import EncoderDecoderModel
from gemmalens.layers.attention import AttentionMask, DotProductAttention
from gemmalens.layers.merged_attention import MergedDotProductAttention
from gemmalens.widgets import _figures
from gemmalens.widgets._base import (
    MEAN_HEAD,
    LayerViewer,
    ViewerError,
    batch_row,
    check_choice,
    check_head,
    ids_of,
    layers_with,
    options_list,
    require_layers,
    select_head,
    token_labels,
    tokenizer_of,
)

PATTERN_HOOK = "{prefix}blocks.{layer}.attn.hook_pattern"

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
    """``[queries, keys]`` codes: 0 visible, 1 hidden by causality, 2 outside the window.

    The mask applies to the first ``window["self_keys"]`` keys (default: all), the queries'
    own tokens; keys after them are the encoder's (T5Gemma 2's cross part), all visible.
    """
    q = np.arange(queries)[:, None]
    k = np.arange(keys)[None, :]
    future = (k > q) if window.get("causal", True) else np.zeros((queries, keys), bool)
    outside = np.zeros((queries, keys), bool)
    if window.get("before") is not None:
        outside |= q - k >= window["before"]
    if window.get("after") is not None:
        outside |= k - q >= window["after"]
    own = k < window.get("self_keys", keys)
    return np.where(own & future, 1, np.where(own & outside, 2, 0))


@dataclasses.dataclass(frozen=True)
class Part:
    """One kind of attention pattern the viewer shows (a value of its ``part`` control).

    Attributes:
      hook: the pattern's hook name, with ``{layer}``.
      label: what the part selector and the errors call it.
      queries: whose tokens the queries are: ``"tokens"`` or ``"decoder_tokens"``.
      keys: whose tokens the keys are, in order (T5Gemma 2's merged row: the decoder's own
        keys, then the encoder's). The layer's mask applies to the keys of the queries' own
        tokens only.
      stack: the config of the stack (``config.encoder`` / ``config.decoder``; None: the
        config itself), which gives the layer types.
      key_title: the key axis' title.
    """

    hook: str
    label: str
    queries: str = "tokens"
    keys: tuple[str, ...] = ("tokens",)
    stack: str | None = None
    key_title: str = "key (attended to)"


# T5Gemma 2: the encoder's self-attention, and the decoder's merged attention (one softmax
# over its own keys and the encoder's) whole and in its two parts.
ENCODER_DECODER_PARTS = {
    "encoder": Part("encoder.blocks.{layer}.attn.hook_pattern", "encoder self-attention",
                    stack="encoder"),
    "self": Part("decoder.blocks.{layer}.attn.hook_self_pattern", "decoder self part",
                 "decoder_tokens", ("decoder_tokens",), "decoder"),
    "cross": Part("decoder.blocks.{layer}.attn.hook_cross_pattern", "decoder cross part",
                  "decoder_tokens", ("tokens",), "decoder", "key: encoder token (attended to)"),
    "merged": Part("decoder.blocks.{layer}.attn.hook_pattern", "decoder merged row",
                   "decoder_tokens", ("decoder_tokens", "tokens"), "decoder",
                   "key: decoder tokens, then encoder tokens"),
}  # fmt: skip
# The stacks the older ``prefix`` argument picks.
PART_OF_PREFIX = {"encoder.": "encoder", "decoder.": "merged"}


def _masks_by_hook(model: Any) -> dict[str, AttentionMask]:
    """``{pattern hook name: AttentionMask}`` read off a gemmalens Model's Penzai tree (a
    merged decoder layer's mask is that of its self part)."""
    tree = getattr(model, "model", None)
    if tree is None:
        return {}
    mixers = pz.select(tree).at_instances_of((DotProductAttention, MergedDotProductAttention))
    masks = {}
    for mixer in mixers.get_sequence():
        for hook in (mixer.hook_pattern, getattr(mixer, "hook_self_pattern", None)):
            if hook is not None:
                masks[hook.name] = mixer.mask
    return masks


def _parts_of(cache: Mapping[str, Any], prefix: str) -> dict[str, Part]:
    """The parts a cache of this kind of model can hold."""
    model = getattr(cache, "model", None)
    encoder_decoder = isinstance(model, EncoderDecoderModel) or any(
        str(name).startswith(("encoder.", "decoder.")) for name in cache
    )
    if encoder_decoder and prefix in ("", *PART_OF_PREFIX):
        return ENCODER_DECODER_PARTS
    return _one_stack(prefix)


def _one_stack(prefix: str = "") -> dict[str, Part]:
    """The parts of a decoder-only model (or of the stack named by ``prefix``): one."""
    return {"self": Part(PATTERN_HOOK.replace("{prefix}", prefix), "attention pattern")}


def _stack_config(config: Any, part: Part) -> Any:
    """The config of ``part``'s stack (``config.encoder``, ...; ``config`` itself if none)."""
    return getattr(config, part.stack) if part.stack and config is not None else config


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

    For an encoder-decoder model (T5Gemma 2, `gemmalens.EncoderDecoderModel`) a *part*
    selector picks what is shown, among the parts the cache holds:

    * ``"encoder"``: the encoder's self-attention (bidirectional; sliding on local layers),
      ``encoder.blocks.{i}.attn.hook_pattern``, encoder tokens on both axes;
    * ``"self"``: the decoder's self part, ``decoder.blocks.{i}.attn.hook_self_pattern``;
    * ``"cross"``: the decoder's cross part, ``decoder.blocks.{i}.attn.hook_cross_pattern``,
      decoder tokens down and encoder tokens across (no window);
    * ``"merged"``: the decoder's whole row, ``decoder.blocks.{i}.attn.hook_pattern``: its
      own keys, then the encoder's.

    The decoder's self and cross parts come from one softmax: a row of either part alone
    sums to less than one (together, to one)::

        viewer = AttentionViewer.from_model(m, "reverse: a b c", decoder_tokens="c b a",
                                            part="cross")
        viewer.part = "encoder"                      # or use the Part selector

    Traitlets (synced with the front end):
      part: the part shown (``"self"`` for a decoder-only model, its only part).
      layer: the layer shown (one whose pattern the cache holds for this part).
      head: the head shown; ``-1`` is the mean over heads.
      selected_token: the query position whose row and column are highlighted (-1: none).
      matrix: ``[query][key]`` the pattern of (part, layer, head) for batch row ``batch``.
      window: the layer's mask (`window_of`): type, causal, before, after, label; and
        ``self_keys`` (the mask covers the first ``self_keys`` keys, the queries' own
        tokens; later keys are the encoder's) and ``key_title``.
      tokens: labels of the queries; key_tokens: labels of the keys.
    """

    css_class = "gemmalens-attention"

    part = traitlets.Unicode("self").tag(sync=True)
    head = traitlets.Int(0).tag(sync=True)
    matrix = traitlets.List().tag(sync=True)
    window = traitlets.Dict().tag(sync=True)
    key_tokens = traitlets.List(traitlets.Unicode()).tag(sync=True)

    _data_controls = ("part", "layer", "head")

    def __init__(
        self,
        cache: Mapping[str, Any],
        tokens: Any = None,
        *,
        decoder_tokens: Any = None,
        part: str | None = None,
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
            head, q_pos, k_pos]``) for at least one layer; for an encoder-decoder model,
            any of the parts' patterns (see the class docstring), e.g. all of them with
            ``m.run_with_cache(tokens, decoder_tokens=..., names="*pattern")``.
          tokens: the token ids the cache was computed from (``[batch, seq]`` or ``[seq]``)
            or a list of labels; None labels positions by number. For an encoder-decoder
            model, the encoder's tokens.
          decoder_tokens: an encoder-decoder model's decoder tokens, as ``tokens``.
          part: the part shown first (``"encoder"``, ``"self"``, ``"cross"`` or
            ``"merged"``; default: the first the cache holds).
          tokenizer: decodes the ids (default: the cache's model's tokenizer).
          config: the model config, used for the layer types when the cache has no model.
          layer: the layer shown first (default: the first one captured).
          head: the head shown first (-1: mean over heads).
          batch: which batch row to show.
          prefix: hook name prefix of the stack (``"encoder."`` is ``part="encoder"``,
            ``"decoder."`` is ``part="merged"``).
          layers: show only these of the cached layers (default: all of them); fewer layers
            make a smaller static HTML copy.
          selected_token: the query highlighted first (-1: none).
          embed_html: add the static `to_html` copy to the notebook output.
        """
        if not isinstance(cache, Mapping):  # before reading its names
            require_layers(cache, [], "AttentionViewer", [])
        parts = _parts_of(cache, prefix)
        found = {name: layers_with(cache, p.hook) for name, p in parts.items()}
        found = {name: cached for name, cached in found.items() if cached}
        if not found:  # the error names every part's hooks
            hooks = [p.hook for p in parts.values()]
            require_layers(
                cache, hooks[:1], "AttentionViewer", [h.format(layer="*") for h in hooks]
            )
        part = part or PART_OF_PREFIX.get(prefix) or next(iter(found))
        self._check_part_cached(part, parts, found)
        chosen = found[part] if layers is None else [int(i) for i in layers]
        missing = sorted(set(chosen) - set(found[part]))
        if missing or not chosen:
            template = parts[part].hook
            raise ViewerError(
                f"layers={missing or chosen} are not in the cache, which holds the patterns of "
                f"layers {found[part]}; capture them with names=['{template.format(layer='*')}']."
            )
        kept = {n: [i for i in found[n] if layers is None or i in chosen] for n in found}
        self._layers_of = {n: shown for n, shown in kept.items() if shown}
        self._parts = {n: parts[n] for n in self._layers_of}
        self._kind = parts  # the parts this kind of model has, for the errors
        self._patterns = {}
        for name, p in self._parts.items():
            for i in self._layers_of[name]:
                hook = p.hook.format(layer=i)
                self._patterns[name, i] = batch_row(cache[hook], batch, hook)
                if self._patterns[name, i].ndim != 3:
                    raise ValueError(
                        f"{hook} has shape {self._patterns[name, i].shape} per batch row; "
                        "expected [head, q_pos, k_pos]."
                    )
        first = {name: self._patterns[name, self._layers_of[name][0]] for name in self._parts}
        self._heads = {name: pattern.shape[0] for name, pattern in first.items()}
        self._labels = self._token_labels(
            first,
            {"tokens": tokens, "decoder_tokens": decoder_tokens},
            tokenizer_of(cache, tokenizer),
            batch,
        )
        model = getattr(cache, "model", None)
        self._windows = self._layer_windows(
            _masks_by_hook(model), config if config is not None else getattr(model, "config", None)
        )
        # A decoder-only viewer's static copy keeps its [layer, head] states.
        self._static_controls = (
            ("part", "layer", "head") if len(self._parts) > 1 else ("layer", "head")
        )
        super().__init__(
            embed_html=embed_html,
            view="attention",
            title="Attention pattern",
            tokens=self._labels[self._parts[part].queries],
            note="Rows: queries (the token attending); columns: keys (attended to).",
            part=part,
            layer=self._layers_of[part][0] if layer is None else layer,
            head=head,
            selected_token=selected_token,
        )

    def _token_labels(
        self, first: Mapping[str, np.ndarray], given: Mapping[str, Any], tokenizer: Any, batch: int
    ) -> dict[str, list[str]]:
        """``{"tokens" | "decoder_tokens": labels}``, as many as the patterns' axes have."""
        lengths: dict[str, int] = {}
        for name, pattern in first.items():
            part, (queries, keys) = self._parts[name], pattern.shape[1:]
            lengths.setdefault(part.queries, queries)
            *before, last = part.keys  # the merged row's keys: the queries' own, then the rest
            lengths.setdefault(last, keys - sum(lengths[source] for source in before))
        return {
            source: token_labels(given[source], tokenizer, batch, length)
            for source, length in lengths.items()
        }

    def _layer_windows(
        self, masks: Mapping[str, AttentionMask], config: Any
    ) -> dict[tuple[str, int], dict[str, Any]]:
        """``{(part, layer): window}``; the mask covers the keys of the queries' own tokens."""
        windows = {}
        for (name, i), pattern in self._patterns.items():
            part = self._parts[name]
            if part.keys[0] == part.queries:
                layer_types = getattr(_stack_config(config, part), "layer_types", None)
                layer_type = layer_types[i] if layer_types and i < len(layer_types) else None
                window = window_of(masks.get(part.hook.format(layer=i)), layer_type)
                self_keys = len(self._labels[part.queries])
            else:  # the cross part: every encoder token, whatever the layer's window
                window = window_of(AttentionMask(causal=False))
                window["label"] = "cross attention: every encoder token"
                self_keys = 0
            if 0 < self_keys < pattern.shape[-1]:
                window["label"] += "; plus every encoder token"
            windows[name, i] = {**window, "self_keys": self_keys, "key_title": part.key_title}
        return windows

    @classmethod
    def from_model(
        cls,
        m: Any,
        tokens: Any,
        *,
        decoder_tokens: Any = None,
        layers: Any = None,
        **kwargs: Any,
    ) -> AttentionViewer:
        """Runs ``m`` on ``tokens`` (text or ids) capturing only the attention patterns
        (of ``layers``, default all) and builds the viewer.

        An encoder-decoder model (T5Gemma 2) also needs ``decoder_tokens`` (text, or ids
        ``[batch, dec_seq]`` starting with the decoder start token); every part is captured
        (``part=`` picks the one shown first)."""
        encoder_decoder = isinstance(m, EncoderDecoderModel)
        if encoder_decoder and decoder_tokens is None:
            raise ViewerError(
                "An encoder-decoder model's attention needs the decoder's input as well: pass "
                "decoder_tokens= (text, or ids starting with the decoder start token "
                f"{m.config.decoder_start_token_id})."
            )
        if not encoder_decoder and decoder_tokens is not None:
            raise ViewerError(
                "decoder_tokens is for encoder-decoder models (T5Gemma 2); this model is "
                "decoder-only: pass its tokens alone."
            )
        names, depths = [], {}
        for part in (ENCODER_DECODER_PARTS if encoder_decoder else _one_stack()).values():
            depth = depths[part.stack] = _stack_config(m.config, part).num_hidden_layers
            chosen = range(depth) if layers is None else np.atleast_1d(layers)
            names += [part.hook.format(layer=int(i)) for i in chosen if 0 <= i < depth]
        deepest = max(depths.values())
        outside = [] if layers is None else [int(i) for i in np.atleast_1d(layers)]
        outside = [i for i in outside if not 0 <= i < deepest]
        if outside or not names:
            has = " and ".join(
                f"{depth} {stack + ' ' if stack else ''}layers" for stack, depth in depths.items()
            )
            raise ViewerError(
                f"layers={outside or np.atleast_1d(layers).tolist()} are not layers of this "
                f"model: it has {has}."
            )
        ids = ids_of(m, tokens)
        if not encoder_decoder:
            return cls(m.run_with_cache(ids, names=names)[1], ids, **kwargs)
        decoder_ids = ids_of(m, decoder_tokens)
        _, cache = m.run_with_cache(ids, decoder_tokens=decoder_ids, names=names)
        return cls(cache, ids, decoder_tokens=decoder_ids, **kwargs)

    # -------------------------------------------------------------- validation

    @staticmethod
    def _check_part_cached(
        part: str, parts: Mapping[str, Part], found: Mapping[str, list[int]]
    ) -> None:
        if part in found:
            return
        if part in ENCODER_DECODER_PARTS and parts is not ENCODER_DECODER_PARTS:
            raise ViewerError(
                f"part={part!r} is a part of an encoder-decoder model's attention (T5Gemma 2); "
                "this cache is of a decoder-only model, whose attention has one part, 'self'. "
                "Run a gl.EncoderDecoderModel with decoder_tokens=... to see it."
            )
        if part not in parts:
            check_choice("part", part, list(parts))
        hook = parts[part].hook.format(layer="*")
        raise ViewerError(
            f"part={part!r} ({parts[part].label}) is not in the cache, which holds the parts "
            f"{list(found)}; capture it with names=['{hook}']."
        )

    @property
    def _layers(self) -> list[int]:
        return self._layers_of[self.part]

    @traitlets.validate("part")
    def _check_part(self, proposal: Any) -> str:
        self._check_part_cached(proposal["value"], self._kind, self._layers_of)
        return proposal["value"]

    @traitlets.validate("layer")
    def _check_layer(self, proposal: Any) -> int:
        value = proposal["value"]
        if value not in self._layers and 0 <= value < max(self._layers) + 1:
            part = self._parts[self.part]
            raise ViewerError(
                f"Layer {value}'s {part.label} is not in the cache (it holds layers "
                f"{self._layers}); capture it with names=['{part.hook.format(layer=value)}']."
            )
        return check_choice("layer", value, self._layers)

    @traitlets.validate("head")
    def _check_head(self, proposal: Any) -> int:
        return check_head(proposal["value"], self._heads[self.part])

    @traitlets.observe("tokens")
    def _forget_selection_past_the_end(self, change: Any) -> None:
        if self.selected_token >= len(change["new"]):  # a part with fewer queries
            self.selected_token = -1

    # -------------------------------------------------------------- data

    def _head_values(self, part: str) -> list[int]:
        return [MEAN_HEAD, *range(self._heads[part])]

    def pattern(
        self, layer: int | None = None, head: int | None = None, part: str | None = None
    ) -> np.ndarray:
        """``[q_pos, k_pos]`` attention weights of (part, layer, head); head -1 is the mean
        (default: what is shown)."""
        part = self.part if part is None else check_choice("part", part, list(self._parts))
        layers = self._layers_of[part]
        layer = self.layer if layer is None else check_choice("layer", layer, layers)
        head = self.head if head is None else head
        weights = self._patterns[part, layer]
        return select_head(weights, head)

    def _compute(self, controls: Mapping[str, Any]) -> dict[str, Any]:
        # Parts can differ in depth and heads: another part keeps the nearest layer and head.
        part = self._parts[controls["part"]]
        layers = self._layers_of[controls["part"]]
        layer = min(layers, key=lambda i: (abs(i - controls["layer"]), i))
        head = min(controls["head"], self._heads[controls["part"]] - 1)
        options = {
            "layer": options_list(
                layers, lambda i: f"{i} ({self._windows[controls['part'], i]['type']})"
            ),
            "head": options_list(
                self._head_values(controls["part"]), lambda h: "mean" if h == MEAN_HEAD else str(h)
            ),
        }
        if len(self._parts) > 1:
            options["part"] = options_list(self._parts, lambda n: self._parts[n].label)
        return {
            "layer": layer,
            "head": head,
            "options": options,
            "tokens": self._labels[part.queries],
            "key_tokens": [label for source in part.keys for label in self._labels[source]],
            "matrix": self.pattern(layer, head, controls["part"]),
            "window": self._windows[controls["part"], layer],
        }

    def _static_state(self, controls: Mapping[str, Any]) -> dict[str, Any]:
        state = self._compute(controls)
        if len(self._parts) == 1:  # one part: only these follow the layer and head
            return {name: state[name] for name in ("matrix", "window")}
        return state

    def _static_values(self) -> dict[str, list]:
        every = {
            "part": list(self._parts),
            "layer": sorted(set(itertools.chain(*self._layers_of.values()))),
            "head": [MEAN_HEAD, *range(max(self._heads.values()))],
        }
        return {control: every[control] for control in self._static_controls}

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
        window = self._windows[self.part, self.layer]
        queries, keys = matrix.shape
        self_keys = window["self_keys"]
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
            if t < self_keys:
                ax.add_patch(Rectangle((t - 0.5, -0.5), 1, queries, **style))
        if 0 < self_keys < keys:  # the merged row: the decoder's keys | the encoder's
            ax.axvline(self_keys - 0.5, color="#444444", linewidth=1.2)
        _figures.tick_labels(ax, self.key_tokens, "x")
        _figures.tick_labels(ax, self.tokens, "y")
        ax.set_xlabel(window["key_title"])
        ax.set_ylabel("query (attending)")
        head = "mean over heads" if self.head == MEAN_HEAD else f"head {self.head}"
        title = f"Layer {self.layer}, {head} ({window['label']})"
        if len(self._parts) > 1:
            title = f"{self._parts[self.part].label.capitalize()}: {title[0].lower()}{title[1:]}"
        ax.set_title(title, fontsize=10)
        figure.colorbar(image, ax=ax, label="attention weight", shrink=0.8)
        return figure
