"""The ``per_layer_input`` patch site of models with per-layer embeddings (PLE): a token's
identity reaches every layer through ``blocks.{i}.hook_per_layer_input``, so patching the
residual stream alone does not restore a corrupted token."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemmalens as gl
from gemmalens import patching

SEQ, CHANGED = 6, 3
_S, _F = "sliding_attention", "full_attention"


@pytest.fixture(scope="module")
def e2b_like():
    """A tiny random Gemma 4 E2B-like model: per-layer embeddings, KV sharing."""
    config = dataclasses.replace(
        gl.preset("gemma4_e2b"),
        vocab_size=512,
        vocab_size_per_layer_input=512,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=6,
        layer_types=(_S, _F, _S, _F, _S, _F),
        num_kv_shared_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        global_head_dim=32,
        sliding_window=4,
        hidden_size_per_layer_input=8,
        max_position_embeddings=256,
    )
    return gl.build(config, seed=0)


def _prompts():
    rng = np.random.RandomState(0)
    clean = rng.randint(3, 480, (2, SEQ))
    corrupted = clean.copy()
    corrupted[:, CHANGED] = (clean[:, CHANGED] + 50) % 470 + 3
    return clean, corrupted


def _put_clean(cache, names, position):
    """Hooks that put the clean value back at ``position`` of each of ``names``."""

    def put(name):
        def fn(value, _name):
            return value.at[:, position].set(cache[name][:, position])

        return fn

    return {name: put(name) for name in names}


def test_per_layer_input_sweep_equals_a_loop_of_run_with_hooks(e2b_like):
    m = e2b_like
    clean, corrupted = _prompts()
    logits = np.asarray(m(clean))
    good = int(logits[0, -1].argmax())
    bad = int(np.argsort(logits[0, -1])[-2])

    def metric(logits):
        return jnp.mean(logits[:, -1, good] - logits[:, -1, bad])

    scores = np.asarray(patching.sweep(m, clean, corrupted, metric, site="per_layer_input"))
    assert scores.shape == (m.config.num_hidden_layers, SEQ)
    names = [f"blocks.{i}.hook_per_layer_input" for i in range(m.config.num_hidden_layers)]
    _, cache = m.run_with_cache(clean, names=names)
    # The first layer, one in the middle and the last, which reads shared keys and values:
    # one compiled hooked run per layer, the position a traced argument.
    for layer in (0, 3, m.config.num_hidden_layers - 1):
        name = names[layer]

        @jax.jit
        def patched(position, name=name):
            hooks = _put_clean(cache, [name], position)
            return metric(m.run_with_hooks(corrupted, hooks))

        for position in (CHANGED, SEQ - 1):
            expected = float(patched(position))
            np.testing.assert_allclose(scores[layer, position], expected, atol=1e-5, rtol=1e-5)
    baseline = float(metric(m(corrupted)))
    # Only the corrupted position's per-layer inputs differ between the runs.
    np.testing.assert_allclose(np.delete(scores, CHANGED, axis=1), baseline, atol=1e-5)
    assert np.abs(scores[:, CHANGED] - baseline).max() > 1e-4


def test_resid_pre_alone_does_not_restore_a_token_in_a_ple_model(e2b_like):
    m = e2b_like
    clean, corrupted = _prompts()
    layers = m.config.num_hidden_layers
    per_layer = [f"blocks.{i}.hook_per_layer_input" for i in range(layers)]
    names = ["blocks.0.hook_resid_pre", *per_layer]
    clean_logits, cache = m.run_with_cache(clean, names=names)
    clean_logits = np.asarray(clean_logits)

    resid_only = m.run_with_hooks(corrupted, _put_clean(cache, names[:1], CHANGED))
    assert np.abs(np.asarray(resid_only) - clean_logits).max() > 1e-2

    resid_and_ple = m.run_with_hooks(corrupted, _put_clean(cache, names, CHANGED))
    np.testing.assert_allclose(resid_and_ple, clean_logits, atol=1e-5)


def test_gemma3n_altup_streams_carry_the_token_too():
    """Gemma 3n: ``resid_pre`` is the active AltUp stream only; the other streams are made
    from the embedding, so the embedding (``hook_embed``) and every per-layer input are
    what restore a token."""
    m = gl.teaching_model("gemma3n")
    assert "per_layer_input" in patching.available_sites(m)
    clean, corrupted = _prompts()
    per_layer = [f"blocks.{i}.hook_per_layer_input" for i in range(m.config.num_hidden_layers)]
    names = ["hook_embed", "blocks.0.hook_resid_pre", *per_layer]
    clean_logits, cache = m.run_with_cache(clean, names=names)
    clean_logits = np.asarray(clean_logits)
    resid = m.run_with_hooks(corrupted, _put_clean(cache, names[1:], CHANGED))
    assert np.abs(np.asarray(resid) - clean_logits).max() > 1e-3
    embed = m.run_with_hooks(corrupted, _put_clean(cache, [names[0], *per_layer], CHANGED))
    np.testing.assert_allclose(embed, clean_logits, atol=1e-4)


def test_per_layer_input_on_a_model_without_it():
    m = gl.teaching_model("gemma3")
    clean, corrupted = _prompts()
    with pytest.raises(ValueError, match="Gemma 3n .* Gemma 4 E2B") as error:
        patching.sweep(m, clean, corrupted, lambda x: x[:, -1, 0].mean(), site="per_layer_input")
    assert "resid_pre" in str(error.value)  # lists the sites this model has
