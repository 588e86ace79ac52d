"""The interactive viewers (gemmalens.widgets) on tiny random models, without a browser:
their data traitlets against values computed independently from the cache, what a control
change recomputes, the static HTML copy, the matplotlib figures and the errors."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from matplotlib.figure import Figure

import gemmalens as gl
from gemmalens import patching
from gemmalens.testing import make_tiny_sentencepiece
from gemmalens.tokenizer import Tokenizer
from gemmalens.widgets import (
    AltUpViewer,
    AttentionViewer,
    LogitLensViewer,
    PatchingViewer,
    RoutingViewer,
)
from gemmalens.widgets._base import TokenNamer
from gemmalens.widgets.attention import visibility

TEXT = "The cat sat on the mat."
WINDOW = 4
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


def _small(config_class, tokenizer, **fields):
    return config_class(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=WINDOW,
        **fields,
    )


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Tokenizer.from_file(make_tiny_sentencepiece(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="module")
def gemma3(tokenizer):
    """6 layers (5 sliding, layer 5 global), every hook captured."""
    config = gl.preset("gemma3_270m").replace(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=6,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=WINDOW,
    )
    model = gl.build(config, seed=0, tokenizer=tokenizer)
    tokens = np.asarray(model.to_tokens(TEXT)[0])
    logits, cache = model.run_with_cache(tokens)
    assert tokens.shape[1] > WINDOW + 2  # long enough for keys outside the window
    return model, tokens, np.asarray(logits), cache


@pytest.fixture(scope="module")
def gemma3n(tokenizer):
    config = _small(
        gl.Gemma3nConfig,
        tokenizer,
        vocab_size_per_layer_input=tokenizer.vocab_size,
        num_hidden_layers=3,
        layer_types=("sliding_attention", "sliding_attention", "full_attention"),
        activation_sparsity_pattern=0.0,
        num_kv_shared_layers=0,
        hidden_size_per_layer_input=8,
        laurel_rank=4,
        altup_active_idx=1,
    )
    model = gl.build(config, seed=1, tokenizer=tokenizer)
    tokens = np.asarray(model.to_tokens(TEXT)[0])
    names = ["blocks.*.altup.hook_predictions", "blocks.*.altup.hook_corrected"]
    return model, tokens, model.run_with_cache(tokens, names=names)[1]


@pytest.fixture(scope="module")
def gemma4_moe(tokenizer):
    config = _small(
        gl.Gemma4Config,
        tokenizer,
        num_hidden_layers=2,
        global_head_dim=32,
        layer_types=("sliding_attention", "full_attention"),
        enable_moe_block=True,
        num_experts=6,
        top_k_experts=2,
        moe_intermediate_size=16,
    )
    model = gl.build(config, seed=2, tokenizer=tokenizer)
    tokens = np.asarray(model.to_tokens(TEXT)[0])
    return model, tokens, model.run_with_cache(tokens, names="blocks.*.moe.*")[1]


def _clean_metric(logits):
    return (logits[:, -1, 7] - logits[:, -1, 9]).mean()


@pytest.fixture(scope="module")
def sweeps(gemma3):
    model, clean, _, _ = gemma3
    corrupted = clean.copy()
    corrupted[0, 2] = (clean[0, 2] + 50) % model.config.vocab_size
    results = {
        site: patching.sweep(model, clean, corrupted, _clean_metric, site=site)
        for site in ("resid_pre", "z")
    }
    baselines = (float(_clean_metric(model(clean))), float(_clean_metric(model(corrupted))))
    return clean, corrupted, results, baselines


@pytest.fixture(scope="module")
def viewers(gemma3, gemma3n, gemma4_moe, sweeps):
    """One viewer of each kind, for the checks they share."""
    _, tokens, _, cache = gemma3
    clean, corrupted, results, (clean_value, corrupted_value) = sweeps
    return {
        "attention": AttentionViewer(cache, tokens),
        "altup": AltUpViewer(gemma3n[2], gemma3n[1]),
        "routing": RoutingViewer(gemma4_moe[2], gemma4_moe[1]),
        "logit-lens": LogitLensViewer(cache, tokens),
        "patching": PatchingViewer(
            results,
            clean,
            corrupted_tokens=corrupted,
            tokenizer=gemma3[0].tokenizer,
            clean_value=clean_value,
            corrupted_value=corrupted_value,
        ),
    }


# ------------------------------------------------------------------------------ attention


def test_attention_viewer_follows_layer_and_head(gemma3):
    model, tokens, _, cache = gemma3
    viewer = AttentionViewer(cache, tokens)
    pattern = lambda i: np.asarray(cache[f"blocks.{i}.attn.hook_pattern"])[0]  # noqa: E731
    assert (viewer.layer, viewer.head) == (0, 0)
    np.testing.assert_allclose(viewer.matrix, pattern(0)[0], rtol=1e-6)
    viewer.layer, viewer.head = 5, 1
    np.testing.assert_allclose(viewer.matrix, pattern(5)[1], rtol=1e-6)
    viewer.head = -1
    np.testing.assert_allclose(viewer.matrix, pattern(5).mean(axis=0), rtol=1e-6)
    viewer.set_state({"layer": 2, "head": 0})  # what a change in the front end does
    np.testing.assert_allclose(viewer.matrix, pattern(2)[0], rtol=1e-6)
    assert viewer.tokens[0] == "<bos>" and len(viewer.tokens) == tokens.shape[1]
    assert viewer.tokens[1] == model.tokenizer.decode([int(tokens[0, 1])])


def test_attention_window_follows_layer_type(gemma3):
    model, tokens, _, cache = gemma3
    viewer = AttentionViewer(cache, tokens)
    for layer, layer_type in enumerate(model.config.layer_types):
        viewer.layer = layer
        sliding = layer_type == "sliding_attention"
        assert viewer.window["type"] == ("sliding" if sliding else "global")
        assert viewer.window["before"] == (WINDOW if sliding else None)
        # What the viewer shades is exactly what the model masked: zero weight there.
        weights = np.asarray(cache[f"blocks.{layer}.attn.hook_pattern"])[0]
        code = visibility(viewer.window, *weights.shape[1:])
        assert (code == 2).any() == sliding
        assert np.all(weights[:, code != 0] == 0)
        assert np.all(weights[:, code == 0] > 0)


def test_attention_selection_and_top_lists(gemma3):
    _, tokens, _, cache = gemma3
    viewer = AttentionViewer(cache, tokens, layer=5, head=0, selected_token=4)
    row = np.asarray(cache["blocks.5.attn.hook_pattern"])[0, 0, 4]
    top = viewer.top_attended(4, k=3)
    assert [pos for pos, _, _ in top] == list(np.argsort(-row, kind="stable")[:3])
    assert top[0][2] == pytest.approx(row.max())
    column = np.asarray(cache["blocks.5.attn.hook_pattern"])[0, 0, :, 2]
    assert viewer.top_attending(2, k=1)[0][0] == int(np.argmax(column))
    with pytest.raises(ValueError, match=r"selected_token must be in \[-1, "):
        viewer.selected_token = 99


def test_attention_from_model_matches_a_full_cache(gemma3):
    model, tokens, _, cache = gemma3
    viewer = AttentionViewer.from_model(model, TEXT, layer=3, head=1)
    np.testing.assert_allclose(
        viewer.matrix, np.asarray(cache["blocks.3.attn.hook_pattern"])[0, 1], atol=1e-6
    )


def test_attention_viewer_shows_only_the_layers_asked_for(gemma3):
    _, tokens, _, cache = gemma3
    everything = AttentionViewer(cache, tokens)
    chosen = AttentionViewer(cache, tokens, layers=[2, 5])
    assert [value for value, _ in chosen.options["layer"]] == [2, 5] and chosen.layer == 2
    np.testing.assert_allclose(
        chosen.matrix, np.asarray(cache["blocks.2.attn.hook_pattern"])[0, 0], rtol=1e-6
    )
    # The static copy embeds one state per (layer, head): 2 layers instead of 6.
    assert len(chosen.static_payload()["states"]) * 3 == len(everything.static_payload()["states"])
    with pytest.raises(ValueError, match=r"layers=\[7\] are not in the cache"):
        AttentionViewer(cache, tokens, layers=[2, 7])


def test_attention_errors(gemma3):
    model, tokens, _, cache = gemma3
    viewer = AttentionViewer(cache, tokens)
    with pytest.raises(ValueError, match=r"layer must be in \[0, 5\], got 9"):
        viewer.layer = 9
    with pytest.raises(ValueError, match=r"head must be in \[-1, 1\]"):
        viewer.head = 2
    assert viewer.layer == 0  # a rejected value leaves the viewer as it was
    partial = gl.ActivationCache(
        {n: cache[n] for n in ("blocks.1.attn.hook_pattern", "blocks.3.attn.hook_pattern")}, model
    )
    some = AttentionViewer(partial, tokens)
    assert some.layer == 1
    with pytest.raises(ValueError, match=r"Layer 2's attention pattern is not in the cache"):
        some.layer = 2
    residual_only = gl.ActivationCache({"hook_embed": cache["hook_embed"]}, model)
    with pytest.raises(KeyError, match=r"names=\['blocks\.\*\.attn\.hook_pattern'\]"):
        AttentionViewer(residual_only, tokens)
    with pytest.raises(ValueError, match="tokens has 3 positions"):
        AttentionViewer(cache, tokens[:, :3])


# ------------------------------------------------------------------------------ AltUp


def test_altup_viewer_norms_follow_layer_and_stream(gemma3n):
    model, tokens, cache = gemma3n
    viewer = AltUpViewer(cache, tokens)
    assert viewer.active_stream == model.config.altup_active_idx == viewer.stream == 1

    def expected(layer, stream):
        predicted = np.asarray(cache[f"blocks.{layer}.altup.hook_predictions"])[0, :, stream]
        corrected = np.asarray(cache[f"blocks.{layer}.altup.hook_corrected"])[0, :, stream]
        return {
            "prediction": np.linalg.norm(predicted, axis=-1),
            "correction": np.linalg.norm(corrected, axis=-1),
            "difference": np.linalg.norm(corrected - predicted, axis=-1),
        }

    for name, values in expected(0, 1).items():
        np.testing.assert_allclose(viewer.stream_norms[name], values, rtol=1e-5)
    viewer.layer, viewer.stream = 2, 3
    for name, values in expected(2, 3).items():
        np.testing.assert_allclose(viewer.stream_norms[name], values, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(viewer.norms[name])[3], values, rtol=1e-5)
    relative = expected(2, 0)["difference"] / expected(2, 0)["prediction"]
    np.testing.assert_allclose(viewer.overview[2][0], relative.mean(), rtol=1e-5)
    assert np.asarray(viewer.norms["difference"]).shape == (4, tokens.shape[1])


def test_altup_errors(gemma3, gemma3n):
    model, tokens, cache = gemma3n
    viewer = AltUpViewer(cache, tokens)
    with pytest.raises(ValueError, match=r"stream must be in \[0, 3\], got 4"):
        viewer.stream = 4
    with pytest.raises(ValueError, match="measure must be one of"):
        viewer.measure = "size"
    with pytest.raises(KeyError, match=r"Gemma 3n only.*blocks\.\*\.altup\.hook_predictions"):
        AltUpViewer(gemma3[3], gemma3[1])


# ------------------------------------------------------------------------------ routing


def test_routing_viewer_follows_layer(gemma4_moe):
    model, tokens, cache = gemma4_moe
    viewer = RoutingViewer(cache, tokens)
    for layer in (0, 1):
        viewer.layer = layer
        weights = np.asarray(cache[f"blocks.{layer}.moe.hook_expert_weights"])[0]
        logits = np.asarray(cache[f"blocks.{layer}.moe.hook_router_logits"], np.float64)[0]
        indices = np.asarray(cache[f"blocks.{layer}.moe.hook_expert_indices"])[0]
        probabilities = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        np.testing.assert_allclose(viewer.weights, weights, rtol=1e-6)
        np.testing.assert_allclose(viewer.probabilities, probabilities, rtol=1e-5)
        assert viewer.chosen == indices.tolist()
        assert viewer.load == [int((indices == e).sum()) for e in range(6)]
        assert sum(viewer.load) == tokens.shape[1] * 2
        np.testing.assert_allclose(viewer.load_weight, weights.sum(0), rtol=1e-5)
        # The experts a token chose are its most probable ones, in the hook's order.
        top = viewer.top_experts(3)
        assert [e["expert"] for e in top] == indices[3].tolist()
        assert all(e["chosen"] and e["weight"] > 0 for e in top)
    assert np.asarray(viewer.weights).shape == (tokens.shape[1], 6)


def test_routing_errors(gemma3, gemma4_moe):
    viewer = RoutingViewer(gemma4_moe[2], gemma4_moe[1])
    with pytest.raises(ValueError, match=r"layer must be in \[0, 1\], got 2"):
        viewer.layer = 2
    with pytest.raises(KeyError, match=r"MoE models only.*blocks\.\*\.moe\.hook_router_logits"):
        RoutingViewer(gemma3[3], gemma3[1])


# ------------------------------------------------------------------------------ logit lens


def test_logit_lens_viewer_against_the_cache(gemma3):
    model, tokens, logits, cache = gemma3
    viewer = LogitLensViewer(cache, tokens, k=3)
    layers, positions = model.config.num_hidden_layers + 1, tokens.shape[1]
    assert viewer.row_labels == ["embed"] + [str(i) for i in range(layers - 1)]
    assert np.asarray(viewer.top_probs).shape == (layers, positions, 3)
    lens = cache.logit_lens(top_k=3)
    np.testing.assert_allclose(
        viewer.top_probs, np.exp(np.asarray(lens.top_logprobs[:, 0])), rtol=1e-4
    )
    # The last row is the model's own prediction.
    final = logits[0]
    top_ids = np.argsort(-final, axis=-1, kind="stable")[:, :3]
    namer = TokenNamer(model.tokenizer)
    assert viewer.top_tokens[-1] == [[namer(t) for t in row] for row in top_ids]
    probabilities = np.exp(final - final.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    expected_next = probabilities[np.arange(positions - 1), tokens[0, 1:]]
    np.testing.assert_allclose(viewer.next_probs[-1][:-1], expected_next, rtol=1e-4)
    assert viewer.next_probs[-1][-1] is None and viewer.next_tokens[-1] == ""
    ranks = (probabilities[np.arange(positions - 1)] > expected_next[:, None]).sum(-1)
    assert viewer.next_ranks[-1][:-1] == ranks.tolist()
    viewer.k = 1
    assert np.asarray(viewer.top_probs).shape == (layers, positions, 1)
    assert viewer.top_k(layers - 1, 0, k=2)[0][1] == pytest.approx(viewer.top_probs[-1][0][0])


def test_logit_lens_errors(gemma3):
    model, tokens, _, cache = gemma3
    viewer = LogitLensViewer(cache, tokens)
    with pytest.raises(ValueError, match=r"k must be in \[1, 10\], got 11"):
        viewer.k = 11
    patterns_only = gl.ActivationCache({"blocks.0.attn.hook_pattern": cache["pattern", 0]}, model)
    with pytest.raises(KeyError, match=r"names=\['hook_embed', 'blocks\.\*\.hook_resid_post'\]"):
        LogitLensViewer(patterns_only, tokens)
    with pytest.raises(ValueError, match="needs the model's weights"):
        LogitLensViewer(gl.ActivationCache(dict(cache)), tokens)
    labels_only = LogitLensViewer(cache, [f"t{i}" for i in range(tokens.shape[1])])
    with pytest.raises(ValueError, match="pass token ids for 'next'"):
        labels_only.color_by = "next"


# ------------------------------------------------------------------------------ patching


def test_patching_viewer_follows_site_and_show(sweeps):
    clean, corrupted, results, (clean_value, corrupted_value) = sweeps
    viewer = PatchingViewer(
        results,
        clean,
        corrupted_tokens=corrupted,
        clean_value=clean_value,
        corrupted_value=corrupted_value,
    )
    resid = np.asarray(results["resid_pre"])
    assert (viewer.site, viewer.show, viewer.unit) == ("resid_pre", "restored", "pos")
    gap = clean_value - corrupted_value
    np.testing.assert_allclose(viewer.matrix, (resid - corrupted_value) / gap, rtol=1e-6)
    assert viewer.limit == pytest.approx(np.abs((resid - corrupted_value) / gap).max())
    assert len(viewer.col_labels) == clean.shape[1] and "/" in viewer.col_labels[2]
    viewer.show = "metric"
    np.testing.assert_allclose(viewer.matrix, resid, rtol=1e-6)
    viewer.site = "z"
    np.testing.assert_allclose(viewer.matrix, np.asarray(results["z"]), rtol=1e-6)
    assert viewer.unit == "head" and viewer.col_labels == ["H0", "H1"]
    # Patching layer 0 at the changed position restores the clean run.
    viewer.site, viewer.show = "resid_pre", "restored"
    assert viewer.matrix[0][2] == pytest.approx(1.0, abs=1e-3)


def test_patching_errors(sweeps):
    clean, _, results, _ = sweeps
    viewer = PatchingViewer(results, clean)
    assert viewer.options["show"] == [["metric", "metric of the patched run"]]
    with pytest.raises(ValueError, match="pass clean_value / corrupted_value"):
        viewer.show = "restored"
    with pytest.raises(ValueError, match=r"site must be one of \['resid_pre', 'z'\]"):
        viewer.site = "mlp_out"
    with pytest.raises(ValueError, match=r"\[layer, unit\]"):
        PatchingViewer({"resid_pre": np.zeros((2, 3, 4))})


def test_patching_from_model(gemma3):
    model, tokens, _, _ = gemma3
    corrupted = tokens.copy()
    corrupted[0, 3] = (tokens[0, 3] + 7) % model.config.vocab_size
    viewer = PatchingViewer.from_model(model, tokens, corrupted, _clean_metric, sites=["z"])
    expected = patching.sweep(model, tokens, corrupted, _clean_metric, site="z")
    assert viewer.site == "z" and viewer.show == "restored"
    clean = float(_clean_metric(model(tokens)))
    corrupt = float(_clean_metric(model(corrupted)))
    np.testing.assert_allclose(viewer.baselines["clean"], clean, rtol=1e-6)
    viewer.show = "metric"
    np.testing.assert_allclose(viewer.matrix, np.asarray(expected), rtol=1e-5)
    viewer.show = "change"
    np.testing.assert_allclose(viewer.matrix, np.asarray(expected) - corrupt, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------ shared


def _payload(html: str) -> dict:
    match = re.search(r'<script type="application/json" id="[^"]+">(.*?)</script>', html, re.S)
    return json.loads(match.group(1))


@pytest.mark.parametrize("name", ["attention", "altup", "routing", "logit-lens", "patching"])
def test_static_html_embeds_every_state_and_the_render_code(viewers, name):
    viewer = viewers[name]
    html = viewer.to_html()
    assert "http://" not in html and "https://" not in html
    assert "function render(" in html and "renderStatic(document.getElementById(" in html
    assert f'data-gemmalens-view="{name}"' in html and viewer.css_class == f"gemmalens-{name}"
    assert html.count("<script") == 2 and "<style>" in html
    payload = _payload(html)
    assert payload["initial"]["view"] == name
    expected_states = 1
    for control in payload["controls"]:
        expected_states *= len(viewer.options[control])
    assert len(payload["states"]) == expected_states
    # Each embedded state holds the data Python computes for those control values.
    for key, state in payload["states"].items():
        controls = dict(zip(payload["controls"], json.loads(key)))
        computed = viewer._static_state({**viewer._controls(), **controls})
        for trait, value in computed.items():
            if isinstance(value, np.ndarray) and value.dtype.kind == "f":
                expected = np.nan_to_num(np.asarray(value, np.float64), nan=-1)
                embedded = np.asarray(
                    json.loads(json.dumps(state[trait]).replace("null", "-1")), np.float64
                )
                np.testing.assert_allclose(embedded, expected, atol=1e-3 * np.abs(expected).max())


@pytest.mark.parametrize("name", ["attention", "altup", "routing", "logit-lens", "patching"])
def test_mimebundle_has_the_widget_and_its_static_copy(viewers, name):
    data, _ = viewers[name]._repr_mimebundle_()
    assert data[WIDGET_MIME]["model_id"] == viewers[name].model_id
    assert _payload(data["text/html"])["initial"]["view"] == name


def test_static_copy_caps_its_size(gemma3):
    _, tokens, _, cache = gemma3
    viewer = AttentionViewer(cache, tokens, layer=3)
    per_state = tokens.shape[1] ** 2
    payload = _payload(viewer.to_html(max_values=4 * per_state))
    assert 1 <= len(payload["states"]) <= 4
    assert "[3,0]" in payload["states"]  # the state shown now is always kept
    assert "Static copy" in payload["initial"]["note"]
    assert len(payload["initial"]["options"]["layer"]) < len(viewer.options["layer"])


@pytest.mark.parametrize(
    "name, xlabel, ylabel",
    [
        ("attention", "key (attended to)", "query (attending)"),
        ("altup", "position (token)", "norm"),
        ("routing", "expert", "tokens"),
        ("logit-lens", "position (input token)", "after layer"),
        ("patching", "position (token)", "layer"),
    ],
)
def test_figures(viewers, name, xlabel, ylabel):
    viewer = viewers[name]
    figure = viewer.figure()
    assert isinstance(figure, Figure)
    axes = [ax for ax in figure.axes if ax.get_label() != "<colorbar>"]
    assert any(ax.get_xlabel() == xlabel and ax.get_ylabel() == ylabel for ax in axes)
    assert all(ax.get_title() for ax in axes)
    assert len(figure.axes) > len(axes)  # a colour bar
    ticks = [t.get_text() for ax in axes for t in ax.get_xticklabels() + ax.get_yticklabels()]
    assert viewer.tokens[1] in ticks


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs a headless chromium")
def test_static_copies_draw_in_a_browser(viewers, tmp_path):
    page = tmp_path / "viewers.html"
    body = "\n".join(v.to_html() for v in viewers.values())
    page.write_text(f"<!doctype html><meta charset='utf-8'><body>{body}</body>")
    dom = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--virtual-time-budget=3000", "--dump-dom",
         page.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    for name in viewers:
        assert f'class="gemmalens-view gemmalens-{name}" data-gl-drawn="true"' in dom, name
    assert '<pre class="gl-error">' not in dom
    cells = dom.count('class="gl-cell"')
    positions = len(viewers["attention"].tokens)
    assert cells >= positions**2  # the attention heatmap alone
