"""A self-contained HTML report of one prompt run through one model (what `gemmalens demo`
writes): top next-token predictions, the strongest induction head's attention, the logit
lens, and every head's induction score. Figures are inline PNGs, the viewers inline
HTML + JavaScript from gemmalens itself: the file opens offline in any browser.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from gemmalens import circuits
from gemmalens.encdec import EncoderDecoderModel
from gemmalens.widgets import AttentionViewer, LogitLensViewer

DEFAULT_PROMPT = (
    "The capital of France is Paris. The capital of Japan is Tokyo. The capital of France is"
)
_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
       max-width: 1100px; color: #222; line-height: 1.45; padding: 0 1rem; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; } h2 { margin-top: 2.2rem; }
.meta { color: #555; } code, .prompt { font-family: ui-monospace, Menlo, monospace; }
.prompt { background: #f6f8fa; padding: 0.6rem 0.8rem; border-radius: 6px; }
table { border-collapse: collapse; } td, th { padding: 0.2rem 0.8rem; text-align: left; }
tr:nth-child(even) { background: #f6f8fa; } img { max-width: 100%; }
.note { color: #555; font-size: 0.92rem; }
"""


@dataclasses.dataclass(frozen=True)
class ReportFindings:
    """What the report shows, as numbers (the CLI prints them)."""

    top_predictions: list[tuple[str, float]]
    induction_head: tuple[int, int, float]
    induction_chance: float
    lens_first_layer: int | None  # first layer whose top token is the final prediction
    # (query, key, weight) where the head reads the token after an earlier copy, or None
    prompt_example: tuple[int, int, float] | None = None


def _png(figure: Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="figure" src="data:image/png;base64,{encoded}">'


def _predictions_figure(predictions: list[tuple[str, float]]) -> Figure:
    figure = Figure(figsize=(6.0, 0.35 * len(predictions) + 1.0), layout="constrained")
    ax = figure.add_subplot()
    labels = [repr(text) for text, _ in predictions][::-1]
    ax.barh(labels, [p for _, p in predictions][::-1], color="#3182bd")
    ax.set(xlabel="probability", title="Top next-token predictions", xlim=(0, 1))
    return figure


def _induction_figure(scores: circuits.InductionScores, layer_types: Any) -> Figure:
    figure = Figure(figsize=(6.5, 0.45 * len(scores.scores) + 1.5), layout="constrained")
    ax = figure.add_subplot()
    image = ax.imshow(scores.scores, cmap="magma", vmin=0, vmax=1, aspect="auto")
    kinds = layer_types or [None] * len(scores.scores)
    ax.set_yticks(
        range(len(scores.scores)),
        [
            f"{i} {'global' if t == 'full_attention' else 'local' if t else ''}"
            for i, t in enumerate(kinds)
        ],
    )
    ax.set(
        xlabel="head",
        ylabel="layer",
        title="Induction score of every head (repeated random tokens)",
    )
    figure.colorbar(image, ax=ax, label="attention to the token after the earlier copy")
    return figure


def induction_example(tokens: np.ndarray, pattern: np.ndarray) -> tuple[int, int, float] | None:
    """Where a head acts as an induction head on one prompt: the query position ``q`` whose
    token occurred before (at ``p``) and which attends most to ``p + 1``, the token that
    followed it. Returns ``(q, p + 1, weight)``, or None if no token repeats.

    ``tokens``: ``[seq]`` ids; ``pattern``: ``[q_pos, k_pos]`` one head's attention.
    """
    best = None
    for q in range(1, len(tokens)):
        earlier = [p for p in range(q - 1) if tokens[p] == tokens[q]]
        for p in earlier:
            weight = float(pattern[q, p + 1])
            if best is None or weight > best[2]:
                best = (q, p + 1, weight)
    return best


def _lens_first_layer(lens: LogitLensViewer, final_token: str) -> int | None:
    rows = [row[-1][0] for row in lens.top_tokens]  # top token at the last position
    for index, (label, token) in enumerate(zip(lens.row_labels, rows)):
        if token == final_token and label != "embed":
            return index - 1 if lens.row_labels[0] == "embed" else index
    return None


def _example_text(tokenizer: Any, ids: np.ndarray, example: tuple | None) -> str:
    if example is None:
        return "No token of this prompt repeats, so there is nothing for it to complete here."
    query, key, weight = example
    return (
        f"On this prompt, at <code>{html.escape(repr(tokenizer.piece_text(ids[query])))}</code> "
        f"(position {query}) it gives {weight:.2f} of its attention to "
        f"<code>{html.escape(repr(tokenizer.piece_text(ids[key])))}</code> (position {key}), "
        "the token that followed the same token earlier."
    )


def write_report(m: Any, prompt: str, path: str | pathlib.Path, title: str) -> ReportFindings:
    """Runs ``prompt`` through ``m`` (a decoder-only `gemmalens.Model` with a tokenizer) and
    writes the HTML report to ``path``.

    Returns:
      the numbers the report shows.
    """
    if m.tokenizer is None:
        raise ValueError(
            "The report needs a tokenizer to show tokens: put the checkpoint's tokenizer.model "
            "beside its config.json."
        )
    if isinstance(m, EncoderDecoderModel):
        raise ValueError(
            "The demo report covers decoder-only models (Gemma 3, 3n, 4); this checkpoint is "
            "an encoder-decoder (T5Gemma 2). See the T5Gemma 2 tutorial notebook instead."
        )
    tokenizer = m.tokenizer
    tokens, _ = m.to_tokens(prompt)
    induction = circuits.induction_scores(m)
    layer, head, score = induction.top(1)[0]
    names = ["hook_embed", "blocks.*.hook_resid_post", f"blocks.{layer}.attn.hook_pattern"]
    logits, cache = m.run_with_cache(tokens, names=names)
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits[0, -1], jnp.float32)))
    top = np.argsort(-probs, kind="stable")[:10]
    predictions = [(tokenizer.piece_text(t), float(probs[t])) for t in top]

    ids = np.asarray(tokens[0])
    pattern = np.asarray(cache[f"blocks.{layer}.attn.hook_pattern"], np.float32)[0, head]
    example = induction_example(ids, pattern)
    selected = example[0] if example else len(ids) - 1
    attention = AttentionViewer(cache, tokens, layer=layer, head=head, selected_token=selected)
    lens = LogitLensViewer(cache, tokens, k=5)
    lens_layer = _lens_first_layer(lens, lens.top_tokens[-1][-1][0])
    findings = ReportFindings(
        predictions, (layer, head, score), float(induction.chance[layer]), lens_layer, example
    )

    config = m.config
    rows = "".join(
        f"<tr><td>{i + 1}</td><td><code>{html.escape(repr(text))}</code></td><td>{p:.3f}</td></tr>"
        for i, (text, p) in enumerate(predictions)
    )
    layer_types = getattr(config, "layer_types", None)
    kind = ""
    if layer_types:
        kind = " (a global layer)" if layer_types[layer] == "full_attention" else " (a local layer)"
    sections = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='meta'>{html.escape(repr(m))}; {config.num_params():,} parameters.</p>",
        f"<p class='prompt'>{html.escape(prompt)}</p>",
        "<h2>1. What comes next</h2>",
        f"<table><tr><th>#</th><th>token</th><th>probability</th></tr>{rows}</table>",
        _png(_predictions_figure(predictions)),
        "<h2>2. The strongest induction head</h2>",
        f"<p>Head <b>{layer}.{head}</b>{kind} scores <b>{score:.2f}</b> on repeated random "
        f"tokens: from each token of the second copy it puts that much attention on the token "
        f"that followed the same token in the first copy (uniform attention would give "
        f"{findings.induction_chance:.3f}). {_example_text(tokenizer, ids, example)} "
        "That row is outlined; in the interactive view, hover or click any token.</p>",
        _png(attention.figure()),
        attention.to_html(),
        "<h2>3. The logit lens</h2>",
        "<p>Each row reads the residual stream after one block through the final norm and "
        "the unembedding: what the model would predict if it stopped there. "
        + (
            f"The final prediction first tops the list after block {lens_layer}.</p>"
            if lens_layer is not None
            else "</p>"
        ),
        _png(lens.figure()),
        lens.to_html(),
        "<h2>4. Induction scores of every head</h2>",
        _png(_induction_figure(induction, layer_types)),
        "<p class='note'>Made by <code>gemmalens demo</code>. Everything in this file is "
        "inline: it needs no network and no Python to view.</p>",
    ]
    page = (
        "<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
        f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(sections)
        + "\n</body>\n</html>\n"
    )
    pathlib.Path(path).write_text(page, encoding="utf-8")
    return findings
