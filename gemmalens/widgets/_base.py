"""What every viewer shares: the widget base class, its static HTML copy, token labels.

A viewer is an `anywidget.AnyWidget`. Python owns the data: the *controls* (``layer``,
``head``, ...) and the *data* the front end draws (``matrix``, ``window``, ...) are synced
traitlets, and a change of a control makes Python recompute the data. The front end is
one vanilla-JavaScript module (``static/gemmalens_widgets.js``) whose ``render`` draws
every viewer from a model; `Viewer.to_html` inlines the same module with the data of every
control value as JSON and a small stand-in for the model, so the copy stays interactive
with no kernel and no network.
"""

from __future__ import annotations

import fnmatch
import hashlib
import itertools
import json
import math
import pathlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import anywidget
import numpy as np
import traitlets

STATIC = pathlib.Path(__file__).parent / "static"
ESM = STATIC / "gemmalens_widgets.js"
CSS = STATIC / "gemmalens_widgets.css"

# The static copy embeds the data of every control value; beyond this many numbers it
# embeds fewer values of the controls with the most values (and says so on the page).
# About 6 bytes a number: about 1.5 MB of HTML at most.
MAX_STATIC_VALUES = 250_000
# Significant digits of the numbers in the static copy (relative to each array's largest).
STATIC_DIGITS = 4

_html_counter = itertools.count()


class ViewerError(traitlets.TraitError, ValueError):
    """A control set to a value the viewer cannot show (a `ValueError`)."""


# ----------------------------------------------------------------------------- tokens


_VISIBLE = {" ": "·", "\n": "↵", "\t": "⇥", "▁": "·"}


def display_token(text: str) -> str:
    """A token's text made visible: spaces as ``·``, newlines as ``↵``, tabs as ``⇥``,
    other control characters as ``\\xNN``; the empty string as ``∅``."""
    shown = "".join(
        _VISIBLE.get(ch, ch if ch.isprintable() else f"\\x{ord(ch):02x}") for ch in text
    )
    return shown or "∅"


class TokenNamer:
    """Token id -> display text, with a cache (decoding one id at a time is the slow part)."""

    def __init__(self, tokenizer: Any = None):
        self.tokenizer = tokenizer
        self._names: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        token_id = int(token_id)
        name = self._names.get(token_id)
        if name is None:
            name = self._names[token_id] = self._name(token_id)
        return name

    def _name(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"#{token_id}"
        try:
            text = self.tokenizer.decode([token_id])
        except (ValueError, IndexError):
            return f"#{token_id}"
        # Control tokens (<bos>, <eos>) decode to nothing and a lone byte of a multi-byte
        # character to U+FFFD: the piece (``<bos>``, ``<0xE2>``) says more.
        if not text or "\ufffd" in text:
            text = self.tokenizer.id_to_piece(token_id)
        return display_token(text)


def token_row(tokens: Any, batch: int) -> np.ndarray | list[str] | None:
    """One row of ``tokens``: ids ``[batch, seq]`` or ``[seq]`` -> ``[seq]`` ids; a list of
    strings is returned as is (labels given by the user)."""
    if tokens is None:
        return None
    if isinstance(tokens, (list, tuple)) and tokens and isinstance(tokens[0], str):
        return [str(t) for t in tokens]
    array = np.asarray(tokens)
    if array.ndim == 2:
        if not 0 <= batch < array.shape[0]:
            raise ValueError(f"batch must be in [0, {array.shape[0]}), got {batch}.")
        array = array[batch]
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            "tokens must be token ids ([batch, seq] or [seq] integers) or a list of strings; "
            f"got an array of shape {array.shape} and dtype {array.dtype}."
        )
    return array


def token_labels(tokens: Any, tokenizer: Any, batch: int, length: int) -> list[str]:
    """Display labels for the ``length`` positions of one batch row.

    ``tokens``: ids (decoded with ``tokenizer`` when given, else shown as ``#id``), a list
    of label strings, or None (positions ``0 .. length-1``).
    """
    row = token_row(tokens, batch)
    if row is None:
        return [str(i) for i in range(length)]
    if len(row) != length:
        raise ValueError(
            f"tokens has {len(row)} positions but the cached values have {length}; pass the "
            "tokens the cache was computed from."
        )
    if isinstance(row, list):
        return [display_token(t) for t in row]
    namer = TokenNamer(tokenizer)
    return [namer(t) for t in row]


def ids_of(m: Any, tokens: Any) -> np.ndarray:
    """``[batch, seq]`` token ids for ``tokens`` given as text (encoded with ``m``'s
    tokenizer, with BOS) or as ids (``[seq]`` or ``[batch, seq]``)."""
    if isinstance(tokens, str) or (
        isinstance(tokens, (list, tuple)) and tokens and isinstance(tokens[0], str)
    ):
        ids, _ = m.to_tokens(tokens)
        return np.asarray(ids)
    ids = np.asarray(tokens)
    return ids[None] if ids.ndim == 1 else ids


def tokenizer_of(cache: Any, tokenizer: Any) -> Any:
    """The tokenizer given, else the cache's model's, else None."""
    if tokenizer is not None:
        return tokenizer
    model = getattr(cache, "model", None)
    return getattr(model, "tokenizer", None)


# ----------------------------------------------------------------------------- caches


def layers_with(cache: Mapping[str, Any], template: str) -> list[int]:
    """The layer indices ``i`` for which ``template.format(layer=i)`` is in ``cache``."""
    pattern = re.compile("^" + re.escape(template).replace(re.escape("{layer}"), r"(\d+)") + "$")
    found = [int(m.group(1)) for name in cache for m in [pattern.match(name)] if m]
    return sorted(found)


def require_hook_points(m: Any, template: str, viewer: str, needs: str) -> None:
    """Refuses, before running it, a model without hook points like ``template``
    (``blocks.{layer}.moe.hook_router_logits``): a viewer of one family's mechanism."""
    pattern = template.format(layer="*")
    if not any(fnmatch.fnmatchcase(name, pattern) for name in m.hook_names):
        raise ViewerError(
            f"{viewer} shows {needs}; this model has no hook points like {pattern!r}."
        )


def require_layers(
    cache: Mapping[str, Any], templates: Sequence[str], viewer: str, capture: Sequence[str]
) -> list[int]:
    """The layers that have every hook of ``templates`` in ``cache``; a clear error when
    none has, naming the run_with_cache names to capture."""
    if not isinstance(cache, Mapping):
        raise TypeError(
            f"{viewer} takes the ActivationCache of m.run_with_cache(...), got "
            f"{type(cache).__name__}."
        )
    sets = [set(layers_with(cache, t)) for t in templates]
    layers = sorted(set.intersection(*sets)) if sets else []
    if layers:
        return layers
    wanted = ", ".join(repr(c) for c in capture)
    missing = [t.format(layer="{i}") for t, s in zip(templates, sets) if not s]
    raise KeyError(
        f"{viewer} needs {', '.join(repr(m) for m in missing)} in the cache, which has none "
        f"of them. Capture them with m.run_with_cache(tokens, names=[{wanted}]) (or "
        "names=None for everything)."
    )


def batch_row(array: Any, batch: int, name: str) -> np.ndarray:
    """``array[batch]`` as float32 numpy, with a clear error for a bad batch index."""
    array = np.asarray(array)
    if not 0 <= batch < array.shape[0]:
        raise ValueError(f"batch must be in [0, {array.shape[0]}) for {name!r}, got {batch}.")
    return np.asarray(array[batch], np.float32)


def check_choice(name: str, value: Any, allowed: Sequence[Any], hint: str = "") -> Any:
    """``value`` if it is one of ``allowed``, else a `ViewerError` naming the valid range."""
    if value in allowed:
        return value
    ints = all(isinstance(a, (int, np.integer)) for a in allowed)
    if len(allowed) == 1:
        valid = f"{allowed[0]!r} (the only choice here)"
    elif ints and allowed and list(allowed) == list(range(allowed[0], allowed[-1] + 1)):
        valid = f"in [{allowed[0]}, {allowed[-1]}]"
    else:
        valid = f"one of {list(allowed)}"
    raise ViewerError(f"{name} must be {valid}, got {value!r}.{hint}")


MEAN_HEAD = -1  # the ``head`` value that shows the mean over heads


def check_head(value: Any, heads: int) -> int:
    """``value`` if it is a head of ``heads`` or `MEAN_HEAD`, else a `ViewerError`."""
    return check_choice("head", value, [MEAN_HEAD, *range(heads)], " (-1: mean over heads)")


def select_head(pattern: np.ndarray, head: int) -> np.ndarray:
    """``pattern [..., head, query, key]`` at one head, or its mean over heads for
    `MEAN_HEAD`: ``[..., query, key]``."""
    return pattern.mean(axis=-3) if head == MEAN_HEAD else pattern[..., head, :, :]


# ----------------------------------------------------------------------------- JSON


def round_significant(array: np.ndarray, digits: int) -> np.ndarray:
    """``array`` rounded to ``digits`` significant digits of its largest magnitude (so
    small entries of a probability table become 0 rather than long decimals)."""
    array = np.asarray(array, np.float64)
    finite = array[np.isfinite(array)]
    peak = float(np.abs(finite).max()) if finite.size else 0.0
    if peak == 0.0:
        return array
    decimals = digits - 1 - math.floor(math.log10(peak))
    return np.round(array, decimals)


def jsonable(value: Any, digits: int | None = None) -> Any:
    """``value`` with numpy arrays and scalars as lists and numbers (NaN and inf as None,
    which JSON lacks); with ``digits``, float arrays rounded (`round_significant`)."""
    if isinstance(value, np.ndarray):
        if np.issubdtype(value.dtype, np.floating):
            array = round_significant(value, digits) if digits else value.astype(np.float64)
            listed = array.tolist()
            if not np.isfinite(array).all():
                listed = _nan_to_none(listed)
            return listed
        return value.tolist()
    if isinstance(value, (np.floating, float)):
        number = float(value)
        return number if math.isfinite(number) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, digits) for v in value]
    return value


def _nan_to_none(listed: Any) -> Any:
    if isinstance(listed, list):
        return [_nan_to_none(v) for v in listed]
    return listed if math.isfinite(listed) else None


def count_numbers(value: Any) -> int:
    """How many numbers (and strings) a JSON-able value holds: the size of a state."""
    if isinstance(value, np.ndarray):
        return int(value.size)
    if isinstance(value, Mapping):
        return sum(count_numbers(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(count_numbers(v) for v in value)
    return 1


def script_json(value: Any) -> str:
    """JSON that is safe inside a ``<script>`` element (no ``</script>``, no U+2028)."""
    text = json.dumps(value, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def state_key(values: Iterable[Any]) -> str:
    """The key of one combination of control values, as the JavaScript writes it
    (``JSON.stringify`` of the list: no spaces)."""
    return json.dumps(list(values), separators=(",", ":"))


# ----------------------------------------------------------------------------- the base


class Viewer(anywidget.AnyWidget):
    """Base class of the gemmalens viewers (see the module docstring).

    Subclasses declare their controls and data as synced traitlets, list the controls
    whose change recomputes data in ``_data_controls`` and implement ``_compute``.

    Traitlets every viewer has:
      view: which viewer the front end draws (``"attention"``, ``"altup"``, ...).
      title: the heading.
      tokens: display labels of the positions, ``[pos]``.
      options: ``{control: [[value, label], ...]}``, the values each selector offers.
      note: a line under the viewer (what is shown, or what a static copy left out).
    """

    _esm = ESM
    _css = CSS

    view = traitlets.Unicode("").tag(sync=True)
    title = traitlets.Unicode("").tag(sync=True)
    tokens = traitlets.List(traitlets.Unicode()).tag(sync=True)
    options = traitlets.Dict().tag(sync=True)
    note = traitlets.Unicode("").tag(sync=True)

    # Controls whose change recomputes the data traitlets.
    _data_controls: ClassVar[tuple[str, ...]] = ()
    # Controls whose values the static copy enumerates (default: ``_data_controls``).
    _static_controls: ClassVar[tuple[str, ...] | None] = None
    # The root class the front end gives the viewer's element.
    css_class: ClassVar[str] = ""

    def __init__(self, embed_html: bool = True, **kwargs: Any):
        self._ready = False
        self.embed_html = embed_html
        super().__init__(**kwargs)
        self._ready = True
        self.observe(self._on_control, names=list(self._data_controls))
        self._refresh()

    # -------------------------------------------------------------- data

    def _compute(self, controls: Mapping[str, Any]) -> dict[str, Any]:
        """The data traitlets for the control values ``controls`` (numpy arrays welcome)."""
        raise NotImplementedError

    def _static_state(self, controls: Mapping[str, Any]) -> dict[str, Any]:
        """The data the static copy embeds for ``controls`` (default: `_compute`)."""
        return self._compute(controls)

    def _controls(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._data_controls}

    def _on_control(self, change: Mapping[str, Any]) -> None:
        if self._ready:
            self._refresh()

    def _refresh(self) -> None:
        data = self._compute(self._controls())
        with self.hold_sync():
            for name, value in data.items():
                setattr(self, name, jsonable(value))

    # -------------------------------------------------------------- static copy

    def _synced_names(self) -> list[str]:
        skip = {"layout", "tabbable", "tooltip"}
        return [n for n in self.trait_names(sync=True) if not n.startswith("_") and n not in skip]

    def _static_values(self) -> dict[str, list]:
        """Every value of each static control (default: the values its selector offers)."""
        controls = self._data_controls if self._static_controls is None else self._static_controls
        current = self._controls()
        return {c: [opt[0] for opt in self.options.get(c, [[current.get(c)]])] for c in controls}

    def _static_options(self, max_values: int) -> tuple[dict[str, list], bool]:
        """Which values of each static control to embed, fewest dropped to fit the cap."""
        current = self._controls()
        chosen = self._static_values()
        per_state = count_numbers(self._static_state(current))
        thinned = False
        while per_state * math.prod(len(v) for v in chosen.values()) > max_values:
            name = max(chosen, key=lambda c: len(chosen[c]), default=None)
            if name is None or len(chosen[name]) <= 1:
                break
            values = chosen[name]
            kept = values[::2] if len(values) > 2 else [current[name]]
            if current[name] not in kept:
                kept = sorted(set(kept) | {current[name]}, key=values.index)
            if len(kept) >= len(values):
                kept = [current[name]]
            chosen[name] = kept
            thinned = True
        return chosen, thinned

    def static_payload(self, max_values: int = MAX_STATIC_VALUES) -> dict[str, Any]:
        """What `to_html` embeds: the traitlets now, and the data of every combination of
        the static controls' values (``states``, keyed by `state_key`). A state may also set
        controls and ``options`` (a viewer whose selectors depend on another control)."""
        chosen, thinned = self._static_options(max_values)
        current = self._controls()
        controls = list(chosen)
        states = {}
        for combo in itertools.product(*chosen.values()):
            values = {**current, **dict(zip(controls, combo))}
            states[state_key(combo)] = jsonable(self._static_state(values), STATIC_DIGITS)
        initial = jsonable({n: getattr(self, n) for n in self._synced_names()}, STATIC_DIGITS)
        initial.update(states[state_key(current[c] for c in controls)])

        def embedded(options: dict[str, list]) -> dict[str, list]:
            """The selectors' options less the values this copy does not embed."""
            return {
                n: [o for o in opts if n not in chosen or o[0] in chosen[n]]
                for n, opts in options.items()
            }

        initial["options"] = embedded(initial["options"])
        for state in states.values():  # a state may set the options (they depend on a control)
            if "options" in state:
                state["options"] = embedded(state["options"])
        if thinned:
            every = self._static_values()
            left_out = ", ".join(
                f"{len(chosen[c])} of {len(every[c])} {c}s"
                for c in controls
                if len(chosen[c]) < len(every[c])
            )
            cap = (
                f"Static copy: {left_out} embedded to keep the page small "
                f"(to_html(max_values=...) embeds more)."
            )
            initial["note"] = f"{initial['note']} {cap}".strip()
        return {"controls": controls, "states": states, "initial": initial}

    def to_html(self, max_values: int = MAX_STATIC_VALUES) -> str:
        """A self-contained HTML fragment of this viewer: a ``<div>``, its data as JSON and
        the same JavaScript module the widget runs, inline. Every control works without a
        kernel or network. Caches whose data for every control value would exceed
        ``max_values`` numbers embed fewer values (the page says which)."""
        payload = script_json(self.static_payload(max_values))
        digest = hashlib.sha1(payload.encode()).hexdigest()[:10]
        element = f"gemmalens-{self.view}-{digest}-{next(_html_counter)}"
        script = ESM.read_text(encoding="utf-8").replace("</script", "<\\/script")
        css = CSS.read_text(encoding="utf-8")
        return (
            f'<div class="gemmalens-host" data-gemmalens-view="{self.view}" id="{element}"></div>\n'
            f'<script type="application/json" id="{element}-data">{payload}</script>\n'
            f"<style>{css}</style>\n"
            f'<script type="module">\n{script}\n'
            f'renderStatic(document.getElementById("{element}"), '
            f'JSON.parse(document.getElementById("{element}-data").textContent));\n'
            "</script>\n"
        )

    def _repr_mimebundle_(self, **kwargs: Any) -> tuple[dict, dict] | None:
        """The live widget view, plus ``text/html`` (`to_html`) for renderers without a
        widget manager (nbconvert, the docs)."""
        bundle = super()._repr_mimebundle_(**kwargs)
        if bundle is None or not self.embed_html:
            return bundle
        data, metadata = bundle
        data = {**data, "text/html": self.to_html()}
        return data, metadata


def options_list(values: Iterable[Any], label: Callable[[Any], str] = str) -> list[list[Any]]:
    """``[[value, label], ...]`` for a selector."""
    return [[jsonable(v), label(v)] for v in values]


class LayerViewer(Viewer):
    """A viewer that shows one layer at a time (of ``self._layers``, set by the subclass
    before the controls) and can highlight one token (``selected_token``, -1: none)."""

    layer = traitlets.Int(0).tag(sync=True)
    selected_token = traitlets.Int(-1).tag(sync=True)

    @traitlets.validate("layer")
    def _check_layer(self, proposal: Any) -> int:
        return check_choice("layer", proposal["value"], self._layers)

    @traitlets.validate("selected_token")
    def _check_selected(self, proposal: Any) -> int:
        return check_choice(
            "selected_token", proposal["value"], list(range(-1, len(self.tokens))), " (-1: none)"
        )
