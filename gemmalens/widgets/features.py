"""`FeatureViewer`: what a feature of a sparse autoencoder or transcoder fires on and what
it writes, and which features fire on a prompt."""

from __future__ import annotations

import textwrap
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
import traitlets
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from gemmalens import compiling
from gemmalens import sae as gl_sae
from gemmalens.checkpoints.safetensors_files import CheckpointError
from gemmalens.compiling import Distinct
from gemmalens.widgets import _figures
from gemmalens.widgets._base import (
    MAX_STATIC_VALUES,
    TokenNamer,
    Viewer,
    ViewerError,
    ids_of,
    jsonable,
)

# Features the viewer computes (and the static copy embeds) when none are named.
MAX_FEATURES = 32
# One pass over the corpus keeps every feature's activations when they are at most this
# many numbers (64 MB); beyond it the viewer counts first and captures the chosen ones after.
FULL_CAPTURE_NUMBERS = 16 * 2**20
TABS = {"feature": "Feature", "prompt": "Prompt"}
RAISE_COLOUR, LOWER_COLOUR = "#4393c3", "#d6604d"


@compiling.jit(static_argnames=("forward",))
def _batch_activations(plan, inputs, valid, index, *, forward):
    """One batch of the corpus: how many real tokens each feature fired on ``[d_sae]``, and
    the activations of the features ``index`` ``[batch, seq, len(index)]`` (0 at padding)."""
    model, state = plan.tree()
    _, values = forward(model, state, *inputs)
    acts = values[0].value.astype(jnp.float32)  # [batch, seq, d_sae]
    counts = ((acts > 0) & valid[..., None]).sum((0, 1))
    chosen = jnp.where(valid[..., None], acts[..., index], 0.0)
    return counts, chosen


def _feature_list(features: Any, d_sae: int, name: str = "features") -> list[int]:
    """``features`` (an int or ints) as a list of ints in ``[0, d_sae)``, else a `ViewerError`."""
    if isinstance(features, (int, np.integer)):
        features = [features]
    try:
        listed = [f for f in np.asarray(list(features)).ravel().tolist()]
    except TypeError:
        listed = [features]
    bad = [f for f in listed if not isinstance(f, int) or isinstance(f, bool)]
    if bad:
        raise ViewerError(f"{name} must be feature indices (ints), got {bad[0]!r}.")
    if not listed:
        raise ViewerError(f"{name} is empty: name at least one feature, or pass None.")
    outside = [f for f in listed if not 0 <= f < d_sae]
    if outside:
        raise ViewerError(
            f"{name}: feature {outside[0]} is out of range; this dictionary has {d_sae} features "
            f"(indices 0 to {d_sae - 1})."
        )
    return list(dict.fromkeys(listed))


class FeatureViewer(Viewer):
    """The features of one sparse autoencoder (SAE) or transcoder on one model.

    Two views (the tabs):

    * **Feature**: one feature's top activating examples over a token corpus (from
      `gemmalens.sae.top_activations`), each a window of text around its strongest token
      with every token shaded by the feature's activation there (hover for the value); the
      histogram of its nonzero activations over the corpus, with how many tokens it fired
      on; its direct logit effects (`gemmalens.sae.logit_effects`), the ``logit_k`` tokens
      it raises and lowers most; and, with a prompt, its activation on the prompt.
    * **Prompt**: the ``top_n`` strongest features at each token of ``prompt``; click one
      to open it in the feature view.

    Everything is computed in Python up front, for a capped set of features: the ones named
    in ``features``, or by default the prompt's strongest (up to ``max_features // 2``, by
    their largest activation on the prompt) and then the corpus's most frequent, up to
    ``max_features`` (32) in all. The static copy (`to_html`) embeds exactly these; its
    prompt view greys out the features it lacks. The live widget computes any other feature
    when it is chosen (one more pass over the corpus) and adds it to the list.

    ::

        sae = gl.sae.load("gemma-scope-2-270m-pt/resid_post/layer_3_width_16k_l0_small", m)
        corpus = m.to_tokens(["First document ...", "Second ...", ...])[0]
        viewer = FeatureViewer(m, sae, corpus, prompt="The cat sat on the mat.")
        viewer.feature = 1234            # any feature: the live widget computes it
        viewer.figure()                  # examples, histogram, logit effects

    Counts and examples cover the corpus's real tokens (pad ids mark padding; <bos> counts,
    as in `top_activations`); examples whose activation is 0 are left out.

    Traitlets (synced):
      feature: the feature shown (an index into the dictionary).
      tab: ``"feature"`` or ``"prompt"``.
      examples: ``[{"sequence", "position", "value", "positions", "center", "tokens",
        "acts"}]``, strongest first: the corpus row and position of the example, its
        activation, the positions of its window, which of them is the example's token, the
        window's tokens and the feature's activation at each.
      histogram: ``{"edges": [bins + 1], "counts": [bins]}`` of the nonzero activations
        (``numpy.histogram``; empty when the feature never fired).
      fired: how many corpus tokens it fired on, of ``corpus_size``.
      max_activation: its largest activation over the corpus (0: never fired).
      logit_effects: ``{"top_ids", "top_tokens", "top_values", "bottom_ids", ...}``;
        empty, with ``logit_note`` saying why, where `gemmalens.sae.logit_effects` does
        not apply (outside Gemma 3).
      prompt_acts: ``[pos]`` its activation at each prompt token (``tokens``).
      prompt_features, prompt_values: ``[pos][<= top_n]`` the strongest features at each
        prompt token and their activations (zeros left out).
      on_demand: whether choosing a feature not yet computed computes it (the live widget;
        False in the static copy).
    """

    css_class = "gemmalens-features"

    feature = traitlets.Int(0).tag(sync=True)
    tab = traitlets.Unicode("feature").tag(sync=True)
    on_demand = traitlets.Bool(True).tag(sync=True)
    site = traitlets.Unicode("").tag(sync=True)
    d_sae = traitlets.Int(0).tag(sync=True)
    corpus_size = traitlets.Int(0).tag(sync=True)
    examples = traitlets.List().tag(sync=True)
    histogram = traitlets.Dict().tag(sync=True)
    fired = traitlets.Int(0).tag(sync=True)
    max_activation = traitlets.Float(0.0).tag(sync=True)
    logit_effects = traitlets.Dict().tag(sync=True)
    logit_note = traitlets.Unicode("").tag(sync=True)
    prompt_acts = traitlets.List().tag(sync=True)
    prompt_features = traitlets.List().tag(sync=True)
    prompt_values = traitlets.List().tag(sync=True)

    _data_controls = ("feature",)

    def __init__(
        self,
        m: Any,
        sae: gl_sae.SAE | str,
        corpus_tokens: Any,
        prompt: Any = None,
        *,
        features: int | Iterable[int] | None = None,
        feature: int | None = None,
        k: int = 10,
        window: int = 8,
        top_n: int = 5,
        logit_k: int = 8,
        bins: int = 24,
        max_features: int = MAX_FEATURES,
        tab: str | None = None,
        tokenizer: Any = None,
        batch_size: int = 8,
        show_progress: bool = False,
        embed_html: bool = True,
    ):
        """
        Args:
          m: the model, with or without ``sae`` spliced in (`gemmalens.sae.splice`; the
            viewer splices it when it is not, leaving ``m`` as it is).
          sae: the `gemmalens.sae.SAE` (or transcoder), or the site of one spliced in ``m``.
          corpus_tokens: ``[n, seq]`` token ids (pad ids mark padding), or a list of texts
            (encoded with ``m``'s tokenizer, with BOS).
          prompt: a text or ``[seq]`` / ``[1, seq]`` ids for the prompt view (None: none).
          features: the features to compute and embed (ints); None: see the class docstring.
          feature: the feature shown first (default: the first of ``features``, else the
            prompt's strongest, else the corpus's most frequent).
          k: top examples per feature; window: tokens shown on each side of an example's
            strongest token; top_n: features listed per prompt token; logit_k: tokens
            listed per side of the logit effects; bins: histogram bins.
          max_features: how many features to compute when ``features`` is None.
          tab: the view shown first (``"feature"`` or ``"prompt"``; default ``"feature"``).
          tokenizer: decodes ids (default: ``m``'s).
          batch_size: corpus rows per compiled batch; show_progress: progress bars.
          embed_html: add the static `to_html` copy to the notebook output.
        """
        for name, value, low in (
            ("k", k, 1),
            ("window", window, 0),
            ("top_n", top_n, 1),
            ("logit_k", logit_k, 1),
            ("bins", bins, 1),
            ("max_features", max_features, 1),
            ("batch_size", batch_size, 1),
        ):
            if not isinstance(value, (int, np.integer)) or value < low:
                raise ViewerError(f"{name} must be an int of at least {low}, got {value!r}.")
        sae = self._sae_of(m, sae)
        if features is not None:
            features = _feature_list(features, sae.d_sae)
        if feature is not None:
            if not isinstance(feature, (int, np.integer)) or isinstance(feature, bool):
                raise ViewerError(f"feature must be one feature index (an int), got {feature!r}.")
            (feature,) = _feature_list(feature, sae.d_sae, "feature")
        self._sae = sae
        self._model = m
        self._spliced = self._spliced_model(m, sae)
        self._hook = sae.hook_name("features")
        self._k, self._window, self._logit_k, self._bins = int(k), int(window), logit_k, bins
        self._batch_size, self._show_progress = int(batch_size), show_progress
        self._namer = TokenNamer(tokenizer if tokenizer is not None else m.tokenizer)
        self._corpus = self._corpus_of(m, corpus_tokens)
        self._valid = self._corpus != m.config.pad_token_id
        self._data: dict[int, dict[str, Any]] = {}
        self._cached_acts: np.ndarray | None = None  # every feature's, while choosing
        self._logit_note = ""

        labels: list[str] = []
        self._prompt_acts: np.ndarray | None = None
        prompt_features: list[list[int]] = []
        prompt_values: list[np.ndarray] = []
        if prompt is not None:
            ids = ids_of(m, prompt)
            if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
                raise ViewerError(
                    f"prompt must be one text or one row of token ids; got shape {ids.shape}."
                )
            _, cache = self._spliced.run_with_cache(ids, names=[self._hook])
            self._prompt_acts = np.asarray(cache[self._hook], np.float32)[0]  # [seq, d_sae]
            labels = [self._namer(t) for t in ids[0]]
            for row in self._prompt_acts:
                order = np.argsort(-row, kind="stable")[:top_n]
                order = order[row[order] > 0]
                prompt_features.append(order.tolist())
                prompt_values.append(row[order])

        chosen = self._choose(features, feature, max_features)
        self._add_features(chosen)
        if feature is None and features is not None:
            feature = features[0]
        elif feature is None:
            feature = self._default_feature(chosen)
        kind = "transcoder" if sae.is_transcoder else "SAE"
        shown = f"±{window} tokens" if window else "the token alone"
        super().__init__(
            embed_html=embed_html,
            view="features",
            title=f"{kind} features at {sae.site}",
            tokens=labels,
            options={"feature": self._feature_options(), "tab": [[t, TABS[t]] for t in TABS]},
            note=(
                f"Top {k} examples over {self._corpus_size():,} corpus tokens ({shown}; "
                "shade: the feature's activation, hover for the value)."
                + (
                    ""
                    if self._logit_note
                    else " Logit effects: its decoder row read through the unembedding "
                    "(gl.sae.logit_effects)."
                )
            ),
            logit_note=self._logit_note,
            site=sae.site,
            d_sae=sae.d_sae,
            corpus_size=self._corpus_size(),
            prompt_features=prompt_features,
            prompt_values=jsonable(prompt_values),
            tab=tab or "feature",
            feature=int(feature),
        )

    # -------------------------------------------------------------- inputs

    @staticmethod
    def _sae_of(m: Any, sae: Any) -> gl_sae.SAE:
        if isinstance(sae, str):
            spliced = getattr(m, "saes", None) or {}
            if sae not in spliced:
                raise ViewerError(
                    f"No SAE is spliced at {sae!r} in this model"
                    + (f" (it has {sorted(spliced)})" if spliced else "")
                    + ": pass the gl.sae.SAE itself (gl.sae.load(path, m))."
                )
            return spliced[sae]
        if not isinstance(sae, gl_sae.SAE):
            raise TypeError(
                f"FeatureViewer takes a gemmalens.sae.SAE (from gl.sae.load), got {sae!r}."
            )
        try:
            gl_sae.check_fits(sae, m)
        except CheckpointError as error:
            raise ViewerError(
                f"This SAE does not fit the model: {error} Pass the model it was trained on, "
                "or load the SAE made for this model (gl.sae.load(path, m) checks)."
            ) from None
        return sae

    @staticmethod
    def _spliced_model(m: Any, sae: gl_sae.SAE) -> Any:
        spliced = getattr(m, "saes", None) or {}
        if sae.site not in spliced:
            return gl_sae.splice(m, [sae])
        if spliced[sae.site] is not sae:
            raise ViewerError(
                f"The model has another dictionary spliced at {sae.site}. Pass the model "
                f"without it, or that dictionary (m.saes[{sae.site!r}])."
            )
        return m

    @staticmethod
    def _corpus_of(m: Any, corpus_tokens: Any) -> np.ndarray:
        if corpus_tokens is None or (
            isinstance(corpus_tokens, (list, tuple)) and len(corpus_tokens) == 0
        ):
            raise ViewerError(
                "The corpus is empty: pass token ids [n, seq] (e.g. m.to_tokens(texts)[0]) "
                "or a list of texts."
            )
        corpus = np.asarray(ids_of(m, corpus_tokens))
        if corpus.size == 0:
            raise ViewerError(
                f"The corpus is empty (shape {corpus.shape}): pass token ids [n, seq] (e.g. "
                "m.to_tokens(texts)[0]) or a list of texts."
            )
        if corpus.ndim != 2 or not np.issubdtype(corpus.dtype, np.integer):
            raise ViewerError(
                f"corpus_tokens must be [n, seq] token ids or a list of texts; got an array of "
                f"shape {corpus.shape} and dtype {corpus.dtype}."
            )
        if not (corpus != m.config.pad_token_id).any():
            raise ViewerError(
                f"The corpus is empty: its {corpus.size} entries are all padding (pad id "
                f"{m.config.pad_token_id}). Pass token ids [n, seq] with real tokens (e.g. "
                "m.to_tokens(texts)[0]) or a list of texts."
            )
        return corpus

    def _corpus_size(self) -> int:
        """How many real (non-pad) tokens the corpus has."""
        return int(self._valid.sum())

    def _choose(self, features: Any, feature: Any, max_features: int) -> list[int]:
        """The features computed up front (see the class docstring)."""
        d_sae = self._sae.d_sae
        first = [] if feature is None else [feature]
        if features is not None:
            return sorted(dict.fromkeys(first + list(features)))
        ranked: list[int] = []
        if self._prompt_acts is not None:
            peak = self._prompt_acts.max(axis=0)
            order = [f for f in np.argsort(-peak, kind="stable").tolist() if peak[f] > 0]
            ranked = order[: max(1, max_features // 2)]
        if self._corpus.size * d_sae <= FULL_CAPTURE_NUMBERS:
            counts, acts = self._corpus_pass(list(range(d_sae)))
            self._cached_acts = acts
        else:
            counts, _ = self._corpus_pass([])
        frequent = np.argsort(-counts, kind="stable").tolist()
        chosen = list(dict.fromkeys(first + ranked + frequent))[: max(max_features, len(first))]
        return sorted(chosen)

    def _default_feature(self, chosen: Sequence[int]) -> int:
        if self._prompt_acts is not None and self._prompt_acts.max() > 0:
            peak = self._prompt_acts.max(axis=0)
            return max(chosen, key=lambda f: (peak[f], -f))
        return max(chosen, key=lambda f: (self._data[f]["fired"], -f))

    # -------------------------------------------------------------- computing

    def _corpus_pass(self, features: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """``(counts [d_sae], activations [n, seq, len(features)])`` over the corpus, in
        compiled batches of the same shape (the last one filled with a repeated row that
        is never counted, as in `top_activations`)."""
        m = self._spliced
        unbound, state = m._capture_plan([self._hook])
        plan = Distinct(*m._flat_plan(unbound, state))
        index = jnp.asarray(np.asarray(features, np.int32))
        n, seq = self._corpus.shape
        size = self._batch_size
        counts = np.zeros(self._sae.d_sae, np.int64)
        acts = np.zeros((n, seq, len(features)), np.float32)
        starts = range(0, n, size)
        if self._show_progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=f"features at {self._sae.site}", unit="batch")
        for start in starts:
            rows = self._corpus[start : start + size]
            real = len(rows)
            if real < size:
                rows = np.concatenate([rows, np.repeat(rows[:1], size - real, 0)])
            valid = rows != m.config.pad_token_id
            valid[real:] = False
            batch_counts, chosen = _batch_activations(
                plan, m._prepare(rows, None, {}), jnp.asarray(valid), index, forward=m.captured_run
            )
            counts += np.asarray(batch_counts)
            acts[start : start + real] = np.asarray(chosen)[:real]
        return counts, acts

    def _add_features(self, features: Sequence[int]) -> None:
        """Computes the data of the ``features`` not computed yet."""
        new = [f for f in dict.fromkeys(features) if f not in self._data]
        if not new:
            return
        if self._cached_acts is not None:
            acts = self._cached_acts[..., new]
        else:
            _, acts = self._corpus_pass(new)
        top = gl_sae.top_activations(
            self._spliced,
            self._sae,
            new,
            self._corpus,
            k=self._k,
            batch_size=self._batch_size,
            show_progress=self._show_progress,
        )
        try:
            effects = np.asarray(gl_sae.logit_effects(self._model, self._sae, new), np.float32)
        except NotImplementedError as error:  # not a fixed matrix on this family
            effects = [None] * len(new)
            self._logit_note = f"Logit effects are not shown: {error}"
        for j, f in enumerate(new):
            self._data[f] = self._summary(
                acts[..., j], top.values[j], top.sequence[j], top.position[j], effects[j]
            )
        self._cached_acts = None  # kept only for the features chosen at the start

    def _summary(
        self,
        column: np.ndarray,
        values: np.ndarray,
        sequences: np.ndarray,
        positions: np.ndarray,
        effects: np.ndarray | None,
    ) -> dict[str, Any]:
        """One feature's data from its activations ``[n, seq]`` over the corpus, its top
        activations and its logit effects ``[vocab]`` (None: not available)."""
        fired_values = column[self._valid & (column > 0)]
        if fired_values.size:
            counts, edges = np.histogram(fired_values, bins=self._bins)
        else:
            counts, edges = np.zeros(0, np.int64), np.zeros(0, np.float64)
        seq = self._corpus.shape[1]
        examples = []
        for s, p, v in zip(sequences.tolist(), positions.tolist(), values.tolist()):
            if s < 0 or not v > 0:
                continue
            window = range(max(0, p - self._window), min(seq, p + self._window + 1))
            where = [q for q in window if self._valid[s, q]]
            examples.append(
                {
                    "sequence": s,
                    "position": p,
                    "value": float(v),
                    "positions": where,
                    "center": where.index(p),
                    "tokens": [self._namer(t) for t in self._corpus[s, where]],
                    "acts": column[s, where],
                }
            )
        if effects is None:
            top = bottom = np.zeros(0, np.int64)
            effects = np.zeros(0, np.float32)
        else:
            top = np.argsort(-effects, kind="stable")[: self._logit_k]
            bottom = np.argsort(effects, kind="stable")[: self._logit_k]
        return {
            "examples": examples,
            "histogram": {"edges": edges, "counts": counts},
            "fired": int(fired_values.size),
            "max_activation": float(fired_values.max()) if fired_values.size else 0.0,
            "logit_effects": {
                "top_ids": top,
                "top_tokens": [self._namer(t) for t in top],
                "top_values": effects[top],
                "bottom_ids": bottom,
                "bottom_tokens": [self._namer(t) for t in bottom],
                "bottom_values": effects[bottom],
            },
        }

    def _feature_options(self) -> list[list[Any]]:
        total = max(1, self._corpus_size())
        return [
            [f, f"{f} (fires on {self._data[f]['fired'] / total:.1%})"] for f in sorted(self._data)
        ]

    def _ensure(self, feature: Any) -> int:
        """``feature`` checked against the dictionary's width, and computed (and listed
        among the options) when it was not."""
        d_sae = self._sae.d_sae
        if (
            not isinstance(feature, (int, np.integer))
            or isinstance(feature, bool)
            or not 0 <= feature < d_sae
        ):
            raise ViewerError(
                f"feature must be in [0, {d_sae - 1}] (this dictionary has {d_sae} features), "
                f"got {feature!r}."
            )
        feature = int(feature)
        if feature not in self._data:  # the live widget: compute it now, and list it
            self._add_features([feature])
            self.options = {**self.options, "feature": self._feature_options()}
        return feature

    @traitlets.validate("feature")
    def _check_feature(self, proposal: Any) -> int:
        return self._ensure(proposal["value"])

    @traitlets.validate("tab")
    def _check_tab(self, proposal: Any) -> str:
        tab = proposal["value"]
        if tab not in TABS:
            raise ViewerError(f"tab must be one of {list(TABS)}, got {tab!r}.")
        if tab == "prompt" and self._prompt_acts is None:
            raise ViewerError(
                "The prompt view needs a prompt: pass FeatureViewer(..., prompt='some text')."
            )
        return tab

    def _compute(self, controls: Mapping[str, Any]) -> dict[str, Any]:
        feature = controls["feature"]
        data = self._data[feature]
        acts = [] if self._prompt_acts is None else self._prompt_acts[:, feature]
        return {**data, "prompt_acts": acts}

    # -------------------------------------------------------------- reading it

    @property
    def features(self) -> list[int]:
        """The features computed so far (those the static copy embeds), in order."""
        return sorted(self._data)

    @property
    def sae(self) -> gl_sae.SAE:
        """The dictionary shown."""
        return self._sae

    def prompt_top(self, position: int) -> list[tuple[int, float]]:
        """``[(feature, activation)]`` at prompt token ``position``, strongest first."""
        return [
            (int(f), float(v))
            for f, v in zip(self.prompt_features[position], self.prompt_values[position])
        ]

    def static_payload(self, max_values: int = MAX_STATIC_VALUES) -> dict[str, Any]:
        payload = super().static_payload(max_values)
        initial = payload["initial"]
        initial["on_demand"] = False
        embedded = len(initial["options"]["feature"])
        initial["note"] = (
            f"{initial['note']} This copy embeds {embedded} features (the prompt view greys "
            "out the others)."
        )
        return payload

    # -------------------------------------------------------------- figures

    def figure(
        self,
        figsize: tuple[float, float] | None = None,
        view: str | None = None,
        feature: int | None = None,
        cmap: str = "Blues",
    ) -> Figure:
        """A static matplotlib figure of the current state: for the feature view (``view``
        default: the current tab), the top examples as rows of tokens shaded by activation
        (aligned on their strongest token, with a colour bar), the activation histogram, the
        logit effects and, with a prompt, the feature's activation on it; for the prompt
        view, the strongest features at each prompt token."""
        view = view or self.tab
        if view == "prompt":
            return self._prompt_figure(figsize, cmap)
        if view != "feature":
            raise ViewerError(f"view must be one of {list(TABS)}, got {view!r}.")
        feature = self.feature if feature is None else self._ensure(feature)
        data = self._data[feature]
        examples = data["examples"]
        columns = 2 * self._window + 1
        rows = max(1, len(examples))
        prompt = self._prompt_acts is not None
        # Heights (inches) of the panels: each logit bar and example row gets its space.
        examples_height = rows * 0.34 + 1.6
        logits_height = 2 * self._logit_k * 0.2 + 1.1
        if prompt:
            heights = [max(examples_height, 2.8), max(logits_height, 2.8)]
        else:
            heights = [2.8, max(logits_height, examples_height - 2.8)]
        width = min(18.0, max(9.0, columns * 0.62 + 7.5))
        figure = _figures.new_figure(width, sum(heights), figsize=figsize)
        grid = figure.add_gridspec(
            2, 2, width_ratios=[max(columns * 0.62, 4.0), 4.2], height_ratios=heights
        )
        if prompt:
            ax_examples = figure.add_subplot(grid[0, 0])
            ax_prompt = figure.add_subplot(grid[1, 0])
        else:
            ax_examples = figure.add_subplot(grid[:, 0])
        ax_hist = figure.add_subplot(grid[0, 1])
        ax_logits = figure.add_subplot(grid[1, 1])

        # Top examples: one row each, columns = offsets from the strongest token.
        peak = data["max_activation"] or 1.0
        matrix = np.full((rows, columns), np.nan)
        text = [[""] * columns for _ in range(rows)]
        for r, example in enumerate(examples):
            for q, token, act in zip(example["positions"], example["tokens"], example["acts"]):
                c = q - example["position"] + self._window
                matrix[r, c] = act
                text[r][c] = token
        colours = colormaps[cmap].with_extremes(bad="white")
        image = ax_examples.imshow(
            np.ma.masked_invalid(matrix),
            cmap=colours,
            vmin=0.0,
            vmax=peak,
            aspect="auto",
            interpolation="nearest",
        )
        for r in range(rows):
            for c in range(columns):
                if text[r][c]:
                    dark = np.nan_to_num(matrix[r, c]) / peak > 0.55
                    ax_examples.text(
                        c,
                        r,
                        _figures.truncate(text[r][c], 8),
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if dark else "#1f2328",
                    )
        if examples:
            ax_examples.add_patch(
                Rectangle(
                    (self._window - 0.5, -0.5), 1, rows, fill=False, edgecolor="#d62728", lw=1.5
                )
            )
        else:
            ax_examples.text(
                self._window, 0, "never fired on the corpus", ha="center", va="center", fontsize=10
            )
        ax_examples.set_xticks(
            np.arange(columns), [f"{c - self._window:+d}" if c != self._window else "0" for c in range(columns)],
            fontsize=8,
        )  # fmt: skip
        ax_examples.set_xticks(np.arange(columns + 1) - 0.5, minor=True)
        ax_examples.set_yticks(np.arange(rows + 1) - 0.5, minor=True)
        ax_examples.grid(which="minor", color="white", linewidth=1.2)
        ax_examples.tick_params(which="minor", length=0)
        ax_examples.set_yticks(
            np.arange(len(examples)),
            [f"{e['value']:.3g}  (row {e['sequence']}, pos {e['position']})" for e in examples],
            fontsize=8,
        )
        ax_examples.set_xlabel("token position relative to the strongest token")
        ax_examples.set_ylabel("top example (activation)")
        ax_examples.set_title(
            f"Feature {feature}: top {len(examples)} activating examples"
            if examples
            else f"Feature {feature}: no activating examples",
            fontsize=11,
        )
        figure.colorbar(image, ax=ax_examples, label="feature activation", shrink=0.85)

        # Histogram of the nonzero activations.
        counts, edges = data["histogram"]["counts"], data["histogram"]["edges"]
        total = max(1, self._corpus_size())
        if len(counts):
            ax_hist.bar(
                edges[:-1], counts, width=np.diff(edges), align="edge", color="#4a98c9",
                edgecolor="white", linewidth=0.5,
            )  # fmt: skip
        else:
            ax_hist.text(
                0.5, 0.5, "never fired", ha="center", va="center", transform=ax_hist.transAxes
            )
        ax_hist.set_xlabel("activation (nonzero)")
        ax_hist.set_ylabel("tokens")
        ax_hist.grid(axis="y", alpha=0.3)
        ax_hist.set_title(
            f"Fired on {data['fired']:,} of {total:,} tokens ({data['fired'] / total:.2%})",
            fontsize=10,
        )

        # Logit effects: the tokens raised most (top) and lowered most (bottom).
        effects = data["logit_effects"]
        values = np.concatenate([effects["top_values"], effects["bottom_values"][::-1]])
        labels = effects["top_tokens"] + effects["bottom_tokens"][::-1]
        where = np.arange(len(values))
        ax_logits.set_xlabel("direct logit effect")
        ax_logits.set_ylabel("token")
        if len(values):
            ax_logits.barh(
                where, values, color=[RAISE_COLOUR if v >= 0 else LOWER_COLOUR for v in values]
            )
            ax_logits.axvline(0, color="#59636e", linewidth=0.8)
            ax_logits.set_yticks(where, [_figures.truncate(t, 14) for t in labels], fontsize=8)
            ax_logits.invert_yaxis()
            ax_logits.grid(axis="x", alpha=0.3)
            ax_logits.set_title("Logit effects: raised (blue), lowered (red)", fontsize=10)
        else:
            ax_logits.set_xticks([])
            ax_logits.set_yticks([])
            reason = textwrap.fill(self.logit_note.split(". ")[0] + ".", 48)
            ax_logits.text(
                0.5, 0.5, reason, ha="center", va="center", fontsize=8,
                transform=ax_logits.transAxes, color="#59636e",
            )  # fmt: skip
            ax_logits.set_title("Logit effects: not available", fontsize=10)

        if prompt:
            acts = self._prompt_acts[:, feature]
            high = max(peak, float(acts.max()))
            ax_prompt.bar(
                np.arange(len(acts)), acts, color=colormaps[cmap](np.clip(acts / high, 0.15, 1.0))
            )
            _figures.tick_labels(ax_prompt, self.tokens, "x")
            ax_prompt.set_xlim(-0.5, len(acts) - 0.5)
            ax_prompt.set_xlabel("prompt token")
            ax_prompt.set_ylabel("activation")
            ax_prompt.grid(axis="y", alpha=0.3)
            ax_prompt.set_title(f"Feature {feature} on the prompt", fontsize=10)
        return figure

    def _prompt_figure(self, figsize: tuple[float, float] | None, cmap: str) -> Figure:
        """The prompt view: positions x rank, each cell a feature shaded by its activation."""
        positions = len(self.tokens)
        ranks = max([len(row) for row in self.prompt_features] + [1])
        values = np.full((positions, ranks), np.nan)
        for p, row in enumerate(self.prompt_values):
            values[p, : len(row)] = row
        width, height = _figures.fitted_size(ranks, positions, cell=0.34, pad=(4.0, 1.9))
        figure = _figures.new_figure(max(width, 6.0), height, figsize=figsize)
        ax = figure.add_subplot()
        colours = colormaps[cmap].with_extremes(bad="#f6f8fa")
        peak = float(np.nanmax(values)) if np.isfinite(values).any() else 1.0
        image = ax.imshow(
            np.ma.masked_invalid(values),
            cmap=colours,
            vmin=0.0,
            vmax=peak,
            aspect="auto",
            interpolation="nearest",
        )
        if positions <= 64:
            for p, row in enumerate(self.prompt_features):
                for r, f in enumerate(row):
                    dark = values[p, r] / peak > 0.55
                    current = f == self.feature
                    ax.text(
                        r,
                        p,
                        str(f),
                        ha="center",
                        va="center",
                        fontsize=8,
                        fontweight="bold" if current else "normal",
                        color="white" if dark else "#1f2328",
                    )
                    if current:
                        ax.add_patch(
                            Rectangle(
                                (r - 0.5, p - 0.5), 1, 1, fill=False, edgecolor="#d62728", lw=1.5
                            )
                        )
        _figures.tick_labels(ax, self.tokens, "y")
        ax.set_xticks(np.arange(ranks), [str(r + 1) for r in range(ranks)], fontsize=8)
        ax.set_xlabel("rank (1 = strongest feature)")
        ax.set_ylabel("prompt token")
        ax.set_title(
            f"Strongest features at each prompt token (numbers: feature; outlined: {self.feature})",
            fontsize=10,
        )
        figure.colorbar(image, ax=ax, label="feature activation", shrink=0.8)
        return figure
