"""Block diagrams of the four families, drawn with matplotlib at build time.

One figure per family (``gemma3``, ``gemma3n``, ``gemma4``, ``t5gemma2``), written as SVG.
The picture language is shared: the residual stream is a thick grey line running down,
each branch leaves it to the right through its boxes and comes back into a ``+``; yellow
tags name the hook points (the colour Treescope gives a ``HookPoint``), and orange boxes
are what the family adds to Gemma 3's block.

Run ``python docs/_ext/gemmalens_docs/block_figures.py OUT_DIR`` to write them by hand.
"""

from __future__ import annotations

import io
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")

from matplotlib import patches  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

INCH = 0.55  # figure inches per diagram unit
HOOK = "#e9c46a"  # Treescope's HookPoint colour
HOOK_TEXT = "#6b4f00"
LINE = "#555555"
RESID = "#a3a3a3"
KINDS = {  # face, edge
    "norm": ("#eef0f3", "#8c96a3"),
    "attention": ("#dbe8f7", "#4a78b0"),
    "mlp": ("#dcefdc", "#4c9a4c"),
    "new": ("#fde3c8", "#d9822b"),
}
STYLE = {
    "svg.fonttype": "path",  # glyphs as paths: the same picture with any installed fonts
    "svg.hashsalt": "gemmalens",  # stable element ids
    "font.family": "DejaVu Sans",
    "font.size": 9,
}
MONO = "DejaVu Sans Mono"
NORM = 1.55  # width of a norm box
GAP = 0.45  # arrow between two boxes
# Drawing order: streams under arrows under boxes under text under hook dots.
Z_STREAM, Z_LINE, Z_BOX, Z_TEXT, Z_HOOK = 1, 2, 3, 4, 5


def box_height(note: str) -> float:
    """The height of a box: room for its title and the lines of its note."""
    return 0.7 if not note else 0.8 + 0.3 * (note.count("\n") + 1)


class Diagram:
    """A canvas in diagram units (y grows downwards) with the shapes the figures use."""

    def __init__(self, width: float, height: float, title: str):
        self.figure = Figure(figsize=(width * INCH, height * INCH))
        self.ax = self.figure.add_axes((0, 0, 1, 1))
        self.ax.set_xlim(0, width)
        self.ax.set_ylim(height, 0)
        self.ax.set_axis_off()
        self.text(width / 2, 0.45, title, size=12, weight="bold")

    def text(self, x: float, y: float, text: str, **kwargs) -> None:
        kwargs.setdefault("ha", "center")
        kwargs.setdefault("va", "center")
        kwargs.setdefault("zorder", Z_TEXT)
        self.ax.text(x, y, text, **kwargs)

    def hook_text(self, x: float, y: float, text: str, **kwargs) -> None:
        """Names of hook points inside a box, written beside it."""
        kwargs.setdefault("ha", "left")
        self.text(x, y, text, size=7, family=MONO, color=HOOK_TEXT, **kwargs)

    def box(self, x: float, y: float, w: float, title: str, kind: str = "norm", note: str = ""):
        """A rounded box centred on (x, y), as tall as its text."""
        h = box_height(note)
        face, edge = KINDS[kind]
        self.ax.add_patch(
            patches.FancyBboxPatch(
                (x - w / 2, y - h / 2),
                w,
                h,
                boxstyle="round,pad=0,rounding_size=0.15",
                facecolor=face,
                edgecolor=edge,
                linewidth=1.2,
                zorder=Z_BOX,
            )
        )
        if note:
            self.text(x, y - h / 2 + 0.36, title, weight="bold")
            self.text(x, y + 0.2, note, size=7.5, color="#333333", linespacing=1.3)
        else:
            self.text(x, y, title, weight="bold")

    def line(self, *points: tuple[float, float], arrow: bool = True) -> None:
        """A polyline through ``points``, with an arrowhead at the end."""
        xs, ys = zip(*points)
        self.ax.plot(xs, ys, color=LINE, linewidth=1.3, solid_capstyle="butt", zorder=Z_LINE)
        if arrow:
            self.ax.annotate(
                "",
                xy=points[-1],
                xytext=points[-2],
                arrowprops={
                    "arrowstyle": "-|>",
                    "color": LINE,
                    "linewidth": 1.3,
                    "shrinkA": 0,
                    "shrinkB": 0,
                    "mutation_scale": 10,
                },
                zorder=Z_LINE,
            )

    def stream(self, x: float, top: float, bottom: float, width: float = 5.0) -> None:
        """A stretch of residual stream."""
        self.ax.plot(
            [x, x],
            [top, bottom],
            color=RESID,
            linewidth=width,
            solid_capstyle="butt",
            zorder=Z_STREAM,
        )

    def plus(self, x: float, y: float, symbol: str = "+") -> None:
        self.ax.add_patch(
            patches.Circle(
                (x, y), 0.22, facecolor="white", edgecolor=LINE, linewidth=1.3, zorder=Z_BOX
            )
        )
        self.text(x, y - 0.01, symbol, size=11, weight="bold", color=LINE)

    def hook(self, x: float, y: float, name: str, side: str = "left", dx: float = 0.35) -> None:
        """A hook point: a dot on the line at (x, y) and a tag with its name ``dx`` away on
        ``side`` (left, right, above, below), joined by a thin leader when that is far."""
        self.ax.add_patch(
            patches.Circle(
                (x, y), 0.11, facecolor=HOOK, edgecolor=HOOK_TEXT, linewidth=0.8, zorder=Z_HOOK
            )
        )
        tx, ty = {
            "left": (x - dx, y),
            "right": (x + dx, y),
            "above": (x, y - dx),
            "below": (x, y + dx),
        }[side]
        if dx > 0.5:
            self.ax.plot(
                [x, tx], [y, ty], color=HOOK_TEXT, linewidth=0.6, linestyle=":", zorder=Z_HOOK
            )
        self.text(
            tx,
            ty,
            name,
            ha={"left": "right", "right": "left"}.get(side, "center"),
            size=7.5,
            family=MONO,
            color=HOOK_TEXT,
            zorder=Z_HOOK,
            bbox={
                "boxstyle": "round,pad=0.25,rounding_size=0.2",
                "facecolor": "#fbf1d6",
                "edgecolor": HOOK,
                "linewidth": 0.8,
            },
        )

    def legend(self, y: float, items: list[tuple[str, str]]) -> None:
        """Swatches in a row: (kind, label)."""
        x = 0.5
        for kind, label in items:
            face, edge = (HOOK, HOOK_TEXT) if kind == "hook" else KINDS[kind]
            self.ax.add_patch(
                patches.FancyBboxPatch(
                    (x, y - 0.17),
                    0.5,
                    0.34,
                    boxstyle="round,pad=0,rounding_size=0.08",
                    facecolor=face,
                    edgecolor=edge,
                    linewidth=1,
                )
            )
            self.text(x + 0.65, y, label, ha="left", size=8)
            x += 1.2 + 0.125 * len(label)

    def svg(self) -> bytes:
        out = io.BytesIO()
        with matplotlib.rc_context(STYLE):
            self.figure.savefig(out, format="svg", metadata={"Date": None, "Creator": None})
        return out.getvalue()


def boxes_in_a_row(d: Diagram, x: float, y: float, boxes: list[tuple[float, str, str, str]]):
    """Boxes (width, title, kind, note) left to right from x, joined by arrows; returns the
    x of the last box's right edge."""
    for i, (w, title, kind, note) in enumerate(boxes):
        if i:
            d.line((x, y), (x + GAP, y))
            x += GAP
        d.box(x + w / 2, y, w, title, kind, note)
        x += w
    return x


def branch(
    d: Diagram, x0: float, y: float, y_back: float, boxes, hook: str | None, side: str = "right"
) -> float:
    """A residual branch: from the stream at (x0, y) right through ``boxes``, down and back
    into a ``+`` at (x0, y_back), with ``hook`` on the way back (its tag on ``side``).
    Returns its right end."""
    d.line((x0, y), (x0 + 0.7, y))
    x = boxes_in_a_row(d, x0 + 0.7, y, boxes)
    right = x + 0.5
    d.line((x, y), (right, y), (right, y_back), (x0 + 0.22, y_back))
    if hook and side == "right":
        d.hook(right, (y + y_back) / 2 + 0.15, hook, side="right", dx=0.3)
    elif hook:
        d.hook(right, y_back - 0.45, hook, side="left", dx=0.3)
    d.plus(x0, y_back)
    return right


def legend_for(d: Diagram, y: float, family: str | None) -> None:
    items = [("norm", "norm"), ("attention", "attention"), ("mlp", "MLP")]
    if family:
        items.append(("new", f"new in {family}"))
    d.legend(y, [*items, ("hook", "hook point")])


ATTENTION_HOOKS = "attn.hook_q, hook_k, hook_v, hook_attn_scores, hook_pattern, hook_z"
MLP_HOOKS = "mlp.hook_pre, hook_pre_linear, hook_post"


def gemma3() -> Diagram:
    d = Diagram(16.0, 10.9, "A Gemma 3 block")
    x0 = 4.4
    d.text(x0, 1.0, "residual stream", size=8, color=LINE)
    d.stream(x0, 1.25, 8.6)
    d.hook(x0, 1.6, "blocks.{i}.hook_resid_pre")
    d.hook_text(x0 + 0.7, 2.05, ATTENTION_HOOKS)
    attention = (
        "QK-norm, RoPE, grouped KV heads\nlocal layers: sliding window\nglobal layers: every "
        "earlier key"
    )
    branch(
        d,
        x0,
        3.1,
        4.6,
        [(NORM, "RMSNorm", "norm", ""), (3.8, "attention", "attention", attention)]
        + [(NORM, "RMSNorm", "norm", "")],
        "hook_attn_out",
    )
    d.hook(x0, 5.15, "blocks.{i}.hook_resid_mid")
    d.hook_text(x0 + 0.7, 5.75, MLP_HOOKS)
    branch(
        d,
        x0,
        6.5,
        7.7,
        [(NORM, "RMSNorm", "norm", ""), (3.8, "gated MLP", "mlp", "GELU(gate) × up → down")]
        + [(NORM, "RMSNorm", "norm", "")],
        "hook_mlp_out",
    )
    d.hook(x0, 8.25, "blocks.{i}.hook_resid_post")
    d.line((x0, 8.6), (x0, 9.0))
    # The layer pattern: 5 local : 1 global.
    y = 9.65
    d.text(0.5, y, "layers:", ha="left", size=8)
    for i in range(12):
        kind = "attention" if (i + 1) % 6 == 0 else "norm"
        face, edge = KINDS[kind]
        d.ax.add_patch(
            patches.Rectangle((1.6 + i * 0.5, y - 0.18), 0.42, 0.36, facecolor=face, edgecolor=edge)
        )
        d.text(1.81 + i * 0.5, y, "G" if kind == "attention" else "L", size=7)
    d.text(7.75, y, "…  5 local (L) : 1 global (G)", ha="left", size=8)
    legend_for(d, 10.35, None)
    return d


def gemma3n() -> Diagram:
    d = Diagram(16.6, 13.9, "A Gemma 3n block")
    # Streams 3, 2, 1, 0 from left to right: the active stream 0 is nearest the branches.
    streams = {3: 3.9, 2: 4.25, 1: 4.6, 0: 4.95}
    x0 = streams[0]
    for s, x in streams.items():
        d.stream(x, 1.25, 12.6, width=3.0)
        d.text(x, 1.05, str(s), size=7.5, color=LINE)
    d.text(3.5, 1.05, "AltUp streams", size=8, color=LINE, ha="right")

    def across_streams(y: float, title: str, hook: str, formula: str) -> None:
        d.ax.add_patch(
            patches.FancyBboxPatch(
                (3.6, y - 0.3), 1.65, 0.6, boxstyle="round,pad=0,rounding_size=0.12",
                facecolor=KINDS["new"][0], edgecolor=KINDS["new"][1], linewidth=1.2, zorder=Z_BOX,
            )
        )  # fmt: skip
        d.text(4.42, y, title, weight="bold")
        d.hook(3.6, y, hook, dx=0.3)
        d.text(5.5, y, formula, ha="left", size=7.5)

    across_streams(
        2.0,
        "predict",
        "altup.hook_predictions",
        "pred[s] = stream[s] + Σₜ C[s, t] · stream[t]\nC: a router on the active stream",
    )
    # The transformer layer runs on the active stream's prediction.
    d.hook(x0, 2.75, "blocks.{i}.hook_resid_pre", dx=1.6)
    y, y_laurel, y_back = 3.7, 5.15, 6.05
    d.line((x0, y), (x0 + 0.7, y))
    d.box(x0 + 0.7 + NORM / 2, y, NORM, "RMSNorm")
    split = x0 + 0.7 + NORM + 0.25
    attention = "QK-norm, value norm, scale 1\nlater layers reuse K, V"
    d.line((x0 + 0.7 + NORM, y), (split + 0.2, y))
    x = boxes_in_a_row(
        d,
        split + 0.2,
        y,
        [(3.8, "attention", "attention", attention), (NORM, "RMSNorm", "norm", "")],
    )
    right = x + 0.5
    d.line((x, y), (right, y), (right, y_back), (x0 + 0.22, y_back))
    d.hook(right, (y + y_laurel) / 2 + 0.1, "hook_attn_out", side="right", dx=0.3)
    d.line((split, y), (split, y_laurel), (split + 0.6, y_laurel))
    d.box(split + 0.6 + 1.9, y_laurel, 3.8, "LAuReL", "new", "x + norm(right(left(x))), low rank")
    d.line((split + 4.4, y_laurel), (right, y_laurel))
    d.hook((split + 4.4 + right) / 2, y_laurel, "laurel.hook_out", side="below", dx=0.45)
    d.plus(x0, y_back)
    d.text(x0 + 0.35, y_back + 0.32, "÷ √2", ha="left", size=8)
    d.hook(x0, 6.6, "blocks.{i}.hook_resid_mid", dx=1.6)
    d.hook_text(x0 + 0.7, 7.15, MLP_HOOKS + ", hook_pre_sparse")
    branch(
        d,
        x0,
        7.9,
        9.1,
        [(NORM, "RMSNorm", "norm", ""), (4.2, "gated MLP", "mlp", "sparse layers: Gaussian top-k")]
        + [(NORM, "RMSNorm", "norm", "")],
        "hook_mlp_out",
    )
    d.hook(x0, 9.6, "blocks.{i}.hook_resid_post", dx=1.6)
    across_streams(
        10.3,
        "correct",
        "altup.hook_corrected",
        "stream[s] = pred[s] + coef[s] · (layer output − pred[active])",
    )
    # The per-layer input joins streams 1..3.
    y_ple, y_add = 11.2, 12.05
    left, width = x0 + 1.1, 4.0
    d.line((x0, y_ple), (left, y_ple))
    d.box(
        left + width / 2, y_ple, width, "per-layer input", "new", "gate(stream 0) × PLE[i] → norm"
    )
    d.line((left + width + 2.2, y_ple), (left + width, y_ple))
    d.text(
        left + width + 2.35, y_ple, "PLE[i]: this layer's\nper-layer embedding", ha="left", size=7.5
    )
    d.hook(left + width + 1.1, y_ple, "hook_per_layer_input", side="above", dx=0.45)
    d.line((left + width / 2, y_ple + 0.55), (left + width / 2, y_add), (streams[1] + 0.22, y_add))
    for s in (1, 2, 3):
        d.plus(streams[s], y_add)
    d.hook(x0, 12.5, "blocks.{i}.hook_streams_post", dx=1.6)
    legend_for(d, 13.4, "Gemma 3n")
    return d


def gemma4() -> Diagram:
    d = Diagram(17.0, 14.0, "A Gemma 4 block")
    x0 = 4.4
    d.text(x0, 1.0, "residual stream", size=8, color=LINE)
    d.stream(x0, 1.25, 12.3)
    d.hook(x0, 1.6, "blocks.{i}.hook_resid_pre")
    d.hook_text(x0 + 0.7, 2.05, ATTENTION_HOOKS)
    attention = (
        "QK-norm, value norm, scale 1; later layers\nreuse K, V (E2B, E4B). Global layers: own"
        "\nhead dim, partial RoPE, K = V (26B, 31B)"
    )
    branch(
        d,
        x0,
        3.1,
        4.6,
        [(NORM, "RMSNorm", "norm", ""), (4.6, "attention", "attention", attention)]
        + [(NORM, "RMSNorm", "norm", "")],
        "hook_attn_out",
    )
    d.hook(x0, 5.15, "blocks.{i}.hook_resid_mid")
    # Feedforward: the dense MLP and, on MoE models, the experts beside it.
    y_mlp, y_moe, y_back = 6.3, 8.2, 9.75
    d.hook_text(x0 + 0.7, 5.45, MLP_HOOKS)
    d.line((x0, y_mlp), (x0 + 0.7, y_mlp))
    mlp = (2.9, "gated MLP", "mlp", "double width on\nKV-reusing layers (E2B)")
    x = boxes_in_a_row(
        d, x0 + 0.7, y_mlp, [(NORM, "RMSNorm", "norm", ""), mlp, (NORM, "RMSNorm", "norm", "")]
    )
    xs = x + 0.9  # where the two branches add
    d.line((x, y_mlp), (xs - 0.22, y_mlp))
    d.hook(x + 0.4, y_mlp, "hook_dense_mlp_out", side="above", dx=0.5)
    d.text(x0 + 0.7, y_moe - 0.9, "MoE models (26B-A4B):", ha="left", size=7.5, style="italic")
    d.line((x0, y_moe), (x0 + 0.7, y_moe))
    moe = [
        (2.3, "router", "new", "softmax → top-k"),
        (3.9, "experts", "new", "k of E gated MLPs on\nnorm(x), router-weighted"),
        (NORM, "RMSNorm", "norm", ""),
    ]
    x = boxes_in_a_row(d, x0 + 0.7, y_moe, moe)
    d.line((x, y_moe), (xs, y_moe), (xs, y_mlp + 0.22))
    d.hook(xs, (y_mlp + y_moe) / 2 + 0.2, "moe.hook_out", side="right", dx=0.3)
    d.hook_text(
        x0 + 0.7, y_moe + 0.95, "moe.hook_router_logits, hook_expert_indices, hook_expert_weights"
    )
    d.plus(xs, y_mlp)
    d.line((xs + 0.22, y_mlp), (xs + 0.6, y_mlp))
    d.box(xs + 0.6 + NORM / 2, y_mlp, NORM, "RMSNorm")
    right = xs + 0.6 + NORM + 0.45
    d.line((right - 0.45, y_mlp), (right, y_mlp), (right, y_back), (x0 + 0.22, y_back))
    d.hook(right, y_back - 0.5, "hook_mlp_out", side="left", dx=0.3)
    d.plus(x0, y_back)
    # Per-layer input (E2B, E4B), then the layer scalar.
    d.hook_text(x0 + 0.7, 10.05, "hook_per_layer_input")
    branch(
        d,
        x0,
        10.85,
        11.75,
        [(4.6, "per-layer input", "new", "gate(x) × PLE[i] → norm (E2B, E4B)")],
        "hook_per_layer_out",
    )
    d.plus(x0, 12.3, "×")
    d.text(x0 + 0.35, 12.3, "layer scalar", ha="left", size=8)
    d.stream(x0, 12.5, 12.95)
    d.hook(x0, 12.75, "blocks.{i}.hook_resid_post")
    d.line((x0, 12.95), (x0, 13.3))
    legend_for(d, 13.6, "Gemma 4")
    return d


def t5gemma2() -> Diagram:
    d = Diagram(20.4, 10.6, "T5Gemma 2: an encoder block and a decoder block")
    xe = 1.0
    d.text(xe + 0.2, 1.1, "encoder (bidirectional)", size=9, weight="bold", ha="left")
    d.stream(xe, 1.5, 6.45)
    d.hook_text(xe + 0.4, 1.85, "encoder.blocks.{i}.*: the hook points of a Gemma 3 block")
    branch(
        d,
        xe,
        2.8,
        4.2,
        [(NORM, "RMSNorm", "norm", ""), (2.6, "attention", "attention", "both ways\nlocal: ±W/2")]
        + [(NORM, "RMSNorm", "norm", "")],
        None,
    )
    branch(
        d,
        xe,
        5.0,
        6.2,
        [
            (NORM, "RMSNorm", "norm", ""),
            (2.6, "gated MLP", "mlp", ""),
            (NORM, "RMSNorm", "norm", ""),
        ],
        None,
    )
    d.text(xe + 0.5, 6.75, "× encoder layers", size=8, style="italic", ha="left")
    d.line((xe, 6.45), (xe, 7.75), (xe + 0.3, 7.75))
    d.box(xe + 1.5, 7.75, 2.4, "final norm")
    # The encoder output feeds every decoder layer's keys and values.
    x0, x_feed = 10.6, 9.5
    d.line((xe + 2.7, 7.75), (x_feed, 7.75), (x_feed, 2.4), (x0 + 4.5, 2.4), (x0 + 4.5, 2.9))
    d.text(x_feed - 0.22, 5.0, "encoder output", rotation=90, size=8)
    d.hook_text(x0 + 4.7, 2.6, "attn.hook_cross_k, hook_cross_v")
    d.text(x0 + 0.2, 1.1, "decoder (causal)", size=9, weight="bold", ha="left")
    d.stream(x0, 1.5, 8.3)
    d.hook(x0, 1.8, "decoder.blocks.{i}.hook_resid_pre", side="right", dx=0.3)
    merged = "one softmax over [own keys\n(RoPE, causal) ++ encoder keys]"
    branch(
        d,
        x0,
        3.7,
        5.2,
        [(NORM, "RMSNorm", "norm", ""), (4.0, "merged attention", "new", merged)]
        + [(NORM, "RMSNorm", "norm", "")],
        "hook_attn_out",
        side="left",
    )
    d.hook_text(x0 + 0.4, 4.75, "attn.hook_pattern = [hook_self_pattern | hook_cross_pattern]")
    branch(
        d,
        x0,
        6.0,
        7.2,
        [
            (NORM, "RMSNorm", "norm", ""),
            (4.0, "gated MLP", "mlp", ""),
            (NORM, "RMSNorm", "norm", ""),
        ],
        "hook_mlp_out",
        side="left",
    )
    d.hook(x0, 7.75, "decoder.blocks.{i}.hook_resid_post", side="right", dx=0.3)
    d.line((x0, 8.3), (x0, 8.7))
    d.text(x0 + 0.3, 8.95, "→ final norm → tied unembedding → logits", ha="left", size=8)
    legend_for(d, 9.95, "T5Gemma 2")
    return d


FIGURES = {"gemma3": gemma3, "gemma3n": gemma3n, "gemma4": gemma4, "t5gemma2": t5gemma2}


def render(name: str) -> bytes:
    """The SVG of family ``name``'s block diagram."""
    with matplotlib.rc_context(STYLE):
        return FIGURES[name]().svg()


def write_all(directory: pathlib.Path) -> list[pathlib.Path]:
    """Writes ``{family}_block.svg`` for every family into ``directory``; a file whose
    bytes would not change is left alone (so Sphinx does not copy it again)."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name in FIGURES:
        path = directory / f"{name}_block.svg"
        data = render(name)
        if not path.exists() or path.read_bytes() != data:
            path.write_bytes(data)
        written.append(path)
    return written


if __name__ == "__main__":
    for written in write_all(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ".")):
        print(written)
