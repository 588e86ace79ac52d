"""`LogitLensViewer`: what the residual stream would predict after every layer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import traitlets
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from gemmalens import residual
from gemmalens.widgets import _figures
from gemmalens.widgets._base import (
    TokenNamer,
    Viewer,
    check_choice,
    ids_of,
    token_labels,
    token_row,
    tokenizer_of,
)

LENS_HOOKS = ["hook_embed", "blocks.*.hook_resid_post"]
# Logits of one chunk of positions (all layers and batch rows) are kept under this size.
CHUNK_BYTES = 256 * 2**20
COLOR_BY = {"top": "probability of the top token", "next": "probability of the next token"}


def _lens_hooks(cache: Any) -> list[str]:
    model = getattr(cache, "model", None)
    return LENS_HOOKS if model is None else residual.lens_hook_names(model)


def _sequence_length(cache: Mapping[str, Any]) -> int:
    for name, value in cache.items():
        if name.endswith(("hook_embed", "hook_resid_post", "hook_resid_pre", "hook_streams_post")):
            return int(np.shape(value)[1])
    raise KeyError(
        "LogitLensViewer needs the residual stream after every block; capture it with "
        f"m.run_with_cache(tokens, names={_lens_hooks(cache)!r})."
    )


def lens_tables(
    cache: Any, batch: int, max_k: int, targets: np.ndarray | None, norm: str = "recompute"
) -> dict[str, Any]:
    """`ActivationCache.logit_lens` for one batch row, a chunk of positions at a time (so
    the ``[layer, batch, pos, vocab]`` logits never exceed `CHUNK_BYTES`).

    Returns ``labels`` (one per layer entry), ``top_ids`` / ``top_probs``
    ``[layer, pos, max_k]`` and, with ``targets`` (the ids at positions ``1 .. seq``),
    ``next_probs`` / ``next_ranks`` ``[layer, pos]`` (NaN / -1 at the last position).
    """
    if getattr(cache, "model", None) is None:
        raise ValueError(
            "LogitLensViewer needs the model's weights (to unembed): pass the cache that "
            "m.run_with_cache(...) returned, which keeps its model."
        )
    seq = _sequence_length(cache)
    vocab = cache.readout().unembed_matrix().shape[0]
    rows = (cache.num_layers + 1) * int(np.shape(next(iter(cache.values())))[0])
    chunk = max(1, CHUNK_BYTES // (rows * vocab * 4))
    tables: dict[str, list] = {"top_ids": [], "top_probs": [], "next_probs": [], "next_ranks": []}
    labels: list[str] = []
    for start in range(0, seq, chunk):
        stop = min(seq, start + chunk)
        try:
            lens = cache.logit_lens(pos_slice=slice(start, stop), top_k=max_k, norm=norm)
        except KeyError as error:
            raise KeyError(
                "LogitLensViewer needs the residual stream after every block; capture it "
                f"with m.run_with_cache(tokens, names={_lens_hooks(cache)!r}). "
                f"({error.args[0]})"
            ) from None
        labels = lens.labels
        tables["top_ids"].append(np.asarray(lens.top_tokens[:, batch]))
        tables["top_probs"].append(np.exp(np.asarray(lens.top_logprobs[:, batch], np.float64)))
        if targets is not None:
            logprobs = np.asarray(jax.nn.log_softmax(lens.logits[:, batch].astype("float32")))
            wanted = np.zeros(stop - start, int)
            known = min(stop, seq - 1) - start  # the last position has no next token
            wanted[:known] = targets[start : start + known]
            picked = np.take_along_axis(logprobs, wanted[None, :, None], axis=-1)[..., 0]
            ranks = (logprobs > picked[..., None]).sum(axis=-1)
            probs = np.exp(picked.astype(np.float64))
            probs[:, known:], ranks[:, known:] = np.nan, -1
            tables["next_probs"].append(probs)
            tables["next_ranks"].append(ranks)
    result = {name: np.concatenate(parts, axis=1) for name, parts in tables.items() if parts}
    result["labels"] = labels
    return result


def _row_label(hook: str) -> str:
    """``embed`` for the first entry, else the block index (``decoder.blocks.3...`` -> 3)."""
    if hook.endswith(("hook_embed", "hook_altup_expanded")):
        return "embed"
    return hook.split("blocks.", 1)[1].split(".", 1)[0]


class LogitLensViewer(Viewer):
    """The logit lens: the top token each layer's residual stream predicts, per position.

    Each row is the residual stream after a block (the first is the embedding) pushed
    through the final norm and the unembedding (`ActivationCache.logit_lens`); each cell
    shows the top token and is coloured by its probability (or by the probability of the
    actual next token). Hover or click a cell for its top-k list.

    Build it from a cache that holds the residual stream and the model::

        logits, cache = m.run_with_cache(tokens, names=["hook_embed", "blocks.*.hook_resid_post"])
        viewer = LogitLensViewer(cache, tokens)

    or ``LogitLensViewer.from_model(m, "Some text")``.

    Traitlets (synced):
      k: how many top tokens each cell lists (1 .. ``max_k``).
      color_by: ``"top"`` (top token's probability) or ``"next"`` (the next token's).
      selected_cell: ``[row, pos]`` of the cell whose list is shown (``[-1, -1]``: none).
      row_labels: ``["embed", "0", "1", ...]``, one per row (layer entry).
      top_tokens: ``[row][pos][k]`` display text of the top tokens.
      top_probs: ``[row][pos][k]`` their probabilities.
      next_tokens: ``[pos]`` the actual next token ("" at the last position or unknown).
      next_probs, next_ranks: ``[row][pos]`` its probability and rank (0 = top), when the
        token ids are known.
    """

    css_class = "gemmalens-logit-lens"

    k = traitlets.Int(5).tag(sync=True)
    color_by = traitlets.Unicode("top").tag(sync=True)
    selected_cell = traitlets.List(traitlets.Int(), [-1, -1]).tag(sync=True)
    max_k = traitlets.Int(10).tag(sync=True)
    row_labels = traitlets.List(traitlets.Unicode()).tag(sync=True)
    top_tokens = traitlets.List().tag(sync=True)
    top_probs = traitlets.List().tag(sync=True)
    next_tokens = traitlets.List(traitlets.Unicode()).tag(sync=True)
    next_probs = traitlets.List().tag(sync=True)
    next_ranks = traitlets.List().tag(sync=True)

    _data_controls = ("k",)
    # The static copy embeds the lists at max_k once; the front end shows the first k.
    _static_controls = ()

    def __init__(
        self,
        cache: Any,
        tokens: Any = None,
        *,
        tokenizer: Any = None,
        k: int = 5,
        max_k: int = 10,
        color_by: str | None = None,
        batch: int = 0,
        norm: str = "recompute",
        embed_html: bool = True,
    ):
        """
        Args:
          cache: the `ActivationCache` of ``m.run_with_cache`` (it keeps the model, whose
            final norm and unembedding the lens uses) holding the residual stream after
            every block: ``hook_embed`` and every ``blocks.{i}.hook_resid_post`` (Gemma 3n:
            ``hook_altup_expanded`` and every ``blocks.{i}.hook_streams_post``, read out
            through the AltUp collapse; T5Gemma 2: the decoder's).
          tokens: the token ids of the cache (their next tokens give ``next_probs``) or
            labels; None labels positions by number.
          tokenizer: decodes ids (default: the cache's model's tokenizer).
          k: how many top tokens to list first; ``max_k``: the most the selector offers.
          color_by: ``"top"`` or ``"next"`` (default: "next" when ids are known).
          batch: which batch row to show.
          norm: as in `ActivationCache.logit_lens` (``"recompute"`` or ``"cached"``).
          embed_html: add the static `to_html` copy to the notebook output.
        """
        if not 1 <= k <= max_k:
            raise ValueError(f"k must be in [1, max_k={max_k}], got {k}.")
        tokenizer = tokenizer_of(cache, tokenizer)
        row = token_row(tokens, batch)
        ids = None if row is None or isinstance(row, list) else np.asarray(row)
        targets = None if ids is None else ids[1:]
        tables = lens_tables(cache, batch, max_k, targets, norm)
        positions = tables["top_ids"].shape[1]
        namer = TokenNamer(tokenizer)
        self._top_tokens = np.vectorize(namer, otypes=[object])(tables["top_ids"])
        self._top_probs = tables["top_probs"]
        self._next_probs = tables.get("next_probs")
        labels = token_labels(tokens, tokenizer, batch, positions)
        next_tokens = (
            [namer(t) for t in targets] + [""] if targets is not None else [""] * positions
        )
        colour_options = [["top", COLOR_BY["top"]]]
        if self._next_probs is not None:
            colour_options.append(["next", COLOR_BY["next"]])
        super().__init__(
            embed_html=embed_html,
            view="logit-lens",
            title="Logit lens",
            tokens=labels,
            options={
                "k": [[i, str(i)] for i in range(1, max_k + 1)],
                "color_by": colour_options,
            },
            note="Each row: the residual stream after that layer, read through the unembedding.",
            max_k=max_k,
            row_labels=[_row_label(label) for label in tables["labels"]],
            next_tokens=next_tokens,
            next_probs=[] if self._next_probs is None else _nan_list(self._next_probs),
            next_ranks=[] if self._next_probs is None else tables["next_ranks"].tolist(),
            color_by=color_by or ("next" if self._next_probs is not None else "top"),
            k=k,
        )

    @classmethod
    def from_model(
        cls, m: Any, tokens: Any, decoder_tokens: Any = None, **kwargs: Any
    ) -> LogitLensViewer:
        """Runs ``m`` on ``tokens`` (text or ids) capturing only the residual stream it
        needs (`gemmalens.residual.lens_hook_names`), and builds the viewer.

        Encoder-decoder models (T5Gemma 2) also need ``decoder_tokens``; the lens reads
        the decoder, whose tokens label the columns."""
        ids = ids_of(m, tokens)
        names = residual.lens_hook_names(m)
        if "decoder_tokens" in m.input_streams:
            if decoder_tokens is None:
                raise ValueError(
                    "This is an encoder-decoder model: pass decoder_tokens as well (the lens "
                    "reads the decoder, whose output is unembedded)."
                )
            decoder_ids = ids_of(m, decoder_tokens)
            _, cache = m.run_with_cache(ids, decoder_tokens=decoder_ids, names=names)
            return cls(cache, decoder_ids, **kwargs)
        _, cache = m.run_with_cache(ids, names=names)
        return cls(cache, ids, **kwargs)

    @traitlets.validate("k")
    def _check_k(self, proposal: Any) -> int:
        return check_choice("k", proposal["value"], list(range(1, self.max_k + 1)))

    @traitlets.validate("color_by")
    def _check_color_by(self, proposal: Any) -> str:
        allowed = ["top"] + ([] if self._next_probs is None else ["next"])
        hint = "" if self._next_probs is not None else " (pass token ids for 'next')"
        return check_choice("color_by", proposal["value"], allowed, hint)

    @traitlets.validate("selected_cell")
    def _check_cell(self, proposal: Any) -> list[int]:
        row, pos = proposal["value"]
        if [row, pos] != [-1, -1]:
            check_choice("selected_cell row", row, list(range(len(self._top_probs))))
            check_choice("selected_cell position", pos, list(range(self._top_probs.shape[1])))
        return [row, pos]

    def _compute(self, controls: Mapping[str, Any]) -> dict[str, Any]:
        k = controls["k"]
        return {
            "top_tokens": self._top_tokens[:, :, :k].tolist(),
            "top_probs": self._top_probs[:, :, :k],
        }

    def _static_state(self, controls: Mapping[str, Any]) -> dict[str, Any]:
        return self._compute({**controls, "k": self.max_k})

    def top_k(self, row: int, pos: int, k: int | None = None) -> list[tuple[str, float]]:
        """``[(token, probability)]`` of the cell (row, pos), best first."""
        k = self.k if k is None else k
        return [
            (str(self._top_tokens[row, pos, i]), float(self._top_probs[row, pos, i]))
            for i in range(k)
        ]

    def figure(self, figsize: tuple[float, float] | None = None, cmap: str = "Blues") -> Figure:
        """The grid as a matplotlib figure: rows = layers (embedding at the bottom),
        columns = positions, the top token written in each cell (when it fits)."""
        colours = self._next_probs if self.color_by == "next" else self._top_probs[:, :, 0]
        rows, positions = colours.shape
        width, height = _figures.fitted_size(positions, rows, cell=0.62)
        figure = _figures.new_figure(width, height, figsize=figsize)
        ax = figure.add_subplot()
        image = ax.imshow(
            colours,
            cmap=cmap,
            vmin=0.0,
            vmax=1.0,
            origin="lower",
            aspect="auto",
            interpolation="nearest",
        )
        if positions <= 48 and rows <= 48:
            for r in range(rows):
                for p in range(positions):
                    dark = np.nan_to_num(colours[r, p]) > 0.55
                    ax.text(
                        p,
                        r,
                        _figures.truncate(str(self._top_tokens[r, p, 0]), 7),
                        ha="center",
                        va="center",
                        fontsize=6.5,
                        color="white" if dark else "#1f2328",
                    )
        row, pos = self.selected_cell
        if row >= 0:
            ax.add_patch(
                Rectangle((pos - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="#d62728", lw=1.5)
            )
        _figures.tick_labels(ax, self.tokens, "x")
        ax.set_yticks(np.arange(rows), self.row_labels, fontsize=8)
        ax.set_xlabel("position (input token)")
        ax.set_ylabel("after layer")
        ax.set_title("Logit lens: top prediction after each layer", fontsize=10)
        figure.colorbar(image, ax=ax, label=COLOR_BY[self.color_by], shrink=0.8)
        return figure


def _nan_list(values: np.ndarray) -> list:
    return [[None if np.isnan(v) else float(v) for v in row] for row in values]
