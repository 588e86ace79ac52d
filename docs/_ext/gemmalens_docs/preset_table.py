"""``{preset-table} family``: that family's presets with their sizes, read from
``gemmalens.presets()`` (parameter counts from ``num_params()``, nothing allocated)."""

from __future__ import annotations

from typing import Any

from docutils import nodes
from sphinx.util.docutils import SphinxDirective


def _stack_summary(config: Any) -> str:
    return (
        f"{config.num_hidden_layers} layers, d_model {config.hidden_size}, "
        f"{config.num_attention_heads} heads ({config.num_key_value_heads} KV)"
    )


def preset_rows(family: str) -> list[tuple[str, str, str]]:
    """(name, shape, parameters) of every preset whose config's family is ``family``."""
    import gemmalens as gl

    rows = []
    for name in gl.presets():
        config = gl.preset(name)
        if config.family != family:
            continue
        if hasattr(config, "encoder"):
            shape = (
                f"encoder: {_stack_summary(config.encoder)}; "
                f"decoder: {_stack_summary(config.decoder)}"
            )
        else:
            shape = _stack_summary(config)
            if getattr(config, "enable_moe_block", False):
                shape += f", {config.num_experts} experts (top {config.top_k_experts})"
        rows.append((name, shape, f"{config.num_params() / 1e9:.2f} B"))
    return rows


class PresetTable(SphinxDirective):
    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        rows = preset_rows(self.arguments[0])
        if not rows:
            raise self.error(f"No preset has family {self.arguments[0]!r}.")
        table = nodes.table()
        group = nodes.tgroup(cols=3)
        table += group
        for width in (25, 60, 15):
            group += nodes.colspec(colwidth=width)
        head, body = nodes.thead(), nodes.tbody()
        group += head
        group += body
        header = nodes.row()
        for text in ("preset", "shape", "parameters"):
            header += nodes.entry("", nodes.paragraph(text, text))
        head += header
        for name, shape, count in rows:
            row = nodes.row()
            row += nodes.entry("", nodes.paragraph("", "", nodes.literal(name, name)))
            row += nodes.entry("", nodes.paragraph(shape, shape))
            row += nodes.entry("", nodes.paragraph(count, count))
            body += row
        return [table]
