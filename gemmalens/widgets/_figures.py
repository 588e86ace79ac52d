"""Small matplotlib helpers shared by the viewers' static figures.

Figures are made with `matplotlib.figure.Figure` (not pyplot), so a notebook shows each
once (as the cell's value) and nothing accumulates in pyplot's global state.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

TOKEN_FONT_SIZE = 8
MAX_TICK_LABELS = 64


class NotebookFigure(Figure):
    """A matplotlib `Figure` that shows itself as a PNG in Jupyter even when pyplot (and so
    the inline backend) was never imported; with the inline backend active, IPython's own
    formatter takes precedence and draws it once, as usual."""

    def __repr__(self) -> str:  # reads as the plain Figure it is
        return super().__repr__().replace(type(self).__name__, "Figure", 1)

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        self.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        return buffer.getvalue()


def new_figure(width: float, height: float, figsize: tuple[float, float] | None = None) -> Figure:
    """A constrained-layout figure, ``figsize`` overriding the computed size."""
    return NotebookFigure(figsize=figsize or (width, height), layout="constrained")


def fitted_size(
    columns: int, rows: int, cell: float = 0.28, pad: tuple[float, float] = (2.6, 1.9)
) -> tuple[float, float]:
    """A figure size (inches) that gives each of ``columns x rows`` cells about ``cell``
    inches, within 4..15 wide and 2.5..11 high."""
    width = min(15.0, max(4.0, columns * cell + pad[0]))
    height = min(11.0, max(2.5, rows * cell + pad[1]))
    return width, height


def truncate(label: str, length: int = 14) -> str:
    """``label`` cut to ``length`` characters, an ellipsis marking the cut."""
    return label if len(label) <= length else label[: length - 1] + "…"


def tick_labels(
    ax: Axes,
    labels: Sequence[str],
    axis: str = "x",
    rotation: float = 60.0,
    fontsize: int = 0,
    length: int = 14,
) -> None:
    """``labels`` as the ticks of ``axis`` (every n-th one when there are many), each cut
    to ``length`` characters."""
    count = len(labels)
    step = max(1, math.ceil(count / MAX_TICK_LABELS))
    where = np.arange(0, count, step)
    shown = [truncate(labels[i], length) for i in where]
    size = fontsize or TOKEN_FONT_SIZE
    if axis == "x":
        ax.set_xticks(where, shown, fontsize=size, rotation=rotation, ha="right")
        for text in ax.get_xticklabels():
            text.set_rotation_mode("anchor")
    else:
        ax.set_yticks(where, shown, fontsize=size)


def symmetric_limit(values: np.ndarray) -> float:
    """The largest finite magnitude of ``values`` (1 when there is none), for a colour map
    centred at 0."""
    finite = np.abs(values[np.isfinite(values)])
    peak = float(finite.max()) if finite.size else 0.0
    return peak if peak > 0 else 1.0
