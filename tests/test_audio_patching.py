"""Patching between two audio clips (Gemma 3n with its audio tower): `patching.sweep` and
`patching.attribution_patching` with ``input_features`` / ``corrupted_input_features``,
each score checked against hooked runs of the model itself.

The model is random and built from gemmalens configs (no checkpoint): the tower's and the
merge's parity with transformers is tests/test_gemma3n_audio_model.py's; this file checks
the patching algebra with audio side inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemmalens as gl
from gemmalens import patching
from gemmalens.audio import gemma3n_audio_features
from gemmalens.audio.gemma3n import Gemma3nAudioConfig, Gemma3nAudioTowerConfig
from gemmalens.audio.merge import Gemma3nVisionEmbedderConfig
from gemmalens.families.gemma3n import Gemma3nConfig
from gemmalens.patching import _Media
from tests import hf_reference as ref

N = 6  # audio_soft_tokens_per_image
BOS, BOA, EOA, AUDIO = 2, 255, 384, 385
TEXT = {**ref.TINY_GEMMA3N_TWO_LAYERS, "activation_sparsity_pattern": [0.0, 0.0]}
AUDIO_CONFIG = ref.TINY_GEMMA3N_AUDIO


@pytest.fixture(scope="module")
def setup():
    text = Gemma3nConfig.from_hf(TEXT)
    config = text.replace(
        audio=Gemma3nAudioTowerConfig(Gemma3nAudioConfig.from_hf(AUDIO_CONFIG), text.hidden_size),
        vision_embedder=Gemma3nVisionEmbedderConfig(
            hidden_size=16, vocab_size=128, vocab_offset=256, text_hidden_size=text.hidden_size
        ),
        audio_token_id=AUDIO,
        audio_soft_tokens_per_image=N,
    )
    m = gl.build(config, seed=1)
    t = np.arange(8_000) / 16_000  # 0.5 s: 5 soft tokens of real audio, 1 of padding
    chirp = 0.4 * np.sin(2 * np.pi * (300 * t + 2000 * t**2))
    tone = 0.3 * np.sin(2 * np.pi * 440 * t)
    tokens = np.array([[BOS, 10, 11, BOA, *[AUDIO] * N, EOA, 12, 13, 14]])
    return m, tokens, gemma3n_audio_features([chirp]), gemma3n_audio_features([tone])


def _metric(logits):
    return logits[:, -1, 7].mean() - logits[:, -1, 9].mean()


def test_sweep_between_two_clips(setup):
    """Same tokens, another clip: each score equals patching that one site with
    run_with_hooks, and sites before the clip's tokens change nothing."""
    m, tokens, clip, other = setup
    scores = np.asarray(
        patching.sweep(
            m, tokens, tokens, _metric, input_features=clip, corrupted_input_features=other
        )
    )
    layers, positions = scores.shape
    assert (layers, positions) == (2, tokens.shape[1])
    baseline = float(_metric(m(tokens, input_features=other)))
    assert abs(float(_metric(m(tokens, input_features=clip))) - baseline) > 1e-4
    names = [f"blocks.{i}.hook_resid_pre" for i in range(layers)]
    _, clean_cache = m.run_with_cache(tokens, names=names, input_features=clip)
    first_audio = int(np.flatnonzero(tokens[0] == AUDIO)[0])
    for layer, checked in [(0, [first_audio]), (1, [first_audio + 2, positions - 1])]:
        clean = jnp.asarray(clean_cache[names[layer]])

        @jax.jit  # one compiled hooked run per layer, the position a traced argument
        def patched(position, name=names[layer], clean=clean):
            def patch(value, _):
                return value.at[:, position].set(clean[:, position])

            return _metric(m.run_with_hooks(tokens, {name: patch}, input_features=other))

        for position in checked:
            np.testing.assert_allclose(
                scores[layer, position], float(patched(position)), rtol=1e-4, atol=1e-5
            )
    # Gemma 3n is causal around audio: before the first audio token the runs agree.
    np.testing.assert_allclose(scores[:, :first_audio], baseline, rtol=1e-5, atol=1e-6)
    assert np.abs(scores[:, first_audio:] - baseline).max() > 1e-5


def test_attribution_between_two_clips(setup):
    """Each attribution score is (clean - corrupted) . d metric / d resid_pre at that
    site, the gradient taken independently through run_with_hooks."""
    m, tokens, clip, other = setup
    attribution = np.asarray(
        patching.attribution_patching(
            m, tokens, tokens, _metric, input_features=clip, corrupted_input_features=other
        )
    )
    names = [f"blocks.{i}.hook_resid_pre" for i in range(2)]
    _, clean_cache = m.run_with_cache(tokens, names=names, input_features=clip)
    _, corrupted_cache = m.run_with_cache(tokens, names=names, input_features=other)
    first_audio = int(np.flatnonzero(tokens[0] == AUDIO)[0])
    for layer, name in enumerate(names):
        corrupted = jnp.asarray(corrupted_cache[name])

        def metric_at(delta, name=name):
            logits = m.run_with_hooks(
                tokens, {name: lambda value, _: value + delta}, input_features=other
            )
            return _metric(logits)

        grad = np.asarray(jax.grad(metric_at)(jnp.zeros_like(corrupted)))
        delta = np.asarray(clean_cache[name]) - np.asarray(corrupted)
        expected = (delta * grad).sum(axis=(0, 2))
        np.testing.assert_allclose(attribution[layer], expected, rtol=1e-4, atol=1e-6)
    assert np.all(attribution[:, :first_audio] == 0)
    assert np.abs(attribution[:, first_audio:]).max() > 0


def test_media_pairing_and_errors(setup):
    """The corrupted run inherits what it does not give, except a mask of clips it
    replaces; a corrupted clip without a clean one, and inputs that belong elsewhere, are
    refused with the keyword to use."""
    clean, corrupted = _Media.of(
        input_features="a", inputs={"input_features_mask": "mask a", "token_type_ids": "types"}
    ).streams()
    assert (
        clean
        == corrupted
        == {"input_features": "a", "input_features_mask": "mask a", "token_type_ids": "types"}
    )
    _, corrupted = _Media.of(
        input_features="a",
        corrupted_input_features="b",
        inputs={"input_features_mask": "mask a", "token_type_ids": "types"},
    ).streams()
    assert corrupted == {"input_features": "b", "token_type_ids": "types"}
    _, corrupted = _Media.of(
        pixel_values="x", inputs={"image_position_ids": "p"}, corrupted_pixel_values="y"
    ).streams()
    assert corrupted == {"pixel_values": "y"}

    m, tokens, clip, other = setup
    with pytest.raises(TypeError, match="corrupted_input_features needs input_features=..."):
        patching.sweep(m, tokens, tokens, _metric, corrupted_input_features=other)
    with pytest.raises(TypeError, match="pass it as input_features=... instead"):
        patching.sweep(m, tokens, tokens, _metric, inputs={"input_features": clip})
    with pytest.raises(ValueError, match="audio tokens"):  # the model's own check
        patching.sweep(m, tokens, tokens, _metric)


def test_path_patching_between_two_clips(setup):
    """Same tokens, another clip: path patching from every text head (to the logits, and
    to the last layer's values) equals the runs made with hooks."""
    from tests.test_analyses_every_family import path_patching_beside_hooked_runs

    m, tokens, clip, other = setup
    clips = {"input_features": clip, "corrupted_input_features": other}
    direct, through, comparisons = path_patching_beside_hooked_runs(
        m,
        tokens,
        tokens,
        _metric,
        {"blocks.1.attn.hook_v": None},
        [(0, 0), (0, 1)],
        clean_run={"input_features": clip},
        held_run={"input_features": other},
        **clips,
    )
    for _, _, score, expected in comparisons:
        np.testing.assert_allclose(score, expected, rtol=1e-4, atol=1e-5)
    assert np.ptp(direct) > 1e-5 and np.ptp(through[0]) > 1e-6
