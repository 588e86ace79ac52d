"""`AudioAttentionViewer` on a tiny random Gemma 3n with its audio tower (built from
gemmalens configs, no transformers): the values it draws against values computed
independently from the captured hooks, the time each soft token stands for, the static
HTML copy, the figures and the errors.

Three clips, one run of ``N`` placeholders each: a 1 s chirp (7 soft tokens of audio, so
the run ends in 3 padding tokens), a 0.5 s tone (4 soft tokens), and the chirp again with
its log-mel frames from soft token ``PERTURBED`` on replaced by noise (the time test).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from matplotlib.figure import Figure

import gemmalens as gl
from gemmalens.audio import gemma3n_audio_features
from gemmalens.audio.gemma3n import Gemma3nAudioConfig, Gemma3nAudioTowerConfig
from gemmalens.audio.merge import Gemma3nVisionEmbedderConfig, real_soft_tokens
from gemmalens.cache import ActivationCache
from gemmalens.widgets import AudioAttentionViewer, ViewerError
from gemmalens.widgets.audio_attention import AudioLayout

VOCAB = 128
AUDIO = VOCAB - 15  # the placeholder: an audio hard token id, as in the released layout
BOS = 2
N = 10  # audio_soft_tokens_per_image (188 in Gemma 3n)
SAMPLING_RATE = 16_000
FRAMES_PER_TOKEN = 16  # 2 stride-2 convolutions, then every 4th frame
HOP = 0.01
PERTURBED = 3  # the first soft token whose frames the third clip changes
SLIDING, FULL = "sliding_attention", "full_attention"


def tiny_gemma3n_with_audio(soft_tokens_per_clip: int = N) -> gl.Gemma3nConfig:
    """Two text layers of width 32, a two-block conformer of width 16 (two heads, chunks
    of 4 frames seeing 4 back) over the feature extractor's 128 mel bins."""
    text = gl.preset("gemma3n_e2b").replace(
        vocab_size=VOCAB,
        vocab_size_per_layer_input=VOCAB,
        hidden_size=32,
        intermediate_size=(48, 48),
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=32,
        layer_types=(SLIDING, FULL),
        activation_sparsity_pattern=(0.0, 0.0),
        num_kv_shared_layers=0,
        hidden_size_per_layer_input=8,
        laurel_rank=4,
    )
    audio = Gemma3nAudioConfig(
        vocab_size=16,
        vocab_offset=VOCAB - 16,
        input_feat_size=128,
        hidden_size=16,
        conf_attention_chunk_size=4,
        conf_attention_context_left=5,
        conf_attention_context_right=0,
        conf_num_attention_heads=2,
        conf_num_hidden_layers=2,
        sscp_conv_channel_size=(8, 4),
    )
    return text.replace(
        audio=Gemma3nAudioTowerConfig(audio, text_hidden_size=32),
        vision_embedder=Gemma3nVisionEmbedderConfig(
            text_hidden_size=32, hidden_size=16, vocab_size=16, vocab_offset=VOCAB - 32
        ),
        audio_token_id=AUDIO,
        image_token_id=VOCAB - 31,
        audio_soft_tokens_per_image=soft_tokens_per_clip,
    )


def _waveforms() -> list[np.ndarray]:
    t = np.arange(SAMPLING_RATE) / SAMPLING_RATE
    chirp = 0.4 * np.sin(2 * np.pi * (200 * t + 1500 * t**2))
    tone = 0.3 * np.sin(2 * np.pi * 660 * t[: SAMPLING_RATE // 2])
    return [chirp.astype(np.float32), tone.astype(np.float32), chirp.astype(np.float32)]


def _tokens() -> np.ndarray:
    """Row 0: the chirp and the tone; row 1: the perturbed chirp."""
    row0 = [BOS, 5, *[AUDIO] * N, 6, *[AUDIO] * N, 7, 8]
    row1 = [BOS, 9, *[AUDIO] * N, 10, 11]
    row1 += list(range(20, 20 + len(row0) - len(row1)))
    return np.array([row0, row1])


@pytest.fixture(scope="module")
def run():
    waves = _waveforms()
    features = gemma3n_audio_features(waves)
    perturbed = features.features.copy()
    start = PERTURBED * FRAMES_PER_TOKEN
    perturbed[2, start:] = np.random.default_rng(0).normal(size=perturbed[2, start:].shape)
    features = type(features)(perturbed, features.mask)
    model = gl.build(tiny_gemma3n_with_audio(), seed=0)
    wanted = lambda name: name.endswith("attn.hook_pattern") or name == "audio.hook_soft_tokens"  # noqa: E731
    _, cache = model.run_with_cache(_tokens(), names=wanted, input_features=features)
    return model, features, waves, cache


@pytest.fixture(scope="module")
def text_viewer(run):
    _, features, waves, cache = run
    return AudioAttentionViewer(cache, _tokens(), features, waveforms=waves)


@pytest.fixture(scope="module")
def encoder_viewer(run):
    _, features, waves, cache = run
    return AudioAttentionViewer(cache, _tokens(), features, source="encoder", waveforms=waves)


def _runs(tokens: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(row, positions) of each run of placeholders, row-major."""
    out = []
    for row, ids in enumerate(tokens):
        positions = np.flatnonzero(ids == AUDIO)
        for run in np.split(positions, np.flatnonzero(np.diff(positions) > 1) + 1):
            out.append((row, run))
    return out


def _dense(chunked: np.ndarray, frames: int, chunk: int, past: int) -> np.ndarray:
    """``[..., chunk, chunk_pos, context]`` -> ``[..., q, k]`` by the layout's definition:
    query ``u * chunk + w`` reads key ``u * chunk - past + c`` at context index ``c``."""
    dense = np.zeros((*chunked.shape[:-3], frames, frames), np.float32)
    for u in range(chunked.shape[-3]):
        for w in range(chunk):
            for c in range(chunked.shape[-1]):
                q, k = u * chunk + w, u * chunk - past + c
                if q < frames and 0 <= k < frames:
                    dense[..., q, k] = chunked[..., u, w, c]
    return dense


# ----------------------------------------------------------------------------- values


def test_text_source_draws_the_captured_pattern(run, text_viewer):
    _, _, _, cache = run
    viewer, tokens = text_viewer, _tokens()
    runs = _runs(tokens)
    assert viewer.options["clip"] == [[0, "clip 0"], [1, "clip 1"]]  # row 0's clips
    for layer in (0, 1):
        pattern = np.asarray(cache[f"blocks.{layer}.attn.hook_pattern"])[0]
        for head in (-1, 0, 3):
            for clip in (0, 1):
                viewer.clip, viewer.layer, viewer.head = clip, layer, head
                _, positions = runs[clip]
                chosen = pattern.mean(0) if head == -1 else pattern[head]
                expected = chosen[:, positions]
                np.testing.assert_allclose(np.array(viewer.heat), expected, atol=1e-6)
                np.testing.assert_allclose(viewer.share, expected.sum(1), atol=1e-6)
                assert viewer.audio_positions == positions.tolist()
    viewer.clip, viewer.layer, viewer.head = 0, 0, -1


def test_encoder_source_draws_the_captured_pattern(run, encoder_viewer):
    _, features, _, cache = run
    viewer = encoder_viewer
    layout = AudioLayout.from_config(run[0].config)
    frames = (features.features.shape[1] - 1) // 4 + 1
    real = [25, 13, 25]  # encoder frames of real audio: every 4th of 97, 50, 97 log-mel frames
    for layer in (0, 1):
        chunked = np.asarray(cache[f"audio.blocks.{layer}.attn.hook_pattern"])
        dense = _dense(chunked, frames, layout.chunk_size, layout.max_past)
        for head in (-1, 1):
            for clip in (0, 1, 2):
                viewer.clip, viewer.layer, viewer.head = clip, layer, head
                chosen = dense[clip].mean(0) if head == -1 else dense[clip, head]
                expected = chosen[: real[clip], : real[clip]]
                np.testing.assert_allclose(np.array(viewer.heat), expected, atol=1e-6)
                # Every real frame's attention sums to 1 over real frames within its window
                # of past frames.
                np.testing.assert_allclose(expected.sum(1), 1.0, atol=1e-5)
                assert not np.triu(expected, 1).any()
                assert not np.tril(expected, -(layout.max_past + 1)).any()
    viewer.clip, viewer.layer, viewer.head = 0, 0, -1


def test_soft_tokens_line_up_with_their_time(run, text_viewer):
    """A soft token stands for 16 log-mel frames (160 ms). Token j is encoder frame 4 j,
    which reads log-mel frames 16 j .. 16 j + 6 and what came before (the tower looks
    back only), so frames changed from the start of token P's stretch on change tokens P
    and later, not P - 1: the viewer's stretch holding that start must be P's (one token
    off either way and the check fails)."""
    _, features, _, cache = run
    viewer = text_viewer
    assert viewer.real_tokens == 7 and len(viewer.heat[0]) == N  # the run's tail is padding
    times = viewer.token_times(0)
    np.testing.assert_allclose(times[:, 0], np.arange(7) * FRAMES_PER_TOKEN * HOP)
    np.testing.assert_allclose(times[:, 1] - times[:, 0], FRAMES_PER_TOKEN * HOP)
    np.testing.assert_allclose(np.array(viewer.times), times)
    soft = np.asarray(cache["audio.hook_soft_tokens"])
    changed = np.abs(soft[2] - soft[0]).max(-1) > 1e-6
    first = int(np.argmax(changed))
    assert changed[first:7].all() and not changed[:first].any()
    perturbed_at = PERTURBED * FRAMES_PER_TOKEN * HOP
    assert times[first, 0] <= perturbed_at < times[first, 1]
    # The shorter clip: its real tokens and the padding after them, as the model counts.
    assert viewer.token_times(1).shape == (4, 2)
    assert real_soft_tokens(features.mask, run[0].config.audio.audio) == [7, 4, 7]
    viewer.clip = 1
    assert viewer.real_tokens == 4 and viewer.duration == pytest.approx(0.5)
    viewer.clip = 0
    encoder_times = AudioLayout.from_config(run[0].config)
    assert encoder_times.frames_per_token == FRAMES_PER_TOKEN


# ----------------------------------------------------------------------------- outputs


def _payload(html: str) -> dict:
    match = re.search(r'<script type="application/json" id="[^"]+">(.*?)</script>', html, re.S)
    return json.loads(match.group(1))


@pytest.mark.parametrize("name", ["text_viewer", "encoder_viewer"])
def test_static_html(request, name):
    viewer = request.getfixturevalue(name)
    html = viewer.to_html()
    assert "http://" not in html and "https://" not in html and "//cdn" not in html
    assert html.count("<script") == 2 and 'data-gemmalens-view="audio-attention"' in html
    assert "data:image/png;base64," in html
    payload = _payload(html)
    clips = 2 if viewer.source == "text" else 3
    assert len(payload["states"]) == 2 * (len(viewer.options["head"])) * clips
    for key, state in payload["states"].items():
        controls = dict(zip(payload["controls"], json.loads(key)))
        heat = viewer._compute({**viewer._controls(), **controls})["heat"]
        np.testing.assert_allclose(state["heat"], heat, atol=1e-3 * np.abs(heat).max())
    data, _ = viewer._repr_mimebundle_()
    assert data["application/vnd.jupyter.widget-view+json"]["model_id"] == viewer.model_id


@pytest.mark.parametrize("name", ["text_viewer", "encoder_viewer"])
def test_figures(request, name):
    viewer = request.getfixturevalue(name)
    figure = viewer.figure()
    assert isinstance(figure, Figure)
    axes = [ax for ax in figure.axes if ax.get_label() != "<colorbar>"]
    assert all(ax.get_title() for ax in axes)
    assert axes[0].get_ylabel() == "amplitude" and axes[1].get_ylabel() == "mel bin"
    assert any(ax.get_xlabel().endswith("time (s)") for ax in axes)
    bars = axes[2].patches
    assert len(bars) == (7 if viewer.source == "text" else 25)
    if viewer.source == "text":
        # The bar of soft token j starts at 0.16 j s and is as high as its attention.
        query = len(viewer.tokens) - 1
        expected = viewer.text_attention()[query][:7]
        np.testing.assert_allclose([b.get_x() for b in bars], np.arange(7) * 0.16, atol=1e-9)
        np.testing.assert_allclose([b.get_height() for b in bars], expected, atol=1e-6)


needs_chromium = pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium")


@needs_chromium
def test_static_copies_draw_in_a_browser(text_viewer, encoder_viewer, tmp_path):
    page = tmp_path / "audio.html"
    body = text_viewer.to_html() + encoder_viewer.to_html()
    page.write_text(f"<!doctype html><meta charset='utf-8'><body>{body}</body>")
    dom = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--virtual-time-budget=3000", "--dump-dom",
         page.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    assert dom.count('class="gemmalens-view gemmalens-audio-attention" data-gl-drawn="true"') == 2
    assert '<pre class="gl-error">' not in dom
    # 7 bars (text), 25 bars and the 25 x 25 heatmap (encoder).
    assert dom.count('class="gl-cell"') == 7 + 25 + 25 * 25


# ----------------------------------------------------------------------------- errors


def test_clear_errors(run, text_viewer):
    model, features, _, cache = run
    tokens = _tokens()
    with pytest.raises(ViewerError, match=r"layer must be in \[0, 1\], got 5"):
        text_viewer.layer = 5
    with pytest.raises(ViewerError, match=r"selected_token must be in \[-1, 24\], got 25"):
        text_viewer.selected_token = len(text_viewer.tokens)
    with pytest.raises(ViewerError, match="clip must be"):
        text_viewer.clip = 2  # the third clip is in batch row 1
    with pytest.raises(ViewerError, match="layer"):
        AudioAttentionViewer(cache, tokens, features, layer=-1)
    with pytest.raises(ViewerError, match="layer .audio tower block. must be"):
        AudioAttentionViewer(cache, tokens, features, source="encoder", layer=2)
    with pytest.raises(ViewerError, match="head must be"):
        AudioAttentionViewer(cache, tokens, features, head=4)
    with pytest.raises(ValueError, match="2 clips given for 3 runs"):
        AudioAttentionViewer(cache, tokens, features.features[:2])
    with pytest.raises(ValueError, match="source must be one of"):
        AudioAttentionViewer(cache, tokens, features, source="vision")
    no_patterns = {k: v for k, v in cache.items() if not k.startswith("audio.blocks")}
    with pytest.raises(KeyError, match="encoder source needs 'audio.blocks.{i}.attn.hook_pattern'"):
        AudioAttentionViewer(
            ActivationCache(no_patterns, model), tokens, features, source="encoder"
        )
    text_only = {k: v for k, v in cache.items() if not k.startswith("audio.")}
    with pytest.raises(KeyError, match="no audio tower hook points"):
        AudioAttentionViewer(ActivationCache(text_only, model), tokens, features)
    # A model without an audio tower.
    without = gl.build(tiny_gemma3n_with_audio().replace(audio=None, vision_embedder=None))
    with pytest.raises(ValueError, match="no audio tower.*audio=True"):
        AudioAttentionViewer(ActivationCache(dict(cache), without), tokens, features)
    with pytest.raises(TypeError, match="ActivationCache"):
        AudioAttentionViewer([1, 2], tokens, features)
