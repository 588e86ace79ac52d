"""Activation patching sweeps, attribution patching and ready-made interventions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz

import gemmalens as gl
from gemmalens import interventions as iv
from gemmalens import patching
from tests import hf_reference as ref

LAYERS, HEADS, SEQ = 2, 4, 5
CHANGED = 2  # the one position where the corrupted prompt differs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gemma3_patching")
    ref.gemma3_text(
        directory,
        num_hidden_layers=LAYERS,
        layer_types=["sliding_attention", "full_attention"],
        post_norm_gain=0.3,
    )
    model = gl.load(directory)
    rng = np.random.RandomState(0)
    clean = rng.randint(3, 256, (2, SEQ))
    corrupted = clean.copy()
    corrupted[:, CHANGED] = (clean[:, CHANGED] + 100) % 250 + 3
    clean_logits, corrupted_logits = np.asarray(model(clean)), np.asarray(model(corrupted))
    # Explain the clean run's favourite final token against the corrupted run's.
    good = int(np.bincount(clean_logits[:, -1].argmax(-1)).argmax())
    bad = int(np.bincount(corrupted_logits[:, -1].argmax(-1)).argmax())
    if good == bad:
        bad = int(np.argsort(clean_logits[0, -1])[-2])

    def metric(logits):
        return jnp.mean(logits[:, -1, good] - logits[:, -1, bad])

    return model, clean, corrupted, metric


def _loop_sweep(model, clean, corrupted, metric, site, mask=None):
    """The reference: a Python loop over sites, one forward pass each (compiled once,
    with the site as an argument), patching through the public ``with_hooks``."""
    spec = patching.SITES[site]
    layers = model.config.num_hidden_layers
    names = [spec.hook.format(i) for i in range(layers)]
    _, cache = model.run_with_cache(clean, names=names, attention_mask=mask)
    axis = spec.unit_axis
    side = (
        {}
        if mask is None
        else {"attention_mask": pz.nx.wrap(jnp.asarray(mask)).tag("batch", "seq")}
    )

    @jax.jit
    def patched(layer, unit):
        def make(i, name):
            def fn(value, _name):
                clean_unit = jax.lax.dynamic_index_in_dim(cache[name], unit, axis)
                swapped = jax.lax.dynamic_update_index_in_dim(value, clean_unit, unit, axis)
                return jnp.where(layer == i, swapped, value)

            return fn

        hooked = pz.freeze_params(model.with_hooks({n: make(i, n) for i, n in enumerate(names)}))
        logits = hooked(pz.nx.wrap(jnp.asarray(corrupted)).tag("batch", "seq"), **side)
        return metric(logits.unwrap("batch", "seq", "vocab"))

    units = cache[names[0]].shape[axis]
    return np.array([[patched(i, u) for u in range(units)] for i in range(layers)])


def test_patching_clean_into_clean_changes_nothing(setup):
    model, clean, _, metric = setup
    baseline = float(metric(model(clean)))
    scores = patching.sweep(model, clean, clean, metric, site="resid_pre")
    np.testing.assert_allclose(scores, baseline, atol=1e-5)


def test_resid_pre_sweep_restores_clean_at_the_changed_token(setup):
    model, clean, corrupted, metric = setup
    scores = np.asarray(patching.sweep(model, clean, corrupted, metric, site="resid_pre"))
    assert scores.shape == (LAYERS, SEQ)
    clean_value, corrupted_value = float(metric(model(clean))), float(metric(model(corrupted)))
    assert abs(clean_value - corrupted_value) > 0.1
    # At layer 0 only the changed position differs: patching it is the clean run.
    np.testing.assert_allclose(scores[0, CHANGED], clean_value, atol=1e-5)
    np.testing.assert_allclose(np.delete(scores[0], CHANGED), corrupted_value, atol=1e-5)
    # Positions before the change never see it.
    np.testing.assert_allclose(scores[:, :CHANGED], corrupted_value, atol=1e-5)


def test_patching_every_position_of_layer0_reproduces_the_other_run(setup):
    model, clean, corrupted, _ = setup
    _, corrupted_cache = model.run_with_cache(corrupted, names="blocks.0.hook_resid_pre")
    patched = model.run_with_hooks(clean, iv.replace_with(corrupted_cache))
    np.testing.assert_allclose(patched, model(corrupted), atol=1e-5)


@pytest.mark.parametrize("site", sorted(patching.SITES))
def test_vectorised_sweep_equals_a_loop(setup, site):
    model, clean, corrupted, metric = setup
    assert patching.shares_runs(model._frozen)  # the shared-runs program, not the fallback
    scores = patching.sweep(model, clean, corrupted, metric, site=site)
    expected = _loop_sweep(model, clean, corrupted, metric, site)
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    assert np.ptp(expected) > 0.01  # the sites do differ


def _mean_logprob(logits):  # reads every position
    return jnp.mean(jax.nn.log_softmax(logits, axis=-1)[..., 7])


def _gathered(logits):  # an index array: which positions it reads is not shown statically
    return jnp.sum(logits[jnp.arange(2), jnp.array([1, 3]), 5])


@pytest.mark.parametrize("metric", [_mean_logprob, _gathered], ids=["all", "gather"])
def test_sweep_with_metrics_that_read_other_positions(setup, metric):
    model, clean, corrupted, _ = setup
    assert patching.metric_positions(metric, (2, SEQ, 256)) is None
    scores = patching.sweep(model, clean, corrupted, metric, site="resid_pre")
    expected = _loop_sweep(model, clean, corrupted, metric, "resid_pre")
    np.testing.assert_allclose(scores, expected, atol=1e-5)


def test_metric_positions():
    shape = (2, SEQ, 256)
    assert patching.metric_positions(lambda x: x[:, -1, 3].mean(), shape) == (SEQ - 1, SEQ)
    assert patching.metric_positions(lambda x: x[0, 1, 3] - x[1, -2, 4], shape) == (1, SEQ - 1)
    assert patching.metric_positions(lambda x: x[:, 2:].sum(), shape) == (2, SEQ)
    assert patching.metric_positions(lambda x: jnp.float32(1.0), shape) == (SEQ - 1, SEQ)
    assert patching.metric_positions(lambda x: x.sum(), shape) is None
    assert patching.metric_positions(jax.jit(lambda x: x[:, -1].sum()), shape) is None


def test_declared_logit_positions(setup):
    model, clean, corrupted, metric = setup
    auto = patching.sweep(model, clean, corrupted, metric)
    every = patching.sweep(model, clean, corrupted, metric, logit_positions="all")
    declared = patching.sweep(model, clean, corrupted, metric, logit_positions=[-1])
    np.testing.assert_allclose(every, auto, atol=1e-5)
    np.testing.assert_allclose(declared, auto, atol=1e-6)
    # Reading a position that was not declared gives NaN rather than a wrong number.
    wrong = patching.sweep(model, clean, corrupted, metric, logit_positions=slice(0, 2))
    assert np.isnan(np.asarray(wrong)).all()
    with pytest.raises(ValueError, match="outside"):
        patching.sweep(model, clean, corrupted, metric, logit_positions=SEQ)


def test_sweep_with_padding_and_prompts_that_differ_at_the_start(setup):
    model, clean, corrupted, metric = setup
    corrupted = corrupted.copy()
    corrupted[1, 0] = (corrupted[1, 0] + 7) % 250 + 3  # the prompts now differ from position 0
    mask = np.ones_like(clean)
    mask[0, -1] = 0  # row 0 is right-padded by one token
    assert patching.first_difference(clean, corrupted, mask, mask) == 0

    def last_real(logits):  # the metric reads the last real token of each row
        return logits[0, -2, 5] - logits[1, -1, 9]

    for site in ("resid_pre", "k"):
        scores = patching.sweep(model, clean, corrupted, last_real, site=site, attention_mask=mask)
        expected = _loop_sweep(model, clean, corrupted, last_real, site, mask=mask)
        np.testing.assert_allclose(scores, expected, atol=1e-5, err_msg=site)


def test_bidirectional_model_patches_every_position(tmp_path):
    ref.gemma3_text(
        tmp_path,
        num_hidden_layers=LAYERS,
        layer_types=["sliding_attention", "full_attention"],
        use_bidirectional_attention=True,
    )
    model = gl.load(tmp_path)
    clean = np.random.RandomState(1).randint(3, 256, (1, SEQ))
    corrupted = clean.copy()
    corrupted[0, CHANGED] = 5

    def metric(logits):
        return logits[0, 0, 3] - logits[0, 0, 4]  # position 0 sees later ones here

    scores = patching.sweep(model, clean, corrupted, metric)
    expected = _loop_sweep(model, clean, corrupted, metric, "resid_pre")
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    assert np.ptp(expected[:, CHANGED:]) > 0.01


def test_sweep_of_a_hooked_model_uses_the_general_form(setup):
    model, clean, corrupted, metric = setup
    with model.hooks({"blocks.1.hook_mlp_out": lambda v, _: v * 0.5}):
        assert not patching.shares_runs(model._frozen)
        scores = patching.sweep(model, clean, corrupted, metric)
        expected = _loop_sweep(model, clean, corrupted, metric, "resid_pre")
    np.testing.assert_allclose(scores, expected, atol=1e-5)


def test_chunked_sweep_equals_full_sweep(setup):
    model, clean, corrupted, metric = setup
    full = patching.sweep(model, clean, corrupted, metric, site="resid_pre")
    chunked = patching.sweep(model, clean, corrupted, metric, site="resid_pre", chunk_size=4)
    np.testing.assert_allclose(chunked, full, atol=1e-6)


@pytest.mark.parametrize("site, floor", [("resid_pre", 0.8), ("z", 0.8), ("pattern", 0.9)])
def test_attribution_patching_correlates_with_activation_patching(setup, site, floor):
    model, clean, corrupted, metric = setup
    baseline = float(metric(model(corrupted)))
    effects = np.asarray(patching.sweep(model, clean, corrupted, metric, site=site)) - baseline
    estimates = np.asarray(patching.attribution_patching(model, clean, corrupted, metric, site))
    assert estimates.shape == effects.shape
    if site == "resid_pre":
        # Positions before the changed token are exactly 0 in both; leave them out so they
        # do not inflate the correlation.
        effects, estimates = effects[:, CHANGED:], estimates[:, CHANGED:]
    correlation = np.corrcoef(effects.ravel(), estimates.ravel())[0, 1]
    print(f"attribution vs activation patching, {site}: r = {correlation:.3f}")
    assert correlation > floor


def test_zero_ablating_every_head_removes_the_attention_output(setup):
    model, clean, _, _ = setup
    layer = 0
    with model.hooks(iv.ablate_heads(layer, range(HEADS))):
        heads_off, cache = model.run_with_cache(clean, names=f"blocks.{layer}.hook_attn_out")
    # The post-attention norm maps zero to zero, so nothing reaches the residual stream.
    assert np.all(np.asarray(cache[f"blocks.{layer}.hook_attn_out"]) == 0)
    no_attention = model.run_with_hooks(
        clean, {f"blocks.{layer}.hook_attn_out": lambda v, _: jnp.zeros_like(v)}
    )
    np.testing.assert_allclose(heads_off, no_attention, atol=1e-5)
    assert np.abs(np.asarray(no_attention) - np.asarray(model(clean))).max() > 1e-2


def test_interventions(setup):
    model, clean, corrupted, _ = setup
    names = ["blocks.0.hook_resid_pre", "blocks.0.attn.hook_z", "blocks.1.mlp.hook_post"]
    _, other = model.run_with_cache(corrupted, names=names)
    _, plain = model.run_with_cache(clean, names=names)
    mean_z = other["blocks.0.attn.hook_z"].mean(0)  # [pos, head, d_head]
    vector = jax.random.normal(jax.random.key(0), (model.config.hidden_size,))
    hooks = iv.combine(
        iv.ablate_heads(0, 1, replacement=mean_z),
        iv.ablate_neurons(1, [3, 5]),
        # Two hooks on one point run in order: 2v then -v adds v.
        iv.add_vector(0, vector, coefficient=2.0, positions=3),
        iv.add_vector(0, vector, coefficient=-1.0, positions=[3]),
    )
    with model.hooks(hooks):
        _, hooked = model.run_with_cache(clean, names=names)
    z = np.asarray(hooked["blocks.0.attn.hook_z"])
    np.testing.assert_allclose(z[:, :, 1], np.broadcast_to(mean_z[:, 1], z[:, :, 1].shape))
    post = np.asarray(hooked["blocks.1.mlp.hook_post"])
    assert np.all(post[..., [3, 5]] == 0) and np.any(post[..., 4] != 0)
    delta = np.asarray(hooked["blocks.0.hook_resid_pre"] - plain["blocks.0.hook_resid_pre"])
    np.testing.assert_allclose(
        delta[:, 3], np.broadcast_to(vector, (2, vector.shape[0])), atol=1e-5
    )
    assert np.all(np.delete(delta, 3, axis=1) == 0)


def test_unknown_site(setup):
    model, clean, corrupted, metric = setup
    with pytest.raises(ValueError, match="resid_pre"):
        patching.sweep(model, clean, corrupted, metric, site="resid")
    with pytest.raises(ValueError, match="same shape"):
        patching.sweep(model, clean, corrupted[:, :-1], metric)


def test_a_metric_that_is_not_one_number_is_refused(setup):
    """A per-prompt or per-token metric would give each site an array (or no gradient):
    every path (the shared sweep, the vmapped one, attribution) says what to reduce."""
    model, clean, corrupted, _ = setup

    def per_prompt(logits):
        return logits[:, -1, 5] - logits[:, -1, 6]

    for run in (
        lambda: patching.sweep(model, clean, corrupted, per_prompt),
        lambda: patching.sweep(model, clean, corrupted, per_prompt, chunk_size=4),
        lambda: patching.attribution_patching(model, clean, corrupted, per_prompt),
    ):
        with pytest.raises(ValueError, match=r"array of shape \(2,\); patching needs one"):
            run()
    with pytest.raises(ValueError, match="returned tuple"):
        patching.sweep(model, clean, corrupted, lambda logits: (logits[0, -1, 5],) * 2)
    # numpy inside the metric fails in the traced program; the error says why and the fix.
    for analysis in (patching.sweep, patching.attribution_patching):
        with pytest.raises(TypeError, match="it must use jax.numpy throughout"):
            analysis(model, clean, corrupted, lambda logits: float(np.asarray(logits).sum()))

    def metric(logits):
        return per_prompt(logits).mean()

    # Reads outside the logits, which JAX would clamp: positions, token ids, index arrays.
    for outside, message in (
        (lambda logits: logits[:, SEQ + 2, 5].mean(), f"position index {SEQ + 2}, but they"),
        (lambda logits: logits[:, -SEQ - 1, 5].mean(), f"position index {-SEQ - 1}, but they"),
        (lambda logits: logits[:, -1, jnp.array([5, 10**6])].mean(), "vocabulary index 1000000"),
    ):
        with pytest.raises(ValueError, match=message):
            patching.sweep(model, clean, corrupted, outside)
    vocab = model.config.vocab_size
    assert patching.sweep(model, clean, corrupted, lambda lg: lg[:, -1, vocab - 1].mean()).ndim == 2

    for chunk_size in (0, -2, 1.5):  # 0 ran one site at a time; -2 failed in a reshape
        with pytest.raises(ValueError, match=f"chunk_size={chunk_size}: patch this many"):
            patching.sweep(model, clean, corrupted, metric, chunk_size=chunk_size)


def test_path_patching_on_the_stacked_form_and_its_errors(setup):
    """The stacked model gives the same path-patching scores (to the logits, chunked, and
    to receivers); each misuse names the fix."""
    model, clean, corrupted, metric = setup
    receivers = {"blocks.1.attn.hook_v": [0], "blocks.1.hook_resid_pre": None}
    stacked = model.stacked()
    for options in ({}, {"chunk_size": 3}, {"receivers": receivers}):
        np.testing.assert_allclose(
            np.asarray(patching.path_patching(stacked, clean, corrupted, metric, **options)),
            np.asarray(patching.path_patching(model, clean, corrupted, metric, **options)),
            rtol=1e-5,
            atol=1e-5,
            err_msg=str(options),
        )
    misuses = [
        ({"site": "resid_pre"}, ValueError, "path patching sends from attention heads"),
        ({"receivers": {"blocks.1.attn.hook_z": None}}, ValueError, "is a head output"),
        ({"receivers": {"blocks.1.attn.hook_qq": None}}, KeyError, "blocks.1.attn.hook_q"),
        ({"receivers": ["blocks.1.attn.hook_q"]}, TypeError, "receivers maps hook names"),
        ({"receivers": {"blocks.1.hook_resid_pre": [0]}}, ValueError, "has no head axis"),
        ({"receivers": {"blocks.1.attn.hook_q": [9]}}, IndexError, "head 9 is outside"),
        ({"decoder_tokens": clean}, TypeError, "decoder_tokens .* are for encoder-decoder"),
        ({"corrupted_pixels": clean}, TypeError, r"unexpected keywords \['corrupted_pixels'\]"),
        ({"chunk_size": 0}, ValueError, "chunk_size=0"),
    ]
    for options, error, message in misuses:
        with pytest.raises(error, match=message):
            patching.path_patching(model, clean, corrupted, metric, **options)
