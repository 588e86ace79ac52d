"""Analyses with images on a tiny Gemma 3 with a SigLIP tower (random weights, built
directly), one model for the module: `ImageAttentionViewer` draws the cache's own numbers,
and patching sweeps between two images equal hooked runs one site at a time."""

from __future__ import annotations

import numpy as np
import pytest

import gemmalens as gl
from gemmalens import patching
from gemmalens.vision import expand_gemma3_image_ids
from gemmalens.vision.siglip import Gemma3ProjectorConfig, Gemma3VisionConfig, SiglipVisionConfig
from gemmalens.widgets import ImageAttentionViewer, ViewerError
from gemmalens.widgets.image_attention import MEAN_HEAD, display_image
from tests import hf_reference as ref
from tests.test_analyses_every_family import path_patching_beside_hooked_runs
from tests.test_widgets import _browser_dom, needs_chromium

BOI, EOI, IMAGE = 255, 256, 257
SOFT_TOKENS = 4  # a 2 x 2 grid of soft tokens over a 4 x 4 grid of patches


@pytest.fixture(scope="module")
def setup():
    vision = Gemma3VisionConfig(
        vision=SiglipVisionConfig(**ref.TINY_SIGLIP),
        projector=Gemma3ProjectorConfig(mm_tokens_per_image=SOFT_TOKENS, text_hidden_size=64),
    )
    config = gl.Gemma3Config(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=8,
        layer_types=("sliding_attention", "full_attention"),
        vision=vision,
        image_token_id=IMAGE,
    )
    m = gl.build(config, seed=1)
    rows = [
        expand_gemma3_image_ids([2, 10, BOI, 11, 12, BOI, 13, 14], 2, BOI, EOI, IMAGE, SOFT_TOKENS),
        expand_gemma3_image_ids([2, 20, 21, BOI, 22, 23, 24, 25, 26], 1, BOI, EOI, IMAGE, 4),
    ]
    width = max(map(len, rows))
    tokens = np.array([row + [0] * (width - len(row)) for row in rows])
    pixels = np.random.RandomState(0).uniform(-1, 1, (3, 3, 32, 32)).astype(np.float32)
    names = ["blocks.*.attn.hook_pattern", "vision.blocks.*.attn.hook_pattern"]
    _, cache = m.run_with_cache(tokens, names=names, pixel_values=pixels)
    return m, tokens, pixels, cache


def test_text_source_draws_the_patterns_over_each_image(setup):
    m, tokens, pixels, cache = setup
    viewer = ImageAttentionViewer(cache, tokens, pixels)
    assert viewer.source == "text" and (viewer.rows, viewer.cols) == (2, 2)
    runs = [(0, start) for start in np.flatnonzero(np.diff(np.r_[0, tokens[0] == IMAGE]) == 1)]
    assert viewer.options["image"] == [[0, "image 0"], [1, "image 1"]]
    for image, (_, start) in enumerate(runs):
        for layer in (0, 1):
            pattern = np.asarray(cache[f"blocks.{layer}.attn.hook_pattern"])[0]
            for head in (MEAN_HEAD, 2):
                viewer.layer, viewer.head, viewer.image = layer, head, image
                chosen = pattern.mean(axis=0) if head == MEAN_HEAD else pattern[head]
                expected = chosen[:, start : start + SOFT_TOKENS]
                np.testing.assert_allclose(viewer.heat, expected, rtol=1e-6, atol=1e-7)
                np.testing.assert_allclose(viewer.share, expected.sum(axis=1), rtol=1e-5)
                assert viewer.image_positions == list(range(start, start + SOFT_TOKENS))
                grid = viewer.image_attention()
                assert grid.shape == (tokens.shape[1], 2, 2)
                np.testing.assert_allclose(grid[-1, 1, 0], expected[-1, 2], rtol=1e-6)
    # Tokens before the image cannot see it (causal): their share is exactly zero.
    viewer.image = 1
    assert np.all(np.asarray(viewer.share)[: runs[1][1]] == 0)
    assert np.asarray(viewer.share)[-1] > 0


def test_the_second_row_shows_its_own_image(setup):
    m, tokens, pixels, cache = setup
    viewer = ImageAttentionViewer(cache, tokens, pixels, batch=1, layer=1, head=0)
    assert viewer.image == 2 and viewer.options["image"] == [[2, "image 2"]]
    start = int(np.flatnonzero(tokens[1] == IMAGE)[0])
    pattern = np.asarray(cache["blocks.1.attn.hook_pattern"])[1, 0]
    np.testing.assert_allclose(viewer.heat, pattern[:, start : start + 4], rtol=1e-6, atol=1e-7)
    with pytest.raises(ViewerError, match=r"image must be 2 \(the only choice here\), got 0"):
        viewer.image = 0


def test_vision_source_draws_one_patch_row(setup):
    m, tokens, pixels, cache = setup
    viewer = ImageAttentionViewer(cache, tokens, pixels, source="vision", image=1, patch=5)
    assert (viewer.rows, viewer.cols) == (4, 4) and viewer.options["layer"] == [[0, "0"], [1, "1"]]
    pattern = np.asarray(cache["vision.blocks.0.attn.hook_pattern"])
    np.testing.assert_allclose(viewer.heat, pattern[1].mean(axis=0)[5], rtol=1e-6)
    viewer.layer, viewer.head, viewer.patch = 1, 3, 11
    pattern = np.asarray(cache["vision.blocks.1.attn.hook_pattern"])
    np.testing.assert_allclose(viewer.heat, pattern[1, 3, 11], rtol=1e-6)
    np.testing.assert_allclose(np.sum(viewer.heat), 1.0, rtol=1e-5)  # bidirectional softmax
    with pytest.raises(ViewerError, match=r"patch must be in \[0, 15\]"):
        viewer.patch = 16


def test_the_image_shown_is_the_one_the_model_saw(setup):
    _, _, pixels, _ = setup
    rgb = display_image(pixels[1])
    expected = np.clip((pixels[1].transpose(1, 2, 0) + 1) * 127.5, 0, 255).round()
    np.testing.assert_array_equal(rgb, expected.astype(np.uint8))
    big = display_image(np.zeros((600, 300, 3), np.uint8))
    assert big.shape == (256, 128, 3)


def test_errors_name_the_fix(setup):
    m, tokens, pixels, cache = setup
    with pytest.raises(ValueError, match="3 images given for 2 image placeholder runs"):
        ImageAttentionViewer(cache, tokens[:1], pixels)
    with pytest.raises(ValueError, match="hold no image placeholder"):
        ImageAttentionViewer(cache, np.full_like(tokens, 5), pixels)
    text_only = {k: v for k, v in cache.items() if not k.startswith("vision.")}
    with pytest.raises(KeyError, match="capture them with"):
        ImageAttentionViewer(text_only, tokens, pixels, source="vision", image_token_id=IMAGE)
    with pytest.raises(KeyError, match=r"blocks\.\{i\}\.attn\.hook_pattern"):
        ImageAttentionViewer({"blocks.0.hook_resid_post": 0}, tokens, pixels, image_token_id=IMAGE)
    with pytest.raises(ValueError, match="Pass image_token_id"):
        ImageAttentionViewer(dict(cache.items()), tokens, pixels)
    viewer = ImageAttentionViewer(cache, tokens, pixels)
    with pytest.raises(
        ViewerError, match=r"head must be in \[-1, 3\], got 4. \(-1: mean over heads\)"
    ):
        viewer.head = 4
    with pytest.raises(ViewerError, match="source must be one of"):
        ImageAttentionViewer(cache, tokens, pixels, source="audio")


def test_static_copy_figure_and_browser(setup, tmp_path):
    m, tokens, pixels, cache = setup
    text = ImageAttentionViewer(cache, tokens, pixels, selected_token=tokens.shape[1] - 1)
    vision = ImageAttentionViewer(cache, tokens, pixels, source="vision")
    html = text.to_html()
    assert 'data-gemmalens-view="image-attention"' in html and "data:image/png;base64," in html
    payload = text.static_payload()
    assert payload["controls"] == ["layer", "head", "image"]
    assert len(payload["states"]) == 2 * 5 * 2  # layers x (mean + heads) x images
    assert len(vision.static_payload()["states"]) == 2 * 5 * 3 * 16
    for viewer in (text, vision):
        figure = viewer.figure()
        assert figure.axes[0].get_title().startswith("Layer 0")
        assert len(figure.axes) == 2  # the image with its overlay, and a colour bar
    if needs_chromium.args[0]:
        pytest.skip("the browser check needs chromium")
    dom = _browser_dom(html + vision.to_html(), tmp_path)
    assert dom.count('class="gemmalens-view gemmalens-image-attention" data-gl-drawn="true"') == 2
    assert '<pre class="gl-error">' not in dom
    assert dom.count('class="gl-cell"') == 4 + 16 and 'class="gl-token gl-image-chip"' in dom
    assert "[image: 4 tokens]" in dom and 'class="gl-query-cell"' in dom


def _last_logit_metric(logits):
    return logits[:, -1, 7].mean() - logits[:, -1, 9].mean()


def test_patching_between_two_images(setup):
    """Same tokens, another image: a resid_pre sweep equals patching each site alone with
    run_with_hooks, and sites before the images change nothing."""
    m, tokens, pixels, _ = setup
    corrupted_pixels = pixels[::-1].copy()
    scores = np.asarray(
        patching.sweep(
            m,
            tokens,
            tokens,
            _last_logit_metric,
            pixel_values=pixels,
            corrupted_pixel_values=corrupted_pixels,
        )
    )
    layers, positions = scores.shape
    assert (layers, positions) == (2, tokens.shape[1])
    clean_logits = np.asarray(m(tokens, pixel_values=pixels))
    corrupted_logits = np.asarray(m(tokens, pixel_values=corrupted_pixels))
    baseline = float(_last_logit_metric(corrupted_logits))
    assert abs(float(_last_logit_metric(clean_logits)) - baseline) > 1e-4  # the images matter
    names = [f"blocks.{i}.hook_resid_pre" for i in range(layers)]
    _, clean_cache = m.run_with_cache(tokens, names=names, pixel_values=pixels)
    first_image = int(np.flatnonzero((tokens == IMAGE).any(axis=0))[0])
    for layer, position in [(0, first_image), (1, first_image + 1), (1, positions - 1)]:
        clean = np.asarray(clean_cache[names[layer]])

        def patch(value, name, clean=clean, position=position):
            return value.at[:, position].set(clean[:, position])

        hooked = m.run_with_hooks(tokens, {names[layer]: patch}, pixel_values=corrupted_pixels)
        expected = float(_last_logit_metric(np.asarray(hooked)))
        np.testing.assert_allclose(scores[layer, position], expected, rtol=1e-4, atol=1e-5)
    # Before any image token the two runs are the same: patching there is the baseline.
    np.testing.assert_allclose(scores[:, : first_image - 1], baseline, rtol=1e-5, atol=1e-6)
    # The metric reads the last position: patching its input to the last layer moves it.
    assert abs(scores[1, -1] - baseline) > 1e-5

    attribution = np.asarray(
        patching.attribution_patching(
            m,
            tokens,
            tokens,
            _last_logit_metric,
            pixel_values=pixels,
            corrupted_pixel_values=corrupted_pixels,
        )
    )
    assert attribution.shape == scores.shape
    assert np.all(attribution[:, : first_image - 1] == 0) and np.abs(attribution).max() > 0
    with pytest.raises(TypeError, match="needs pixel_values=... for the clean run"):
        patching.sweep(m, tokens, tokens, _last_logit_metric, corrupted_pixel_values=pixels)


def test_path_patching_between_two_images(setup):
    """Same tokens, another image: path patching from every text head (to the logits, and
    to the last layer's values) equals the runs made here with hooks, the tower's own
    heads left to run (they precede every text head, so holding them would change
    nothing)."""
    m, tokens, pixels, _ = setup
    corrupted_pixels = pixels[::-1].copy()
    images = {"pixel_values": pixels, "corrupted_pixel_values": corrupted_pixels}
    # (Not its queries: the last position's query sees, through layer 0's window, only the
    # image both runs share, so no head reaches it.)
    receivers = {"blocks.1.attn.hook_v": None}
    direct, through, comparisons = path_patching_beside_hooked_runs(
        m,
        tokens,
        tokens,
        _last_logit_metric,
        receivers,
        [(0, 1), (0, 3)],
        clean_run={"pixel_values": pixels},
        held_run={"pixel_values": corrupted_pixels},
        **images,
    )
    for _, _, score, expected in comparisons:
        np.testing.assert_allclose(score, expected, rtol=1e-4, atol=1e-5)
    baseline = float(_last_logit_metric(m(tokens, pixel_values=corrupted_pixels)))
    np.testing.assert_allclose(through[1], baseline, rtol=1e-5, atol=1e-6)  # no later values
    assert np.ptp(direct) > 1e-5 and np.ptp(through[0]) > 1e-6
