"""The interactive viewers (gemmalens.widgets) on tiny random models, without a browser:
their data traitlets against values computed independently from the cache, what a control
change recomputes, the static HTML copy, the matplotlib figures and the errors."""

from __future__ import annotations

import dataclasses
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
    FeatureViewer,
    LogitLensViewer,
    PatchingViewer,
    RoutingViewer,
)
from gemmalens.widgets._base import TokenNamer, ViewerError
from gemmalens.widgets.attention import visibility

TEXT = "The cat sat on the mat."
DECODER_TEXT = "A mat sat on the cat, then it sat."
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


@pytest.fixture(scope="module")
def t5gemma2(tokenizer):
    """Encoder of 3 layers (window WINDOW), decoder of 2 (window 3): the stacks differ in
    depth; every attention pattern captured."""
    config = gl.preset("t5gemma2_270m_270m")

    def shrink(stack, layer_types, window):
        return stack.replace(
            vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
            num_hidden_layers=len(layer_types), layer_types=layer_types, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=window,
        )  # fmt: skip

    config = dataclasses.replace(
        config,
        encoder=shrink(config.encoder, ("sliding_attention", "sliding_attention", "full_attention"), WINDOW),
        decoder=shrink(config.decoder, ("sliding_attention", "full_attention"), 3),
    )  # fmt: skip
    model = gl.build(config, seed=3, tokenizer=tokenizer)
    tokens = np.asarray(model.to_tokens(TEXT)[0])
    decoder_tokens = np.asarray(model.to_tokens(DECODER_TEXT)[0])
    _, cache = model.run_with_cache(tokens, decoder_tokens=decoder_tokens, names="*pattern")
    assert decoder_tokens.shape[1] > 3 + 2 and tokens.shape[1] != decoder_tokens.shape[1]
    return model, tokens, decoder_tokens, cache


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
def features(gemma3):
    """A FeatureViewer of a random JumpReLU SAE (width 16) on layer 2's residual stream."""
    model = gemma3[0]
    rng = np.random.default_rng(4)
    hook, d = "blocks.2.hook_resid_post", model.config.hidden_size
    sae = gl.sae.SAE(
        w_enc=(rng.normal(size=(d, 16)) / np.sqrt(d)).astype(np.float32),
        w_dec=(rng.normal(size=(16, d)) / 4).astype(np.float32),
        b_enc=np.zeros(16, np.float32),
        b_dec=np.zeros(d, np.float32),
        threshold=np.full(16, 0.05, np.float32),
        hook_in=hook,
        hook_out=hook,
    )
    corpus = np.asarray(model.to_tokens([TEXT, DECODER_TEXT])[0])
    return FeatureViewer(model, sae, corpus, prompt=TEXT, max_features=6, k=4, window=3)


@pytest.fixture(scope="module")
def viewers(gemma3, gemma3n, gemma4_moe, sweeps, features):
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
        "features": features,
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


# ------------------------------------------------------------------------------ T5Gemma 2


def _cached(cache, hook):
    return np.asarray(cache[hook])[0]


def test_encoder_decoder_parts_against_the_cache(t5gemma2):
    model, tokens, decoder_tokens, cache = t5gemma2
    viewer = AttentionViewer(cache, tokens, decoder_tokens=decoder_tokens)
    assert [value for value, _ in viewer.options["part"]] == ["encoder", "self", "cross", "merged"]
    assert (viewer.part, viewer.layer, viewer.head) == ("encoder", 0, 0)
    namer = TokenNamer(model.tokenizer)
    encoder_labels = [namer(t) for t in tokens[0]]
    decoder_labels = [namer(t) for t in decoder_tokens[0]]
    assert viewer.tokens == viewer.key_tokens == encoder_labels
    np.testing.assert_allclose(
        viewer.matrix, _cached(cache, "encoder.blocks.0.attn.hook_pattern")[0], rtol=1e-6
    )
    viewer.part, viewer.layer, viewer.head = "cross", 1, 1
    cross = _cached(cache, "decoder.blocks.1.attn.hook_cross_pattern")
    np.testing.assert_allclose(viewer.matrix, cross[1], rtol=1e-6)
    assert viewer.tokens == decoder_labels and viewer.key_tokens == encoder_labels
    viewer.part = "self"
    own = _cached(cache, "decoder.blocks.1.attn.hook_self_pattern")
    np.testing.assert_allclose(viewer.matrix, own[1], rtol=1e-6)
    assert viewer.key_tokens == decoder_labels
    # One softmax: each part alone sums to less than one per row, the two to one.
    np.testing.assert_allclose(own.sum(-1) + cross.sum(-1), 1.0, rtol=1e-5)
    assert (np.asarray(viewer.matrix).sum(-1) < 1 - 1e-3).any()
    viewer.part, viewer.head = "merged", -1
    merged = _cached(cache, "decoder.blocks.1.attn.hook_pattern")
    np.testing.assert_allclose(viewer.matrix, merged.mean(axis=0), rtol=1e-6)
    assert viewer.key_tokens == decoder_labels + encoder_labels
    assert viewer.pattern(0, 1, part="cross").shape == (len(decoder_labels), len(encoder_labels))
    viewer.set_state({"part": "cross"})  # what a change in the front end does
    np.testing.assert_allclose(viewer.matrix, cross.mean(axis=0), rtol=1e-6)


def test_encoder_decoder_windows_per_part(t5gemma2):
    model, tokens, decoder_tokens, cache = t5gemma2
    viewer = AttentionViewer(cache, tokens, decoder_tokens=decoder_tokens)
    cases = [  # (part, layer, hook, sliding)
        ("encoder", 0, "encoder.blocks.0.attn.hook_pattern", True),
        ("encoder", 2, "encoder.blocks.2.attn.hook_pattern", False),
        ("self", 0, "decoder.blocks.0.attn.hook_self_pattern", True),
        ("self", 1, "decoder.blocks.1.attn.hook_self_pattern", False),
        ("cross", 0, "decoder.blocks.0.attn.hook_cross_pattern", False),
        ("merged", 0, "decoder.blocks.0.attn.hook_pattern", True),
    ]
    for part, layer, hook, sliding in cases:
        viewer.part, viewer.layer = part, layer
        assert (viewer.window["type"] == "sliding") == sliding, (part, layer)
        # What the viewer shades is exactly what the model masked: zero weight there.
        weights = _cached(cache, hook)
        code = visibility(viewer.window, *weights.shape[1:])
        assert (code == 2).any() == sliding, (part, layer)
        assert np.all(weights[:, code != 0] == 0) and np.all(weights[:, code == 0] > 0)
    viewer.part, viewer.layer = "encoder", 0  # bidirectional: later keys in the window
    assert viewer.window["causal"] is False and viewer.window["after"] is not None
    viewer.part = "cross"  # every encoder key of every decoder query, whatever the layer
    assert viewer.window["self_keys"] == 0 and "every encoder token" in viewer.window["label"]
    viewer.part = "merged"  # the self part's window on the decoder's keys only
    assert viewer.window["before"] == 3 and viewer.window["self_keys"] == decoder_tokens.shape[1]


def test_encoder_decoder_part_change_keeps_a_valid_layer_and_selection(t5gemma2):
    _, tokens, decoder_tokens, cache = t5gemma2
    viewer = AttentionViewer(cache, tokens, decoder_tokens=decoder_tokens, layer=2)
    viewer.part = "cross"  # the decoder has layers 0 and 1: the nearest is shown
    assert viewer.layer == 1 and [v for v, _ in viewer.options["layer"]] == [0, 1]
    np.testing.assert_allclose(
        viewer.matrix, _cached(cache, "decoder.blocks.1.attn.hook_cross_pattern")[0], rtol=1e-6
    )
    with pytest.raises(ViewerError, match=r"layer must be in \[0, 1\], got 2"):
        viewer.layer = 2
    assert decoder_tokens.shape[1] > tokens.shape[1]
    viewer.selected_token = decoder_tokens.shape[1] - 1  # a decoder token past the encoder's
    viewer.part = "encoder"
    assert viewer.selected_token == -1 and viewer.layer == 1


def test_encoder_decoder_from_model(t5gemma2):
    model, tokens, decoder_tokens, cache = t5gemma2
    viewer = AttentionViewer.from_model(
        model, TEXT, decoder_tokens=DECODER_TEXT, part="cross", layer=1, head=1
    )
    assert len(viewer.options["part"]) == 4
    np.testing.assert_allclose(
        viewer.matrix, _cached(cache, "decoder.blocks.1.attn.hook_cross_pattern")[1], atol=1e-6
    )
    assert viewer.key_tokens[0] == "<bos>" and len(viewer.key_tokens) == tokens.shape[1]
    some = AttentionViewer.from_model(model, tokens, decoder_tokens=decoder_tokens, layers=[2])
    assert some.part == "encoder" and "part" not in some.options  # the decoder has no layer 2
    # A layer of no stack is named, even beside valid ones (it used to be dropped silently).
    with pytest.raises(ViewerError, match=r"layers=\[9\] are not layers of this model: it has"):
        AttentionViewer.from_model(model, tokens, decoder_tokens=decoder_tokens, layers=[1, 9])
    with pytest.raises(ViewerError, match=r"pass decoder_tokens= .*decoder start token"):
        AttentionViewer.from_model(model, TEXT)


def test_encoder_decoder_errors(gemma3, t5gemma2):
    model, tokens, decoder_tokens, cache = t5gemma2
    _, gemma_tokens, _, gemma_cache = gemma3
    with pytest.raises(ViewerError, match=r"part='cross' .*decoder-only model.*EncoderDecoder"):
        AttentionViewer(gemma_cache, gemma_tokens, part="cross")
    with pytest.raises(ViewerError, match="decoder_tokens is for encoder-decoder models"):
        AttentionViewer.from_model(gemma3[0], TEXT, decoder_tokens=TEXT)
    no_cross = gl.ActivationCache({k: v for k, v in cache.items() if "cross" not in k}, model)
    with pytest.raises(
        ViewerError, match=r"names=\['decoder\.blocks\.\*\.attn\.hook_cross_pattern'\]"
    ):
        AttentionViewer(no_cross, tokens, decoder_tokens=decoder_tokens, part="cross")
    viewer = AttentionViewer(no_cross, tokens, decoder_tokens=decoder_tokens)
    with pytest.raises(ViewerError, match=r"part='cross' \(decoder cross part\) is not in"):
        viewer.part = "cross"
    with pytest.raises(ViewerError, match=r"part must be one of \['encoder', 'self', 'cross'"):
        viewer.part = "decoder"
    assert viewer.part == "encoder"  # a rejected value leaves the viewer as it was
    residual_only = gl.ActivationCache({}, model)
    with pytest.raises(KeyError, match=r"'decoder\.blocks\.\*\.attn\.hook_cross_pattern'"):
        AttentionViewer(residual_only, tokens)


def test_encoder_prefix_as_before(t5gemma2):
    """The older form: prefix="encoder." and a cache of the encoder's patterns alone."""
    model, tokens, _, cache = t5gemma2
    encoder_only = gl.ActivationCache({k: v for k, v in cache.items() if "encoder" in k}, model)
    viewer = AttentionViewer(encoder_only, tokens, prefix="encoder.", head=-1)
    assert viewer.part == "encoder" and "part" not in viewer.options
    np.testing.assert_allclose(
        viewer.matrix, _cached(cache, "encoder.blocks.0.attn.hook_pattern").mean(0), rtol=1e-6
    )
    assert list(viewer.static_payload()["states"])[0] == "[0,-1]"


def test_encoder_decoder_static_copy_and_figure(t5gemma2):
    _, tokens, decoder_tokens, cache = t5gemma2
    viewer = AttentionViewer(cache, tokens, decoder_tokens=decoder_tokens, part="cross")
    payload = _payload(viewer.to_html())
    assert payload["controls"] == ["part", "layer", "head"]
    assert len(payload["states"]) == 4 * 3 * 3  # parts x layers of either stack x heads
    # Decoder layer 2 does not exist: the cross part's state for it shows layer 1.
    state = payload["states"]['["cross",2,0]']
    assert state["layer"] == 1 and [v for v, _ in state["options"]["layer"]] == [0, 1]
    expected = _cached(cache, "decoder.blocks.1.attn.hook_cross_pattern")[0]
    np.testing.assert_allclose(state["matrix"], expected, atol=1e-3 * expected.max())
    assert state["key_tokens"] == viewer.key_tokens and len(state["tokens"]) != len(tokens[0])
    figure = viewer.figure()
    ax = figure.axes[0]
    assert ax.get_xlabel() == "key: encoder token (attended to)"
    assert ax.get_title().startswith("Decoder cross part: layer 0, head 0")
    assert viewer.key_tokens[2] in [t.get_text() for t in ax.get_xticklabels()]
    viewer.part, viewer.selected_token = "merged", 2
    assert "every encoder token" in viewer.figure().axes[0].get_title()


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
    # From a model of another family: refused before it runs (an encoder-decoder would
    # otherwise ask for the decoder tokens the viewer never passes on).
    for other in (gemma3[0], gl.teaching_model("t5gemma2")):
        with pytest.raises(ValueError, match="AltUpViewer shows Gemma 3n's AltUp streams"):
            AltUpViewer.from_model(other, gemma3[1])


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
    for other in (gemma3[0], gl.teaching_model("t5gemma2")):
        with pytest.raises(ValueError, match="RoutingViewer shows a mixture-of-experts"):
            RoutingViewer.from_model(other, gemma3[1])


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


@pytest.mark.parametrize(
    "name", ["attention", "altup", "routing", "logit-lens", "patching", "features"]
)
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


@pytest.mark.parametrize(
    "name", ["attention", "altup", "routing", "logit-lens", "patching", "features"]
)
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
        ("features", "prompt token", "activation"),
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


def _browser_dom(body: str, tmp_path) -> str:
    """The DOM headless Chromium makes of a page with ``body``, once its scripts ran."""
    page = tmp_path / "viewers.html"
    page.write_text(f"<!doctype html><meta charset='utf-8'><body>{body}</body>")
    return subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--virtual-time-budget=3000", "--dump-dom",
         f"--user-data-dir={tmp_path / 'profile'}", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip


needs_chromium = pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium")


@needs_chromium
def test_static_copies_draw_in_a_browser(viewers, tmp_path):
    dom = _browser_dom("\n".join(v.to_html() for v in viewers.values()), tmp_path)
    for name in viewers:
        assert f'class="gemmalens-view gemmalens-{name}" data-gl-drawn="true"' in dom, name
    assert '<pre class="gl-error">' not in dom
    cells = dom.count('class="gl-cell"')
    positions = len(viewers["attention"].tokens)
    assert cells >= positions**2  # the attention heatmap alone


@needs_chromium
def test_encoder_decoder_static_copy_switches_part_in_a_browser(t5gemma2, tmp_path):
    _, tokens, decoder_tokens, cache = t5gemma2
    viewer = AttentionViewer(cache, tokens, decoder_tokens=decoder_tokens, part="merged")
    # Pick the cross part in the page's selector, as a reader would.
    pick_cross = (
        "<script>setTimeout(() => { const s = document.querySelector('[data-control=part]');"
        " s.value = JSON.stringify('cross'); s.dispatchEvent(new Event('change')); }, 500);"
        "</script>"
    )
    merged = _browser_dom(viewer.to_html(), tmp_path)
    assert 'class="gl-part-edge"' in merged and '<pre class="gl-error">' not in merged
    assert merged.count('class="gl-cell"') == len(viewer.tokens) * len(viewer.key_tokens)
    cross = _browser_dom(viewer.to_html() + pick_cross, tmp_path)
    assert '<pre class="gl-error">' not in cross and "key: encoder token" in cross
    cells = cross.count('class="gl-cell"')
    assert (
        cells == decoder_tokens.shape[1] * tokens.shape[1] and 'class="gl-part-edge"' not in cross
    )
