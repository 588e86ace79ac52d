"""Sphinx configuration of the gemmalens documentation site.

Build it from the repository root with ``python -m sphinx -W --keep-going -b html docs
docs/_build/html`` (``tests/test_docs.py`` does the same). Notebooks are rendered with the
outputs they were saved with: nothing runs at build time but the tiny models behind the
hook point tables (``_ext/gemmalens_docs/hook_table.py``) and the block diagrams
(``_ext/gemmalens_docs/block_figures.py``). Nothing on the built pages comes from a CDN:
MathJax 2 is copied from the installed ``jupyter-server-mathjax`` package and the theme
bundles its own assets.
"""

from __future__ import annotations

import pathlib
import sys

DOCS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))
sys.path.insert(0, str(DOCS.parent))  # gemmalens itself, also when it is not installed

import gemmalens  # noqa: E402

project = "gemmalens"
author = "the gemmalens authors"
copyright = "the gemmalens authors"
release = version = gemmalens.__version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "gemmalens_docs",
]

exclude_patterns = [
    "_build",
    "README.md",  # about this folder, for readers of the repository
    "tutorials/README.md",
    "tutorials/**/.ipynb_checkpoints",
    "**/.ipynb_checkpoints",
    "Thumbs.db",
    ".DS_Store",
]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}

# -- MyST and notebooks ------------------------------------------------------------------

myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
# MathJax 2 is configured below; MyST would write a MathJax 3/4 configuration.
myst_update_mathjax = False

nb_execution_mode = "off"  # notebooks are rendered with their stored outputs
nb_merge_streams = True
# A viewer's bundle has the live widget view and a self-contained text/html copy (its
# data and JavaScript inline). Without a kernel only the copy can draw, so it wins.
nb_mime_priority_overrides = [
    ("html", "text/html", 0),
    ("html", "application/vnd.jupyter.widget-view+json", None),  # never: nothing draws it
]
# myst-nb would load require.js and the ipywidgets HTML manager from a CDN on pages whose
# notebook saved widget state; the text/html copies above need neither.
nb_ipywidgets_js: dict = {}

# -- API reference -----------------------------------------------------------------------

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_default_options = {"members": True, "show-inheritance": False}
autoclass_content = "both"  # the class docstring, then __init__'s Args
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = True
# The viewers document their synced traitlets under "Traitlets:" (see gemmalens_docs).
napoleon_custom_sections = [("Traitlets", "params_style")]
# Docstrings write `Model` for a reference to a documented object.
default_role = "py:obj"

# -- HTML --------------------------------------------------------------------------------

html_theme = "sphinx_book_theme"
html_title = "gemmalens"
html_static_path = ["_static"]
html_css_files = ["gemmalens-docs.css"]
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
    "use_download_button": True,
    "use_fullscreen_button": False,
}
html_last_updated_fmt = None
# The theme's light/dark switch starts from this (without it, a first visit logs a
# console error about an empty mode).
html_context = {"default_mode": "auto"}
html_show_sourcelink = False

# MathJax 2 from jupyter-server-mathjax, copied into _static/mathjax by gemmalens_docs.
# That package ships one combined configuration and the STIX-Web fonts (as Jupyter uses it).
mathjax_path = "mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full"
mathjax2_config = {
    "tex2jax": {
        "inlineMath": [["\\(", "\\)"]],
        "displayMath": [["\\[", "\\]"]],
        "processEscapes": True,
        "ignoreClass": "document",
        "processClass": "math|output_area",
    },
    "HTML-CSS": {
        "availableFonts": [],
        "imageFont": None,
        "preferredFont": None,
        "webFont": "STIX-Web",
        # MathJax's blank test font is url('about:blank'), which Chromium refuses with a
        # console error on every page with math; a local() lookup fails just as quietly.
        "styles": {"@font-face": {"font-family": "MathJax_Blank", "src": "local('MathJax_Blank')"}},
    },
    "showMathMenu": False,
    "messageStyle": "none",
}
mathjax3_config = None
mathjax4_config = None
