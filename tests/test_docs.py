"""The documentation site: it builds with no warning, has every page, takes its commands
from the README and its hook tables from real models, loads nothing from a CDN, and its
pages (viewers, math, figures) work in a real browser.

The site is built once per session with ``python -m sphinx -W --keep-going -b html``,
as a subprocess of this interpreter, into a temporary folder, beside the rest of the suite
(`tests.background`).
"""

from __future__ import annotations

import dataclasses
import html
import os
import pathlib
import re
import shutil
import tempfile

import pytest

import gemmalens as gl
from gemmalens.layers.params import ShapeOnly
from tests import background
from tests.headless_chromium import HeadlessChromium, chromium_path

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
NOTEBOOKS = ROOT / "notebooks"
SLIDING, FULL = "sliding_attention", "full_attention"

FAMILY_PAGES = ["gemma3", "gemma3n", "gemma4", "t5gemma2"]
PAGES = [
    "index",
    "getting-started",
    "tutorials",
    "visualizers",
    "hooks",
    "benchmarks",
    "architectures/index",
    *(f"architectures/{family}" for family in FAMILY_PAGES),
    "api/index",
    "api/gemmalens",
    "api/model",
    "api/cache",
    "api/patching",
    "api/interventions",
    "api/tokenizer",
    "api/widgets",
    "api/families",
    "api/lora",
    "api/sharding",
    "api/sae",
    "api/checkpoints",
    "sharding",
    "checkpoint-formats",
]
# Objects whose API entries must exist: (page, the id Sphinx gives the entry).
API_OBJECTS = [
    ("api/gemmalens", "gemmalens.load"),
    ("api/gemmalens", "gemmalens.build"),
    ("api/gemmalens", "gemmalens.preset"),
    ("api/model", "gemmalens.Model"),
    ("api/model", "gemmalens.Model.run_with_cache"),
    ("api/model", "gemmalens.Model.run_with_hooks"),
    ("api/model", "gemmalens.Model.generate"),
    ("api/model", "gemmalens.kernels.decode_attention.decode_attention"),
    ("api/model", "gemmalens.kernels.decode_mlp.gated_mlp"),
    ("api/model", "gemmalens.EncoderDecoderModel"),
    ("api/cache", "gemmalens.ActivationCache"),
    ("api/cache", "gemmalens.ActivationCache.logit_lens"),
    ("api/patching", "gemmalens.patching.sweep"),
    ("api/patching", "gemmalens.patching.attribution_patching"),
    ("api/interventions", "gemmalens.interventions.ablate_heads"),
    ("api/tokenizer", "gemmalens.Tokenizer"),
    ("api/widgets", "gemmalens.widgets.AttentionViewer"),
    ("api/widgets", "gemmalens.widgets.RoutingViewer"),
    ("api/families", "gemmalens.Gemma3Config"),
]
# Hosts that serve libraries to pages; none may appear anywhere in the built site.
CDN_HOSTS = [
    "cdn.jsdelivr.net",
    "unpkg.com",
    "cdnjs.cloudflare.com",
    "cdn.mathjax.org",
    "ajax.googleapis.com",
    "fonts.googleapis.com",
    "fonts.gstatic.com",
    "code.jquery.com",
    "esm.sh",
    "cdn.skypack.dev",
    "stackpath.bootstrapcdn.com",
    "maxcdn.bootstrapcdn.com",
    "use.fontawesome.com",
    "kit.fontawesome.com",
    "cdn.plot.ly",
]
# Tags whose URL attributes the browser fetches by itself (an <a href> is only a link).
FETCHING_TAG = re.compile(
    r"<(script|link|img|iframe|source|audio|video|embed|object|track|input)\b[^>]*>", re.I
)
REMOTE_ATTRIBUTE = re.compile(
    r"""\b(src|href|data|srcset|poster)\s*=\s*["']?\s*(https?:)?//""", re.I
)
REMOTE_CSS = re.compile(r"""(url\(\s*["']?\s*(https?:)?//|@import\s+["']?\s*(https?:)?//)""", re.I)
VIEWER_HOST = re.compile(r'data-gemmalens-view="([a-z-]+)"')


@dataclasses.dataclass
class Site:
    out: pathlib.Path
    returncode: int
    log: str
    seconds: float

    def page(self, name: str) -> pathlib.Path:
        return self.out / f"{name}.html"

    def read(self, name: str) -> str:
        return self.page(name).read_text(encoding="utf-8")


# The site is built in its own process, beside the rest of the suite (`tests.background`).
BACKGROUND = {
    "sphinx": background.Job(
        ("-m", "sphinx", "-W", "--keep-going", "-b", "html", "-d", "{out}/doctrees", str(DOCS))
        + ("{out}/html",),
        needed_by=("site",),
    )
}


@pytest.fixture(scope="session")
def site() -> Site:
    done = background.result("sphinx", BACKGROUND["sphinx"])
    return Site(done.out / "html", done.returncode, done.stdout + done.stderr, done.seconds)


def _text(page_html: str) -> str:
    """The text of an HTML page, tags removed and entities decoded."""
    return html.unescape(re.sub(r"<[^>]+>", "", page_html))


def _notebooks() -> list[pathlib.Path]:
    return sorted(NOTEBOOKS.glob("*.ipynb"))


# ------------------------------------------------------------------------------ the build


def test_site_builds_without_warnings(site, capsys):
    problems = [
        line for line in site.log.splitlines() if re.search(r"WARNING|ERROR|CRITICAL", line)
    ]
    assert site.returncode == 0 and not problems, (
        f"sphinx-build failed (exit {site.returncode}):\n"
        + "\n".join(problems or [site.log[-5000:]])
    )
    with capsys.disabled():
        print(f"\n[docs] site built in {site.seconds:.0f} s")


def test_every_page_is_built(site):
    missing = [name for name in PAGES if not site.page(name).is_file()]
    assert not missing, f"pages not built: {missing}"
    for page, ident in API_OBJECTS:
        assert f'id="{ident}"' in site.read(page), f"{ident} is not documented on {page}"


def test_every_notebook_is_a_tutorial_page(site):
    toc = site.read("tutorials")
    for notebook in _notebooks():
        assert site.page(f"tutorials/{notebook.stem}").is_file(), notebook.name
        assert f'href="tutorials/{notebook.stem}.html"' in toc, f"{notebook.name} not listed"
    if not _notebooks():
        assert "No tutorial notebooks yet" in _text(toc)


def test_getting_started_shows_the_readme_commands(site):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    assert len(commands) >= 2  # the demo and the test suite
    page = _text(site.read("getting-started"))
    for command in commands:
        assert command.strip() in page, f"README command missing from the docs: {command}"


def test_notebooks_render_with_their_stored_outputs(site):
    """The viewers' text/html copies win over the widget views (no kernel on the page),
    and the static figures are there as images."""
    page = site.read("visualizers")
    assert sorted(set(VIEWER_HOST.findall(page))) == sorted(
        ["attention", "logit-lens", "patching", "altup", "routing"]
    )
    assert "application/vnd.jupyter.widget-view+json" not in page
    assert len(re.findall(r'<img [^>]*src="_images/[^"]+\.png"', page)) >= 5


def test_family_pages_have_their_block_diagram(site):
    for family in FAMILY_PAGES:
        page = site.read(f"architectures/{family}")
        images = re.findall(r'<img [^>]*src="\.\./(_images/[^"]*block[^"]*\.svg)"', page)
        assert images, f"no block diagram on the {family} page"
        svg = (site.out / images[0]).read_text(encoding="utf-8")
        assert "<svg" in svg and len(svg) > 20_000  # a drawing, not an empty canvas


# ------------------------------------------------------------------------------ hook tables


def _tiny_configs(vocab: int = 64) -> dict[str, object]:
    """One small config per hook table, independent of the docs' own (other widths and
    depths, the same features)."""
    return {
        "gemma-3": gl.preset("gemma3_1b").replace(
            vocab_size=vocab, hidden_size=16, intermediate_size=24, num_hidden_layers=6,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8, sliding_window=3,
        ),
        "gemma-3n": gl.preset("gemma3n_e4b").replace(
            vocab_size=vocab, vocab_size_per_layer_input=vocab, hidden_size=16,
            intermediate_size=(24,) * 4, num_hidden_layers=4, num_attention_heads=2,
            num_key_value_heads=1, head_dim=8, sliding_window=3,
            layer_types=(SLIDING, FULL, SLIDING, FULL), activation_sparsity_pattern=(0.95, 0, 0, 0),
            num_kv_shared_layers=2, hidden_size_per_layer_input=4, laurel_rank=2,
        ),
        "gemma-4-dense": gl.preset("gemma4_e4b").replace(
            vocab_size=vocab, vocab_size_per_layer_input=vocab, hidden_size=16,
            intermediate_size=24, num_hidden_layers=4, num_attention_heads=2,
            num_key_value_heads=1, head_dim=8, global_head_dim=16, sliding_window=3,
            layer_types=(SLIDING, FULL, SLIDING, FULL), num_kv_shared_layers=2,
            hidden_size_per_layer_input=4,
        ),
        "gemma-4-mixture-of-experts": gl.preset("gemma4_26b_a4b").replace(
            vocab_size=vocab, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
            num_attention_heads=2, num_key_value_heads=1, num_global_key_value_heads=1,
            head_dim=8, global_head_dim=16, sliding_window=3,
            layer_types=(SLIDING, SLIDING, FULL), num_experts=4, top_k_experts=2,
            moe_intermediate_size=8,
        ),
    }  # fmt: skip


def _t5gemma2_config(vocab: int = 64):
    config = gl.preset("t5gemma2_270m_270m")

    def shrink(stack):
        return stack.replace(
            vocab_size=vocab, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8,
            sliding_window=3, layer_types=(SLIDING, SLIDING, FULL),
        )  # fmt: skip

    return dataclasses.replace(
        config, encoder=shrink(config.encoder), decoder=shrink(config.decoder)
    )


def _hook_names(config) -> list[str]:
    """``m.hook_names`` of a model of ``config`` (its tree only: no weights are drawn)."""
    surface = getattr(config, "surface_class", gl.Model)
    return surface(config.build(ShapeOnly()), config).hook_names


def _templates(names) -> set[str]:
    return {re.sub(r"(^|\.)blocks\.\d+\.", r"\1blocks.{i}.", name) for name in names}


def _table_names(page: str, section: str) -> set[str]:
    body = page.split(f'<section id="{section}"', 1)[1].split("</section>", 1)[0]
    rows = re.findall(
        r'<tr class="row-(?:odd|even)"><td><p><code[^>]*><span class="pre">([^<]+)<', body
    )
    return set(rows)


def test_hook_tables_list_the_models_hook_names(site):
    page = site.read("hooks")
    configs = {**_tiny_configs(), "t5gemma-2": _t5gemma2_config()}
    for section, config in configs.items():
        names = _hook_names(config)
        assert _table_names(page, section) == _templates(names), section
    # A few by name, with the block index as the table writes it.
    gemma3 = _table_names(page, "gemma-3")
    assert {"blocks.{i}.attn.hook_pattern", "blocks.{i}.hook_resid_post", "hook_embed"} <= gemma3
    assert "blocks.{i}.moe.hook_expert_indices" in _table_names(page, "gemma-4-mixture-of-experts")
    assert "decoder.blocks.{i}.attn.hook_cross_pattern" in _table_names(page, "t5gemma-2")
    assert "blocks.{i}.altup.hook_corrected" in _table_names(page, "gemma-3n")


def test_family_pages_list_only_the_hooks_their_family_adds(site):
    gemma3 = _templates(_hook_names(_tiny_configs()["gemma-3"]))
    gemma3n = _templates(_hook_names(_tiny_configs()["gemma-3n"]))
    added = _table_names(site.read("architectures/gemma3n"), "hook-points-it-adds")
    assert added == gemma3n - gemma3


# ------------------------------------------------------------------------------ no CDN


def test_no_page_loads_anything_from_the_network(site):
    offenders = []
    for path in site.out.rglob("*"):
        if path.suffix not in (".html", ".js", ".mjs", ".css") or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        where = path.relative_to(site.out)
        offenders += [f"{where}: {host}" for host in CDN_HOSTS if host in text]
        if path.suffix == ".html":
            offenders += [
                f"{where}: {tag[:160]}"
                for tag in (m.group(0) for m in FETCHING_TAG.finditer(text))
                if REMOTE_ATTRIBUTE.search(tag)
            ]
        if path.suffix in (".html", ".css"):
            offenders += [f"{where}: {m.group(0)}" for m in REMOTE_CSS.finditer(text)]
    assert not offenders, "remote resources in the built site:\n" + "\n".join(offenders[:40])
    # MathJax is there, and local.
    page = site.read("architectures/gemma3n")
    src = re.search(r'<script [^>]*src="([^"]*MathJax\.js[^"]*)"', page).group(1)
    assert not re.match(r"(https?:)?//", src)
    assert (site.page("architectures/gemma3n").parent / src.split("?")[0]).is_file()


# ------------------------------------------------------------------------------ browser


def _screenshot_dir() -> pathlib.Path:
    default = pathlib.Path(tempfile.gettempdir()) / "gemmalens-docs-browser-check"
    return pathlib.Path(os.environ.get("GEMMALENS_SCREENSHOT_DIR", default))


def _viewer_pages(site: Site) -> list[str]:
    """Built pages with a viewer's static copy: tutorials first, attention viewers first."""
    pages = []
    for path in sorted(site.out.rglob("*.html")):
        if path.parts[len(site.out.parts)] in ("_sources", "_static"):
            continue
        views = VIEWER_HOST.findall(path.read_text(encoding="utf-8"))
        if views:
            name = path.relative_to(site.out).with_suffix("").as_posix()
            pages.append((not name.startswith("tutorials/"), "attention" not in views, name))
    return [name for *_, name in sorted(pages)]


ATTENTION_STATE = """(() => {
  const root = document.querySelector('.gemmalens-attention');
  return {
    badge: root.querySelector('.gl-badge').className,
    fills: Array.from(root.querySelectorAll('.gl-cell')).map(c => c.getAttribute('fill')).join(),
    cells: root.querySelectorAll('.gl-cell').length,
    tokens: root.querySelectorAll('.gl-token').length,
  };
})()"""
CHOOSE_ANOTHER_LAYER = """(async () => {
  const select = document.querySelector('.gemmalens-attention select[data-control="layer"]');
  const other = Array.from(select.options).reverse().find(o => o.value !== select.value);
  if (!other) return null;  // a viewer of one layer
  select.value = other.value;
  select.dispatchEvent(new Event('change'));
  await new Promise(resolve => setTimeout(resolve, 100));
  return other.textContent;
})()"""


def _check_viewer_page(browser: HeadlessChromium, site: Site, name: str) -> str:
    """Loads a page with viewers: no error, no remote request, every viewer drawn."""
    load = browser.load(site.page(name))
    assert not load.errors, f"{name}: {load.errors}"
    assert not load.remote_requests, f"{name}: {load.remote_requests}"
    hosts = browser.evaluate("document.querySelectorAll('.gemmalens-host').length")
    drawn = browser.evaluate("document.querySelectorAll('[data-gl-drawn=\"true\"]').length")
    assert hosts == len(VIEWER_HOST.findall(site.read(name))) and drawn == hosts, name
    assert browser.evaluate("document.querySelectorAll('.gl-error').length") == 0, name
    return f"{name}: {drawn} viewers drawn, 0 console errors"


def _check_attention_viewer(browser: HeadlessChromium, name: str, out: pathlib.Path):
    """The page's first attention viewer: its heatmap, screenshots, and its layer
    selector (returns the layer chosen, None for a viewer of one layer)."""
    before = browser.evaluate(ATTENTION_STATE)
    cells, tokens = before["cells"], before["tokens"]
    # One cell per (query, key): a multiple of the query tokens shown.
    assert tokens > 2 and cells >= tokens and cells % tokens == 0, (name, cells, tokens)
    stem = name.replace("/", "_")
    browser.screenshot(out / f"{stem}-attention.png", ".gemmalens-attention")
    browser.screenshot(out / f"{stem}-page.png")
    chosen = browser.evaluate(CHOOSE_ANOTHER_LAYER)
    if chosen is not None:
        after = browser.evaluate(ATTENTION_STATE)
        assert after["fills"] != before["fills"], f"{name}: layer {chosen} drew the same cells"
        if "global" in chosen:
            assert "gl-badge-global" in after["badge"], (name, chosen, after["badge"])
        assert not browser.report().errors, f"{name}: {browser.report().errors}"
    return cells, chosen


@pytest.mark.skipif(
    chromium_path() is None, reason="needs Debian's chromium (apt-get install chromium)"
)
def test_pages_work_in_a_browser(site, tmp_path, capsys):
    """Every page with a viewer, every tutorial, and pages with math and figures load in
    headless Chromium without a script error or a remote request; the viewers draw; the
    attention viewer answers its layer selector; screenshots are kept for a human to see."""
    viewer_pages = _viewer_pages(site)
    assert viewer_pages, "no built page has a gemmalens viewer"
    report, switched = [], []
    try:
        with HeadlessChromium(tmp_path / "profile") as browser:
            for name in viewer_pages:
                line = _check_viewer_page(browser, site, name)
                if 'data-gemmalens-view="attention"' in site.read(name):
                    cells, chosen = _check_attention_viewer(browser, name, tmp_path)
                    line += f"; attention heatmap of {cells} cells"
                    if chosen is not None:
                        switched.append(name)
                        line += f", redrawn for layer {chosen}"
                report.append(line)
            assert switched, "no attention viewer with two layers to switch between"
            # Math (MathJax from _static) and the block diagrams.
            browser.load(site.page("architectures/gemma3n"))
            browser.evaluate("new Promise(done => MathJax.Hub.Queue(done))")  # typeset
            load = browser.report()
            assert not load.errors and not load.remote_requests, load
            assert browser.evaluate("document.querySelectorAll('.MathJax').length") > 0
            images = browser.evaluate(
                "Array.from(document.images).map(i => [i.src.split('/').pop(), i.naturalWidth])"
            )
            assert images and all(width > 0 for _, width in images), images
            report.append(f"architectures/gemma3n: math typeset, {len(images)} image(s) shown")
            # Every other tutorial (Treescope renderings carry their own scripts), and a
            # page of each other kind.
            others = [f"tutorials/{nb.stem}" for nb in _notebooks()]
            for name in [n for n in others if n not in viewer_pages] + [
                "index",
                "hooks",
                "api/model",
            ]:
                load = browser.load(site.page(name))
                assert not load.errors and not load.remote_requests, (name, load)
                report.append(f"{name}: 0 console errors")
    finally:  # the screenshots also when a check fails: they show what went wrong
        shots = _screenshot_dir()
        shots.mkdir(parents=True, exist_ok=True)
        for png in tmp_path.glob("*.png"):
            shutil.copy(png, shots / png.name)
    with capsys.disabled():
        print("\n[docs browser check] " + "\n[docs browser check] ".join(report))
        print(f"[docs browser check] screenshots in {shots}")
