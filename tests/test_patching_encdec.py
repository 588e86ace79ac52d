"""Activation and attribution patching on an encoder-decoder model (the T5Gemma 2 teaching
model): encoder sites, decoder sites and cross-attention heads, with the encoder input or
the decoder input corrupted."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import gemmalens as gl
from gemmalens import patching

ENC, DEC = 6, 4
# The position where a corrupted input differs, and the seed of the random inputs: chosen so
# that every kind of site below moves the metric on the shipped teaching model (each test
# checks it does). On random tokens the model's last prediction often ignores one changed
# token, and then a sweep is flat and its comparison with the loop says little.
CHANGED = 3
SEED = 1


@pytest.fixture(scope="module")
def setup():
    m = gl.teaching_model("t5gemma2")
    rng = np.random.RandomState(SEED)
    encoder = rng.randint(3, 4000, (2, ENC))
    corrupted_encoder = encoder.copy()
    corrupted_encoder[:, CHANGED] = (encoder[:, CHANGED] + 777) % 3990 + 3
    start = np.full((2, 1), m.config.decoder_start_token_id)
    decoder = np.concatenate([start, rng.randint(3, 4000, (2, DEC - 1))], axis=1)
    corrupted_decoder = decoder.copy()
    corrupted_decoder[:, CHANGED] = (decoder[:, CHANGED] + 777) % 3990 + 3
    clean_logits = np.asarray(m(encoder, decoder_tokens=decoder))
    other_logits = np.asarray(m(corrupted_encoder, decoder_tokens=corrupted_decoder))
    good = int(np.bincount(clean_logits[:, -1].argmax(-1)).argmax())
    bad = int(np.bincount(other_logits[:, -1].argmax(-1)).argmax())
    if good == bad:
        bad = int(np.argsort(clean_logits[0, -1])[-2])

    def metric(logits):
        return jnp.mean(logits[:, -1, good] - logits[:, -1, bad])

    return m, encoder, corrupted_encoder, decoder, corrupted_decoder, metric


def _runs(setup, corrupt):
    """``(clean_encoder, corrupted_encoder, clean_decoder, corrupted_decoder)`` with the
    encoder input, the decoder input or both corrupted."""
    _, encoder, corrupted_encoder, decoder, corrupted_decoder, _ = setup
    return (
        encoder,
        corrupted_encoder if corrupt in ("encoder", "both") else encoder,
        decoder,
        corrupted_decoder if corrupt in ("decoder", "both") else decoder,
    )


def _loop(m, runs, metric, hook, axis, units):
    """The reference: one `run_with_hooks` per site, each putting the clean value (taken
    from `run_with_cache`) into one unit of one layer's hook."""
    encoder, corrupted_encoder, decoder, corrupted_decoder = runs
    layers = getattr(m.config, hook.split(".")[0]).num_hidden_layers
    names = [hook.format(i) for i in range(layers)]
    _, cache = m.run_with_cache(encoder, names=names, decoder_tokens=decoder)
    scores = np.full((layers, max(units) + 1), np.nan)
    for layer, name in enumerate(names):
        for unit in units:
            index = (slice(None),) * axis + (unit,)
            clean_value = cache[name][index]

            def put(value, _name, index=index, clean_value=clean_value):
                return value.at[index].set(clean_value)

            logits = m.run_with_hooks(
                corrupted_encoder, {name: put}, decoder_tokens=corrupted_decoder
            )
            scores[layer, unit] = float(metric(logits))
    return scores


CASES = [
    # site, hook, unit axis, what is corrupted, units the loop checks
    ("encoder.resid_pre", "encoder.blocks.{}.hook_resid_pre", 1, "encoder", [1, CHANGED, 4]),
    ("decoder.resid_pre", "decoder.blocks.{}.hook_resid_pre", 1, "decoder", [1, 2, CHANGED]),
    ("decoder.z", "decoder.blocks.{}.attn.hook_z", 2, "encoder", [0, 3]),
    ("decoder.cross_pattern", "decoder.blocks.{}.attn.hook_cross_pattern", 1, "encoder", [0, 3]),
]


@pytest.mark.parametrize("site, hook, axis, corrupt, units", CASES)
def test_sweep_equals_a_loop_of_run_with_hooks(setup, site, hook, axis, corrupt, units):
    m, *_, metric = setup
    runs = _runs(setup, corrupt)
    encoder, corrupted_encoder, decoder, corrupted_decoder = runs
    scores = np.asarray(
        patching.sweep(
            m,
            encoder,
            corrupted_encoder,
            metric,
            site=site,
            decoder_tokens=decoder,
            corrupted_decoder_tokens=corrupted_decoder,
        )
    )
    expected_units = {1: ENC if site.startswith("encoder") else DEC, 2: 4}[axis]
    if site == "decoder.cross_pattern":
        expected_units = 4  # heads, axis 1 of [batch, head, q_pos, enc_pos]
    assert scores.shape == (2, expected_units)
    expected = _loop(m, runs, metric, hook, axis, units)
    np.testing.assert_allclose(scores[:, units], expected[:, units], atol=1e-5, rtol=1e-5)
    # The sweep is not trivially flat: some site moves the metric.
    baseline = float(metric(m(corrupted_encoder, decoder_tokens=corrupted_decoder)))
    assert np.abs(scores - baseline).max() > 1e-3


@pytest.mark.parametrize("corrupt", ["encoder", "decoder", "both"])
def test_patching_clean_into_clean_changes_nothing(setup, corrupt):
    m, *_, metric = setup
    encoder, _, decoder, _ = _runs(setup, corrupt)
    clean_value = float(metric(m(encoder, decoder_tokens=decoder)))
    site = "decoder.resid_pre" if corrupt == "decoder" else "encoder.resid_pre"
    scores = patching.sweep(m, encoder, encoder, metric, site=site, decoder_tokens=decoder)
    np.testing.assert_allclose(scores, clean_value, atol=1e-5)


def test_corrupting_both_inputs_and_patching_the_last_encoder_layer(setup):
    """With both inputs corrupted, putting the clean encoder output back at every encoder
    position leaves only the decoder's corruption: the decoder-only corrupted run."""
    m, *_, metric = setup
    encoder, corrupted_encoder, decoder, corrupted_decoder = _runs(setup, "both")
    scores = patching.sweep(
        m,
        encoder,
        corrupted_encoder,
        metric,
        site="encoder.resid_post",
        decoder_tokens=decoder,
        corrupted_decoder_tokens=corrupted_decoder,
    )
    assert scores.shape == (2, ENC)
    # Positions before the changed one hold the same values in both runs (in layer 0).
    unchanged = float(metric(m(corrupted_encoder, decoder_tokens=corrupted_decoder)))
    assert np.abs(np.asarray(scores) - unchanged).max() > 1e-4


@pytest.mark.parametrize("site", [c[0] for c in CASES])
def test_attribution_patching_has_the_sweeps_shape(setup, site):
    m, *_, metric = setup
    corrupt = next(c[3] for c in CASES if c[0] == site)
    encoder, corrupted_encoder, decoder, corrupted_decoder = _runs(setup, corrupt)
    kwargs = dict(site=site, decoder_tokens=decoder, corrupted_decoder_tokens=corrupted_decoder)
    scores = np.asarray(patching.sweep(m, encoder, corrupted_encoder, metric, **kwargs))
    estimates = np.asarray(
        patching.attribution_patching(m, encoder, corrupted_encoder, metric, **kwargs)
    )
    assert estimates.shape == scores.shape
    assert np.isfinite(estimates).all()
    baseline = float(metric(m(corrupted_encoder, decoder_tokens=corrupted_decoder)))
    effects = scores - baseline
    correlation = np.corrcoef(effects.ravel(), estimates.ravel())[0, 1]
    print(
        f"attribution vs activation patching, {site} ({corrupt} corrupted): r = {correlation:.3f}"
    )


def test_site_errors(setup):
    m, encoder, corrupted_encoder, decoder, _, metric = setup
    with pytest.raises(
        ValueError, match="encoder.resid_pre.*decoder.resid_pre.*decoder.cross_pattern"
    ):
        patching.sweep(
            m, encoder, corrupted_encoder, metric, site="resid_pre", decoder_tokens=decoder
        )
    with pytest.raises(ValueError, match="Unknown patch site"):
        patching.sweep(
            m, encoder, corrupted_encoder, metric, site="decoder.resid", decoder_tokens=decoder
        )
    with pytest.raises(TypeError, match="decoder_tokens"):
        patching.sweep(m, encoder, corrupted_encoder, metric, site="decoder.resid_pre")
    with pytest.raises(ValueError, match="same shape"):
        patching.sweep(
            m,
            encoder,
            corrupted_encoder,
            metric,
            site="decoder.resid_pre",
            decoder_tokens=decoder,
            corrupted_decoder_tokens=decoder[:, :-1],
        )
    plain = gl.teaching_model("gemma3")
    with pytest.raises(ValueError, match="use 'resid_pre'"):
        patching.sweep(plain, encoder, corrupted_encoder, metric, site="decoder.resid_pre")
    with pytest.raises(TypeError, match="encoder-decoder"):
        patching.sweep(plain, encoder, corrupted_encoder, metric, decoder_tokens=decoder)
    assert "decoder.cross_pattern" in patching.available_sites(m)
    assert "encoder.cross_pattern" not in patching.available_sites(m)
