"""Splicing dictionaries into every decoder family, checked against hooked runs.

On Gemma 3n the residual hooks carry AltUp's active stream and on Gemma 4 the
full-attention layers have a wider ``hook_z`` than the sliding ones: a spliced SAE must
read and rewrite exactly the value its hook carries. T5Gemma 2 is refused with a reason.
"""

from __future__ import annotations

import numpy as np
import pytest

import gemmalens as gl
from gemmalens.checkpoints.safetensors_files import CheckpointError

# (model, hook) pairs: a residual hook, an MLP output, and hook_z of a full-attention layer
# (Gemma 4's is 4 heads x 128, its sliding layers' 4 x 64).
CASES = [
    ("gemma3n", "blocks.2.hook_resid_post"),
    ("gemma3n", "blocks.2.attn.hook_z"),
    ("gemma4_moe", "blocks.2.hook_mlp_out"),
    ("gemma4_moe", "blocks.1.attn.hook_z"),
]


@pytest.fixture(scope="module")
def models():
    return {name: gl.teaching_model(name) for name in ("gemma3n", "gemma4_moe")}


@pytest.fixture(scope="module")
def tokens(models):
    return models["gemma3n"].to_tokens(["The capital of France is Paris.", "def add(a, b):"])


def _random_sae(rng: np.random.Generator, d: int, hook: str, width: int = 24) -> gl.sae.SAE:
    return gl.sae.SAE(
        w_enc=(rng.normal(size=(d, width)) / np.sqrt(d)).astype(np.float32),
        w_dec=(rng.normal(size=(width, d)) / np.sqrt(width)).astype(np.float32),
        b_enc=(rng.normal(size=width) * 0.1).astype(np.float32),
        b_dec=(rng.normal(size=d) * 0.1).astype(np.float32),
        threshold=(np.abs(rng.normal(size=width)) * 0.1).astype(np.float32),
        hook_in=hook,
        hook_out=hook,
    )


def _numpy_reconstruction(sae: gl.sae.SAE, x: np.ndarray) -> np.ndarray:
    pre = x @ sae.w_enc + sae.b_enc
    f = np.where(pre > sae.threshold, np.maximum(pre, 0), 0)
    return f @ sae.w_dec + sae.b_dec


def _hook_and_sae(m, tokens, hook: str, seed: int):
    """The logits and ``hook``'s value on ``tokens``, the SAE's width (a ``hook_z`` is
    read with its heads flattened) and a random SAE of that width at the hook."""
    ids, mask = tokens
    logits, cache = m.run_with_cache(ids, [hook], attention_mask=mask)
    x = np.asarray(cache[hook])
    width = x.shape[-2] * x.shape[-1] if hook.endswith("hook_z") else x.shape[-1]
    return logits, x, width, _random_sae(np.random.default_rng(seed), width, hook)


@pytest.mark.parametrize(("name", "hook"), CASES)
def test_splice_equals_replacing_the_hook_value(models, tokens, name, hook):
    m = models[name]
    ids, mask = tokens
    base, x, width, sae = _hook_and_sae(m, tokens, hook, seed=0)
    gl.sae.check_fits(sae, m)
    base = np.asarray(base)

    with_error, spliced_cache = gl.sae.splice(m, sae).run_with_cache(
        ids, "*.sae.hook_features", attention_mask=mask
    )
    assert np.abs(np.asarray(with_error) - base).max() <= 1e-5 * np.abs(base).max()

    flat = x.reshape(*x.shape[:2], width)
    replaced = _numpy_reconstruction(sae, flat).reshape(x.shape).astype(np.float32)
    expected = np.asarray(m.run_with_hooks(ids, {hook: lambda v, n: replaced}, attention_mask=mask))
    spliced = np.asarray(gl.sae.splice(m, sae, include_error=False)(ids, mask))
    assert np.abs(expected - base).max() > 1e-2, "the reconstruction should change the logits"
    assert np.abs(spliced - expected).max() <= 1e-4 * np.abs(expected).max()

    features = np.asarray(spliced_cache[sae.hook_name("features")])
    pre = flat @ sae.w_enc + sae.b_enc
    assert np.abs(features - np.where(pre > sae.threshold, np.maximum(pre, 0), 0)).max() < 1e-4


def test_wrong_hook_z_width_on_gemma4_names_the_width(models):
    m = models["gemma4_moe"]
    # A sliding layer's width (4 x 64) at a full-attention layer (4 x 128).
    sae = _random_sae(np.random.default_rng(1), 256, "blocks.1.attn.hook_z")
    with pytest.raises(CheckpointError, match="512 wide"):
        gl.sae.check_fits(sae, m)


def test_encoder_decoder_models_are_refused_with_the_reason():
    m = gl.teaching_model("t5gemma2")
    sae = _random_sae(np.random.default_rng(2), 128, "blocks.0.hook_resid_post")
    with pytest.raises(CheckpointError, match="decoder-only"):
        gl.sae.splice(m, sae)


@pytest.mark.parametrize("name", ["gemma3n", "gemma4_moe"])
def test_logit_effects_outside_gemma3_say_why_they_are_not_direct(models, name):
    sae = _random_sae(np.random.default_rng(3), 256, "blocks.1.hook_resid_post")
    with pytest.raises(NotImplementedError, match="direct effect only in Gemma 3"):
        gl.sae.logit_effects(models[name], sae, 0)


@pytest.mark.parametrize(("name", "hook"), [CASES[0], CASES[3]])
def test_attribution_is_gradient_times_activation(models, tokens, name, hook):
    """`sae.attribute` on a spliced SAE (Gemma 3n's AltUp stream, Gemma 4's wider ``z``):
    each feature's score is its activation times the
    metric's gradient at the hook read through its decoder row, the error's is the error
    times that gradient (the gradient taken on the model without the SAE, at every logit
    position; the attribution computes the metric's position only)."""
    from gemmalens import patching
    from gemmalens.compiling import Distinct

    m = models[name]
    ids, mask = tokens
    logits, x, width, sae = _hook_and_sae(m, tokens, hook, seed=1)
    first, second = (int(t) for t in np.argsort(-np.asarray(logits)[:, -1].mean(0))[:2])

    def metric(logits):  # the two likeliest next tokens' logit difference
        return (logits[:, -1, first] - logits[:, -1, second]).mean()

    result = gl.sae.attribute(gl.sae.splice(m, sae), ids, metric, attention_mask=mask)
    inputs = m._prepare(ids, mask, {})
    value, (grad,) = patching._metric_and_grads(
        Distinct.of(m._frozen),
        [np.zeros_like(x)],
        inputs,
        names=(hook,),
        metric=metric,
        forward=m.logits_of,
    )
    g = np.asarray(grad, np.float64).reshape(*x.shape[:2], width)
    flat = x.reshape(*x.shape[:2], width).astype(np.float64)
    pre = flat @ sae.w_enc + sae.b_enc
    f = np.where(pre > sae.threshold, np.maximum(pre, 0), 0)
    expected = np.einsum("bsf,fd,bsd->f", f, sae.w_dec, g)
    error = float(((flat - (f @ sae.w_dec + sae.b_dec)) * g).sum())
    assert np.abs(expected).max() > 1e-3  # something to compare
    np.testing.assert_allclose(
        result.features[hook], expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max()
    )
    assert abs(result.error[hook] - error) <= 1e-3 * max(1.0, abs(error))
    assert abs(result.metric - float(value)) <= 1e-5 * max(1.0, abs(float(value)))
