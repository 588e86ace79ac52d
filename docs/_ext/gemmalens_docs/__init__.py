"""Sphinx extension of the gemmalens docs: what the site generates from the code.

* the hook point tables (``{hook-table}``, `hook_table`), from tiny models, and the
  preset tables (``{preset-table}``, `preset_table`);
* the block diagrams (`block_figures`), drawn into ``docs/_generated/`` before reading;
* the tutorials toctree: every ``notebooks/*.ipynb`` (through the ``docs/tutorials``
  link), in file name order, in place of the ``<!-- tutorials -->`` line of
  ``tutorials.md``;
* for the viewers' API entries: signatures read from ``__init__`` (traitlets'
  ``__new__(*args, **kwargs)`` would hide them), and their ``Traitlets (synced ...):``
  blocks read as a Google-style ``Traitlets:`` section (napoleon takes only plain words
  as a section header);
* MathJax 2 copied from the installed ``jupyter-server-mathjax`` into ``_static/mathjax``
  (without the accessibility explorer's speech engine, which names a CDN).
"""

from __future__ import annotations

import pathlib
import re
import shutil
from typing import Any

from gemmalens_docs import block_figures, hook_table, preset_table

DOCS = pathlib.Path(__file__).resolve().parents[2]
GENERATED = DOCS / "_generated"
TUTORIALS = DOCS / "tutorials"  # a link to ../notebooks
TUTORIALS_MARKER = "<!-- tutorials -->"
TRAITLETS_HEADER = re.compile(r"^(\s*)Traitlets\b[^:]*:\s*$")


def tutorial_notebooks() -> list[pathlib.Path]:
    """The tutorial notebooks, in file name order."""
    return sorted(p for p in TUTORIALS.glob("*.ipynb") if not p.name.startswith("."))


def _draw_figures(app: Any) -> None:
    block_figures.write_all(GENERATED / "figures")


def _tutorials_toctree(app: Any, docname: str, source: list[str]) -> None:
    if docname != "tutorials":
        return
    notebooks = tutorial_notebooks()
    if notebooks:
        entries = "\n".join(f"tutorials/{p.stem}" for p in notebooks)
        listing = f"```{{toctree}}\n:maxdepth: 1\n\n{entries}\n```\n"
    else:
        listing = "No tutorial notebooks yet: they arrive in `notebooks/`.\n"
    source[0] = source[0].replace(TUTORIALS_MARKER, listing)


def _always_reread_tutorials(app: Any, env: Any, added, changed, removed) -> list[str]:
    # The toctree depends on which notebooks exist, which Sphinx does not track.
    return ["tutorials"] if "tutorials" in env.found_docs else []


def _traitlets_sections(app: Any, what: str, name: str, obj: Any, options, lines: list[str]):
    # Runs before napoleon: "Traitlets (synced):" becomes the custom section "Traitlets:".
    for i, line in enumerate(lines):
        header = TRAITLETS_HEADER.match(line)
        if header:
            lines[i] = f"{header.group(1)}Traitlets:"


def _init_signature(app: Any, what: str, name: str, obj: Any, options, signature, annotation):
    # traitlets' HasTraits defines __new__(*args, **kwargs), which autodoc prefers.
    if what != "class" or signature != "(*args, **kwargs)" or "__init__" not in vars(obj):
        return None
    from sphinx.util.inspect import signature as read_signature
    from sphinx.util.inspect import stringify_signature

    try:
        init = read_signature(obj.__init__, bound_method=True)
    except (TypeError, ValueError):
        return None
    return stringify_signature(init, show_annotation=False), annotation


def _copy_mathjax(app: Any, exception: Exception | None) -> None:
    if exception is not None or app.builder.format != "html":
        return
    import jupyter_server_mathjax

    source = pathlib.Path(jupyter_server_mathjax.__file__).parent / "static"
    # Without the speech-rule engine of the accessibility explorer (only loaded from the
    # MathJax menu, which conf.py turns off): it names a CDN as its fallback for locales.
    leave_out = shutil.ignore_patterns("mathjax-sre.js", "mathmaps")
    target = pathlib.Path(app.outdir) / "_static" / "mathjax"
    shutil.copytree(source, target, ignore=leave_out, dirs_exist_ok=True)


def setup(app: Any) -> dict[str, Any]:
    app.add_directive("hook-table", hook_table.HookTable)
    app.add_directive("preset-table", preset_table.PresetTable)
    app.connect("builder-inited", _draw_figures)
    app.connect("source-read", _tutorials_toctree)
    app.connect("env-get-outdated", _always_reread_tutorials)
    app.connect("env-check-consistency", hook_table.check_descriptions)
    app.connect("autodoc-process-docstring", _traitlets_sections, priority=100)
    app.connect("autodoc-process-signature", _init_signature)
    app.connect("build-finished", _copy_mathjax)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
