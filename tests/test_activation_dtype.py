"""`Model.with_activation_dtype`: a bfloat16 model whose residual stream runs in float32.

The teaching checkpoints are stored in bfloat16, so the model loaded with
``dtype="float32"`` holds exactly the values of the bfloat16 model's weights: a bfloat16
model with float32 activations must give what that float32 model gives (to float32
rounding), while its parameters stay bfloat16. The plain bfloat16 model misses by far more,
so the comparisons below can fail.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz

import gemmalens as gl
from gemmalens import patching
from gemmalens.layers import params

FAMILIES = ["gemma3", "gemma3n", "gemma4_moe", "t5gemma2"]
TOKENS = np.random.RandomState(0).randint(3, 200, (2, 10))
DECODER_TOKENS = np.random.RandomState(1).randint(3, 200, (2, 6))
RELATIVE = 1e-5


def _inputs(name: str) -> dict:
    return {"decoder_tokens": DECODER_TOKENS} if name == "t5gemma2" else {}


def _relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def _parameter_dtypes(m) -> set[str]:
    values = [param.value for param in pz.unbind_params(m.model)[1]]
    return {
        jnp.dtype(leaf.dtype).name
        for leaf in jax.tree.leaves(values)
        if jnp.issubdtype(leaf.dtype, jnp.floating)
    }


def cast_parameters(m, dtype):
    """``m`` with every parameter converted to ``dtype``."""
    return m.with_tree(params.cast_parameters(m.model, dtype))


def check_float32_activations_with_towers(m, tokens, **inputs) -> None:
    """For a model with vision or audio towers (the multimodal test modules call this with
    their own model and inputs): ``m``'s weights rounded to bfloat16, run with float32
    activations, give the logits of the float32 model holding the same values, and the
    towers' parameters are float32 while the text weights stay bfloat16. (That the plain
    bfloat16 model misses, and that None gives it back, is checked on the teaching models
    above; not repeated here, to keep each module to two compilations.)"""
    half = cast_parameters(m, jnp.bfloat16)
    full = cast_parameters(half, jnp.float32)
    mixed = half.with_activation_dtype("float32")
    dtypes = {
        p.label: jnp.dtype(p.value.dtype).name
        for p in pz.select(mixed.model).at_instances_of(pz.Parameter).get_sequence()
    }
    towers = {
        label for label in dtypes if {"vision", "audio", "embed_vision"} & set(label.split("."))
    }
    assert towers and {dtypes[label] for label in towers} == {"float32"}
    assert {d for label, d in dtypes.items() if label not in towers} == {"bfloat16"}
    # (Unconverted towers miss by far more: 0.029 on the vision teaching model's logits.)
    assert _relative(mixed(tokens, **inputs), full(tokens, **inputs)) < RELATIVE
    # None converts the towers back to bfloat16 (the same values: they came from there).
    back = mixed.with_activation_dtype(None)
    assert {
        jnp.dtype(p.value.dtype).name
        for p in pz.select(back.model).at_instances_of(pz.Parameter).get_sequence()
    } == {"bfloat16"}


@pytest.mark.parametrize("name", FAMILIES)
def test_float32_activations_give_the_float32_model(name):
    full = gl.teaching_model(name, dtype="float32")
    half = gl.teaching_model(name, dtype="bfloat16")
    mixed = half.with_activation_dtype("float32")
    assert _parameter_dtypes(mixed) == {"bfloat16"}
    assert (half.activation_dtype, mixed.activation_dtype) == (jnp.bfloat16, jnp.float32)

    full_logits, full_cache = full.run_with_cache(TOKENS, **_inputs(name))
    logits, cache = mixed.run_with_cache(TOKENS, **_inputs(name))
    assert logits.dtype == jnp.float32
    assert _relative(logits, full_logits) < RELATIVE
    assert set(cache.keys()) == set(full_cache.keys())
    for hook in full_cache.keys():
        if jnp.issubdtype(full_cache[hook].dtype, jnp.floating):
            assert cache[hook].dtype == jnp.float32, hook
            assert _relative(cache[hook], full_cache[hook]) < 10 * RELATIVE, hook
        else:  # expert indices
            np.testing.assert_array_equal(cache[hook], full_cache[hook])
    # The plain bfloat16 model is another function, by far more than the tolerance.
    assert _relative(half(TOKENS, **_inputs(name)), full_logits) > 1e-3

    # Greedy generation (its KV cache in float32) picks the float32 model's tokens: a
    # decoder and the encoder-decoder (the KV caches are made the same way in every family).
    if name in ("gemma3", "t5gemma2"):
        np.testing.assert_array_equal(
            mixed.generate(TOKENS[:1], max_new_tokens=3).tokens,
            full.generate(TOKENS[:1], max_new_tokens=3).tokens,
        )
    # None goes back to the weights' dtype: the plain bfloat16 model again.
    back = mixed.with_activation_dtype(None)
    assert back.activation_dtype == jnp.bfloat16
    np.testing.assert_array_equal(back(TOKENS, **_inputs(name)), half(TOKENS, **_inputs(name)))


def test_patching_in_float32_activations():
    """A bfloat16 sweep reads bfloat16 logits (a logit near 20 moves in steps of 0.125),
    which swamps small effects; with float32 activations, stacked, it is the float32 sweep."""
    full = gl.teaching_model("gemma3", dtype="float32")
    half = gl.teaching_model("gemma3", dtype="bfloat16")
    corrupted = TOKENS.copy()
    corrupted[:, 3] = [17, 91]
    order = np.argsort(-np.asarray(full(TOKENS))[:, -1].mean(0))
    a, b = int(order[0]), int(order[1])

    def metric(logits):
        return (logits[:, -1, a] - logits[:, -1, b]).mean()

    expected = np.asarray(patching.sweep(full, TOKENS, corrupted, metric))
    mixed = half.with_activation_dtype("float32").stacked()
    got = np.asarray(patching.sweep(mixed, TOKENS, corrupted, metric))
    np.testing.assert_allclose(got, expected, rtol=0, atol=RELATIVE * np.abs(expected).max())
    rough = np.asarray(patching.sweep(half, TOKENS, corrupted, metric))
    assert np.abs(rough - expected).max() > np.ptp(expected)  # noise above the effects
    attribution = patching.attribution_patching(mixed, TOKENS, corrupted, metric)
    reference = patching.attribution_patching(full, TOKENS, corrupted, metric)
    assert _relative(attribution, reference) < 1e-4


def test_the_vision_teaching_model_in_float32_activations():
    from gemmalens.teaching import images

    m = gl.teaching_model("gemma3_vision", dtype="float32")
    examples = [group[0] for group in images.held_out(1).values()][:2]
    arrays = images.ImageQuestions(m.tokenizer).encode(examples)
    tokens = arrays["tokens"][:, : int(arrays["answer_start"].min())]
    check_float32_activations_with_towers(m, tokens, pixel_values=arrays["pixel_values"])


def test_bad_activation_dtypes_name_the_fix():
    half = gl.teaching_model("gemma3", dtype="bfloat16")
    with pytest.raises(ValueError, match="narrower than the weights"):
        gl.teaching_model("gemma3", dtype="float32").with_activation_dtype("bfloat16")
    with pytest.raises(ValueError, match="floating dtype such as 'float32'"):
        half.with_activation_dtype("int32")
    with pytest.raises(ValueError, match="not 'float33'"):
        half.with_activation_dtype("float33")


def test_cast_parameters_keeps_a_shared_parameter_one():
    """T5Gemma 2's decoder reads keys through one ``k_proj`` at two places: a conversion
    that made one copy per place would double it (and part an edit of one from the other)."""
    tree = gl.teaching_model("t5gemma2", dtype="bfloat16").model

    def places_objects_labels(tree):
        found = pz.select(tree).at_instances_of(pz.Parameter).get_sequence()
        return len(found), len({id(p) for p in found}), len({p.label for p in found})

    places, objects, labels = places_objects_labels(tree)
    assert places > objects == labels  # the case this test is for
    converted = params.cast_parameters(tree, jnp.float32)
    assert places_objects_labels(converted) == (places, objects, labels)
