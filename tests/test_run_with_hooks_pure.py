"""`run_with_hooks` is a pure function of the model and the hooks: it leaves the `Model`
(its tree, frozen tree and compiled plans) as it was, and gives what the `hooks` context
manager gives."""

from __future__ import annotations

import threading

import jax.numpy as jnp
import numpy as np
import pytest

import gemmalens as gl

TOKENS = np.random.RandomState(0).randint(3, 4000, (2, 7))


def _scale(factor):
    def fn(value, _name):
        return value * factor

    return fn


def _call(m, hooks=None):
    if m.config.family == "t5gemma2":
        decoder = TOKENS[:, :4]
        if hooks is None:
            return np.asarray(m(TOKENS, decoder_tokens=decoder))
        return np.asarray(m.run_with_hooks(TOKENS, hooks, decoder_tokens=decoder))
    return np.asarray(m(TOKENS) if hooks is None else m.run_with_hooks(TOKENS, hooks))


def _cache(m, names):
    if m.config.family == "t5gemma2":
        return m.run_with_cache(TOKENS, names=names, decoder_tokens=TOKENS[:, :4])
    return m.run_with_cache(TOKENS, names=names)


@pytest.mark.parametrize(
    "name, hook",
    [("gemma3", "blocks.1.hook_resid_post"), ("t5gemma2", "encoder.blocks.0.hook_resid_post")],
)
def test_run_with_hooks_leaves_the_model_alone(name, hook):
    m = gl.teaching_model(name)
    _cache(m, [hook])  # a capture plan to keep
    model, frozen, leaves = m.model, m._frozen, m._leaves
    plans, plan_keys = m._capture_plans, list(m._capture_plans)
    plan_values = list(m._capture_plans.values())
    plain = _call(m)
    hooks = {hook: _scale(0.5)}

    hooked = _call(m, hooks)

    assert m.model is model and m._frozen is frozen and m._leaves is leaves
    assert m._capture_plans is plans and list(plans) == plan_keys
    assert all(a is b for a, b in zip(plans.values(), plan_values, strict=True))
    assert np.abs(hooked - plain).max() > 1e-3  # the hook did something
    np.testing.assert_array_equal(_call(m), plain)
    # The same values as the hooks() context manager (which swaps m.model in and out).
    with m.hooks(hooks):
        old_way = _call(m)
    np.testing.assert_allclose(hooked, old_way, atol=1e-6)


@pytest.mark.parametrize("name, hook", [("gemma3", "blocks.0.hook_mlp_out")])
def test_interleaved_and_concurrent_hooked_runs_do_not_interfere(name, hook):
    m = gl.teaching_model(name)
    a_hooks, b_hooks = {hook: _scale(0.0)}, {hook: _scale(2.0)}
    plain, a, b = _call(m), _call(m, a_hooks), _call(m, b_hooks)
    assert np.abs(a - b).max() > 1e-3
    # Interleaved calls: each gives what it gives alone.
    for _ in range(2):
        np.testing.assert_array_equal(_call(m, b_hooks), b)
        np.testing.assert_array_equal(_call(m), plain)
        np.testing.assert_array_equal(_call(m, a_hooks), a)
    # Threads: hooked and plain calls at once.
    results, errors = {}, []

    def work(key, hooks):
        try:
            results[key] = [_call(m, hooks) for _ in range(3)]
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [
        threading.Thread(target=work, args=(key, hooks))
        for key, hooks in (("a", a_hooks), ("b", b_hooks), ("plain", None))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for key, expected in (("a", a), ("b", b), ("plain", plain)):
        for got in results[key]:
            np.testing.assert_array_equal(got, expected)


def test_hook_errors_still_raise():
    m = gl.teaching_model("gemma3")
    with pytest.raises(TypeError, match="must be a function"):
        m.run_with_hooks(TOKENS, {"blocks.0.hook_resid_pre": 3.0})
    with pytest.raises(KeyError, match="Did you mean"):
        m.run_with_hooks(TOKENS, {"blocks.0.hook_resid_prex": _scale(1.0)})
    with pytest.raises(ValueError, match="expected"):
        m.run_with_hooks(TOKENS, {"blocks.0.hook_resid_pre": lambda v, _: v[:, :1]})
    assert jnp.asarray(m(TOKENS)).shape == (2, 7, m.config.vocab_size)
