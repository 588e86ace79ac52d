"""`FeatureViewer` (gemmalens.widgets.features) on the Gemma 3 teaching model with a random
JumpReLU SAE: its data against values computed independently (the SAE's own ``encode`` of
the residual stream that ``run_with_cache`` captures, numpy's histogram,
`gl.sae.top_activations`, `gl.sae.logit_effects`), the live feature change, the static HTML
copy (also in a headless browser), the figures and the errors."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from matplotlib.figure import Figure

import gemmalens as gl
from gemmalens.widgets import FeatureViewer, ViewerError
from gemmalens.widgets._base import TokenNamer
from tests.headless_chromium import HeadlessChromium, chromium_path

D, WIDTH, LAYER, DEAD = 256, 64, 3, 7
HOOK = f"blocks.{LAYER}.hook_resid_post"
K, WINDOW, TOP_N, LOGIT_K, BINS = 5, 4, 4, 6, 24
TEXTS = [
    "The cat sat on the mat.",
    "Once upon a time there was a king.",
    "Paris is the capital of France.",
    "She went to the market to buy apples.",
    "The dog chased the ball across the park.",
    "A king and a queen lived in a castle.",
    "One, two, three, four.",
]
PROMPT = "The king sat on the mat."


def _sae(rng, d_in=D, hook=HOOK, width=WIDTH):
    # The residual stream here has norm ~450: scale the encoder so that pre-activations
    # are ~1, and spread the thresholds so that features fire on few to many tokens.
    threshold = rng.uniform(0.2, 2.0, size=width).astype(np.float32)
    threshold[DEAD] = 1e9  # never fires
    return gl.sae.SAE(
        w_enc=(rng.normal(size=(d_in, width)) / (np.sqrt(d_in) * 30)).astype(np.float32),
        w_dec=(rng.normal(size=(width, d_in)) / np.sqrt(width)).astype(np.float32),
        b_enc=(rng.normal(size=width) * 0.1).astype(np.float32),
        b_dec=(rng.normal(size=d_in) * 0.1).astype(np.float32),
        threshold=threshold,
        hook_in=hook,
        hook_out=hook,
    )


@pytest.fixture(scope="module")
def m():
    return gl.teaching_model("gemma3")


@pytest.fixture(scope="module")
def sae():
    return _sae(np.random.default_rng(0))


@pytest.fixture(scope="module")
def corpus(m):
    return np.asarray(m.to_tokens(TEXTS)[0])


@pytest.fixture(scope="module")
def encoded(m, sae, corpus):
    """The SAE's activations, independently: its encode of the captured residual stream,
    ``[n, seq, width]``, and which corpus entries are real tokens."""
    _, cache = m.run_with_cache(corpus, names=[HOOK])
    acts = np.asarray(sae.encode(np.asarray(cache[HOOK])))
    return acts, corpus != m.config.pad_token_id


@pytest.fixture(scope="module")
def prompt_encoded(m, sae):
    ids = np.asarray(m.to_tokens(PROMPT)[0])
    _, cache = m.run_with_cache(ids, names=[HOOK])
    return ids, np.asarray(sae.encode(np.asarray(cache[HOOK])))[0]


@pytest.fixture(scope="module")
def viewer(m, sae, corpus):
    return FeatureViewer(
        m, sae, corpus, prompt=PROMPT, k=K, window=WINDOW, top_n=TOP_N, logit_k=LOGIT_K, bins=BINS
    )


@pytest.fixture(scope="module")
def top(m, sae, corpus, viewer):
    return gl.sae.top_activations(
        gl.sae.splice(m, [sae]), sae, viewer.features, corpus, k=K, show_progress=False
    )


# ------------------------------------------------------------------------------ data


def test_features_chosen_by_default(viewer, encoded, prompt_encoded):
    acts, valid = encoded
    _, prompt_acts = prompt_encoded
    counts = ((acts > 0) & valid[..., None]).sum((0, 1))
    assert 0.02 < (acts[valid] > 0).mean() < 0.6, "thresholds should let a fraction fire"
    assert viewer.corpus_size == int(valid.sum())
    assert len(viewer.features) == 32 and viewer.features == sorted(viewer.features)
    assert [f for f, _ in viewer.options["feature"]] == viewer.features
    # Half from the prompt (strongest there), the rest the corpus's most frequent.
    peak = prompt_acts.max(0)
    from_prompt = set(np.argsort(-peak, kind="stable")[:16].tolist())
    assert from_prompt <= set(viewer.features)
    rest = set(viewer.features) - from_prompt
    left_out = set(range(WIDTH)) - set(viewer.features)
    assert min(counts[list(rest)]) >= max(counts[list(left_out)])
    # The feature shown first is the prompt's strongest.
    assert viewer.feature == int(np.argmax(peak))


def test_top_examples_match_top_activations_and_the_encoded_stream(viewer, top, encoded, corpus, m):
    acts, valid = encoded
    namer = TokenNamer(m.tokenizer)
    checked = 0
    for row, feature in enumerate(viewer.features):
        viewer.feature = feature
        column = np.where(valid, acts[..., feature], -np.inf)
        strongest = np.sort(column.ravel())[::-1][:K]
        expected = [
            (s, p, v)
            for s, p, v in zip(top.sequence[row], top.position[row], top.values[row])
            if v > 0
        ]
        assert len(viewer.examples) == len(expected) == int((strongest > 0).sum())
        for example, (s, p, v) in zip(viewer.examples, expected):
            assert (example["sequence"], example["position"]) == (s, p)
            assert example["value"] == pytest.approx(v, rel=1e-5)
            where = [
                q
                for q in range(p - WINDOW, p + WINDOW + 1)
                if 0 <= q < corpus.shape[1] and valid[s, q]
            ]
            assert example["positions"] == where
            assert example["positions"][example["center"]] == p
            assert example["tokens"] == [namer(t) for t in corpus[s, where]]
            # The window's shading is the SAE's encode of the captured residual stream.
            np.testing.assert_allclose(example["acts"], acts[s, where, feature], atol=1e-4)
            checked += 1
        np.testing.assert_allclose(
            [e["value"] for e in viewer.examples], strongest[strongest > 0], rtol=1e-4
        )
    assert checked >= 3 * len(viewer.features)


def test_histogram_and_firing_count_match_numpy(viewer, encoded):
    acts, valid = encoded
    for feature in viewer.features:
        viewer.feature = feature
        values = acts[..., feature][valid & (acts[..., feature] > 0)]
        assert viewer.fired == values.size
        if values.size == 0:
            assert viewer.histogram == {"edges": [], "counts": []}
            continue
        counts, edges = np.histogram(values, bins=BINS)
        assert viewer.histogram["counts"] == counts.tolist()
        np.testing.assert_allclose(viewer.histogram["edges"], edges, rtol=1e-5)
        assert viewer.max_activation == pytest.approx(values.max(), rel=1e-5)


def test_logit_effects_match_the_sae_tool(viewer, m, sae):
    namer = TokenNamer(m.tokenizer)
    for feature in viewer.features[:8]:
        viewer.feature = feature
        effects = np.asarray(gl.sae.logit_effects(m, sae, feature))
        shown = viewer.logit_effects
        top = np.argsort(-effects, kind="stable")[:LOGIT_K]
        bottom = np.argsort(effects, kind="stable")[:LOGIT_K]
        assert shown["top_ids"] == top.tolist() and shown["bottom_ids"] == bottom.tolist()
        np.testing.assert_allclose(shown["top_values"], effects[top], rtol=1e-5)
        np.testing.assert_allclose(shown["bottom_values"], effects[bottom], rtol=1e-5)
        assert shown["top_tokens"] == [namer(t) for t in top]


def test_prompt_view_lists_the_strongest_features_per_token(viewer, prompt_encoded, m):
    ids, acts = prompt_encoded
    namer = TokenNamer(m.tokenizer)
    assert viewer.tokens == [namer(t) for t in ids[0]]
    assert len(viewer.prompt_features) == acts.shape[0]
    for position, row in enumerate(acts):
        order = np.argsort(-row, kind="stable")[:TOP_N]
        order = order[row[order] > 0]
        assert viewer.prompt_features[position] == order.tolist()
        np.testing.assert_allclose(viewer.prompt_values[position], row[order], rtol=1e-4)
        assert viewer.prompt_top(position)[0][0] == order[0]
    viewer.feature = viewer.prompt_features[2][0]
    np.testing.assert_allclose(viewer.prompt_acts, acts[:, viewer.feature], atol=1e-4)


def test_live_widget_computes_a_feature_when_chosen(m, sae, corpus, encoded):
    acts, valid = encoded
    viewer = FeatureViewer(m, sae, corpus, features=np.array([3]), k=K, window=WINDOW)
    assert viewer.features == [3] and viewer.feature == 3 and viewer.tokens == []
    assert [f for f, _ in viewer.options["feature"]] == [3]
    viewer.set_state({"feature": 1})  # what a change in the front end does
    assert viewer.fired == int(((acts[..., 1] > 0) & valid).sum())
    assert [f for f, _ in viewer.options["feature"]] == [1, 3]
    viewer.feature = 20  # not computed yet: computed now, and listed
    assert viewer.features == [1, 3, 20]
    assert [f for f, _ in viewer.options["feature"]] == [1, 3, 20]
    top = gl.sae.top_activations(gl.sae.splice(m, [sae]), sae, [20], corpus, k=K)
    positive = top.values[0] > 0
    np.testing.assert_allclose(
        [e["value"] for e in viewer.examples], top.values[0][positive], rtol=1e-5
    )
    assert viewer.fired == int(((acts[..., 20] > 0) & valid).sum())
    viewer.feature = DEAD  # never fires: no examples, an empty histogram
    assert viewer.examples == [] and viewer.fired == 0 and viewer.max_activation == 0
    assert viewer.histogram == {"edges": [], "counts": []}
    assert viewer.logit_effects["top_ids"] and viewer.features == [1, 3, DEAD, 20]


def test_a_transcoder(m, corpus):
    """A transcoder reads the MLP input (the hook splicing adds) and writes the MLP output."""
    rng = np.random.default_rng(6)
    transcoder = gl.sae.SAE(
        w_enc=(rng.normal(size=(D, 32)) / np.sqrt(D)).astype(np.float32),
        w_dec=(rng.normal(size=(32, D)) / np.sqrt(32)).astype(np.float32),
        b_enc=np.zeros(32, np.float32),
        b_dec=np.zeros(D, np.float32),
        threshold=rng.uniform(0.1, 1.0, size=32).astype(np.float32),
        hook_in="blocks.2.mlp.hook_in",
        hook_out="blocks.2.hook_mlp_out",
    )
    viewer = FeatureViewer(m, transcoder, corpus, features=[2, 0], k=3, window=2)
    assert viewer.title == "transcoder features at blocks.2.mlp"
    _, cache = gl.sae.splice(m, [transcoder]).run_with_cache(corpus, names=["*.mlp.hook_in"])
    acts = np.asarray(transcoder.encode(np.asarray(cache["blocks.2.mlp.hook_in"])))
    valid = corpus != m.config.pad_token_id
    for feature in (0, 2):
        viewer.feature = feature
        column = acts[..., feature]
        assert viewer.fired == int(((column > 0) & valid).sum()) > 0
        strongest = np.sort(np.where(valid, column, -np.inf).ravel())[::-1][:3]
        np.testing.assert_allclose([e["value"] for e in viewer.examples], strongest, rtol=1e-4)
        effects = np.asarray(gl.sae.logit_effects(m, transcoder, feature))
        np.testing.assert_allclose(viewer.logit_effects["top_values"][0], effects.max(), rtol=1e-5)


def test_models_without_logit_effects(m, sae, corpus, monkeypatch):
    """Where `gl.sae.logit_effects` refuses (outside Gemma 3) the viewer says why."""

    def refuse(*args, **kwargs):
        raise NotImplementedError("logit_effects reads a decoder row. On this model, no.")

    monkeypatch.setattr(gl.sae, "logit_effects", refuse)
    viewer = FeatureViewer(m, sae, corpus, prompt=PROMPT, features=[0], k=K)
    assert viewer.logit_effects["top_ids"] == [] and "On this model, no." in viewer.logit_note
    assert viewer.examples and viewer.fired > 0
    axes = _labels(viewer.figure())
    assert axes[("direct logit effect", "token")].get_title() == "Logit effects: not available"


# ------------------------------------------------------------------------------ static copy


def _payload(html: str) -> dict:
    match = re.search(r'<script type="application/json" id="[^"]+">(.*?)</script>', html, re.S)
    return json.loads(match.group(1))


def test_static_html_is_self_contained_and_embeds_every_feature(viewer):
    viewer.feature, viewer.tab = viewer.features[0], "feature"
    html = viewer.to_html()
    assert not re.search(r"<(script|link)[^>]+(src|href)\s*=\s*[\"']?\s*(https?:)?//", html)
    assert "http://" not in html and "https://" not in html
    assert 'data-gemmalens-view="features"' in html and "function drawFeatures(" in html
    payload = _payload(html)
    initial = payload["initial"]
    assert payload["controls"] == ["feature"] and initial["on_demand"] is False
    assert sorted(json.loads(key)[0] for key in payload["states"]) == viewer.features
    assert initial["prompt_features"] == viewer.prompt_features
    assert f"embeds {len(viewer.features)} features" in initial["note"]
    for feature in viewer.features[:6]:
        viewer.feature = feature
        state = payload["states"][json.dumps([feature])]
        assert state["fired"] == viewer.fired
        assert state["histogram"]["counts"] == viewer.histogram["counts"]
        for embedded, live in zip(state["examples"], viewer.examples):
            assert embedded["tokens"] == live["tokens"]
            np.testing.assert_allclose(embedded["acts"], live["acts"], rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(
            state["logit_effects"]["top_values"], viewer.logit_effects["top_values"], rtol=1e-3
        )


@pytest.mark.skipif(chromium_path() is None, reason="needs chromium")
def test_static_copy_opens_a_prompt_feature_on_click(viewer, tmp_path):
    viewer.feature, viewer.tab = viewer.features[0], "prompt"
    page = tmp_path / "features.html"
    page.write_text(f"<!doctype html><meta charset='utf-8'><body>{viewer.to_html()}</body>")
    with HeadlessChromium(tmp_path / "profile") as browser:
        loaded = browser.load(page)
        assert loaded.errors == [] and loaded.remote_requests == []
        chips = browser.evaluate(
            "[...document.querySelectorAll('.gl-fchip')].map(c => "
            "[Number(c.dataset.feature), c.disabled])"
        )
        assert len(chips) == sum(len(row) for row in viewer.prompt_features)
        assert all(disabled == (f not in viewer.features) for f, disabled in chips)
        target = next(f for f, disabled in chips if not disabled and f != viewer.feature)
        browser.evaluate(f"document.querySelector('.gl-fchip[data-feature=\"{target}\"]').click()")
        heading = browser.evaluate(
            "document.querySelector('.gl-main .gl-side-heading').textContent"
        )
        assert heading == f"Feature {target}: top activating examples"
        assert browser.evaluate("document.querySelector('.gl-tab-on').dataset.tab") == "feature"
        viewer.feature = target
        shaded = browser.evaluate(
            "[...document.querySelectorAll('.gl-examples:not(.gl-prompt-row) .gl-ftok')]"
            ".map(t => Number(t.dataset.act))"
        )
        expected = [a for e in viewer.examples for a in e["acts"]]
        np.testing.assert_allclose(shaded, expected, rtol=1e-3, atol=1e-3)
        assert browser.report().errors == []


# ------------------------------------------------------------------------------ figures


def _labels(figure):
    return {
        (ax.get_xlabel(), ax.get_ylabel()): ax
        for ax in figure.axes
        if ax.get_label() != "<colorbar>"
    }


def test_figure_of_the_feature_view(viewer):
    viewer.tab = "feature"
    viewer.feature = viewer.features[0]
    figure = viewer.figure()
    assert isinstance(figure, Figure)
    axes = _labels(figure)
    assert set(axes) == {
        ("token position relative to the strongest token", "top example (activation)"),
        ("activation (nonzero)", "tokens"),
        ("direct logit effect", "token"),
        ("prompt token", "activation"),
    }
    assert all(ax.get_title() for ax in axes.values())
    colorbars = [ax for ax in figure.axes if ax.get_label() == "<colorbar>"]
    assert [c.get_ylabel() for c in colorbars] == ["feature activation"]
    examples = axes[("token position relative to the strongest token", "top example (activation)")]
    texts = {t.get_text() for t in examples.texts}
    assert viewer.examples[0]["tokens"][viewer.examples[0]["center"]][:8] in texts
    assert len(examples.get_yticklabels()) == len(viewer.examples)
    histogram = axes[("activation (nonzero)", "tokens")]
    assert [p.get_height() for p in histogram.patches] == viewer.histogram["counts"]
    prompt = axes[("prompt token", "activation")]
    assert viewer.tokens[1] in [t.get_text() for t in prompt.get_xticklabels()]


def test_figure_of_the_prompt_view_and_without_a_prompt(viewer, m, sae, corpus):
    viewer.tab = "prompt"
    axes = _labels(viewer.figure())
    assert set(axes) == {("rank (1 = strongest feature)", "prompt token")}
    ax = next(iter(axes.values()))
    assert str(viewer.prompt_features[0][0]) in {t.get_text() for t in ax.texts}
    no_prompt = FeatureViewer(m, sae, corpus, features=[0], k=K, window=WINDOW)
    assert len(_labels(no_prompt.figure())) == 3


# ------------------------------------------------------------------------------ errors


def test_errors(m, sae, corpus, viewer):
    with pytest.raises(ViewerError, match=r"feature 64 is out of range; this dictionary has 64"):
        FeatureViewer(m, sae, corpus, features=[3, 64])
    with pytest.raises(ViewerError, match=r"feature must be in \[0, 63\].*got 99"):
        viewer.feature = 99
    with pytest.raises(ViewerError, match="features is empty"):
        FeatureViewer(m, sae, corpus, features=[])
    rng = np.random.default_rng(5)
    narrow = _sae(rng, d_in=128)
    with pytest.raises(ViewerError, match=r"does not fit the model: d_model mismatch.*Pass the"):
        FeatureViewer(m, narrow, corpus)
    deep = _sae(rng, hook="blocks.9.hook_resid_post")
    with pytest.raises(ViewerError, match=r"does not fit the model: Layer out of range"):
        FeatureViewer(m, deep, corpus)
    for empty in ([], np.zeros((0, 5), np.int32), np.zeros((2, 5), np.int32)):
        with pytest.raises(ViewerError, match=r"corpus is empty.*m\.to_tokens\(texts\)\[0\]"):
            FeatureViewer(m, sae, empty)
    no_prompt = FeatureViewer(m, sae, corpus, features=[0], k=K)
    with pytest.raises(ViewerError, match="needs a prompt"):
        no_prompt.tab = "prompt"
    with pytest.raises(ViewerError, match="window must be an int of at least 0"):
        FeatureViewer(m, sae, corpus, window=-1)
    with pytest.raises(ViewerError, match=r"No SAE is spliced at 'blocks\.3\.hook_resid_post'"):
        FeatureViewer(m, HOOK, corpus)
    other = _sae(rng)
    with pytest.raises(ViewerError, match="another dictionary spliced at"):
        FeatureViewer(gl.sae.splice(m, [other]), sae, corpus)
