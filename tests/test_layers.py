"""Shared layers against plain numpy formulas (the details that are easy to get wrong)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz

from gemmalens.layers import (
    ApplyRoPE,
    AttentionMask,
    DotProductAttention,
    EmbedTokens,
    HookPoint,
    RMSNorm,
    inverse_frequencies,
    positions_from_mask,
)
from gemmalens.layers.attention import PATTERN_AXES

RNG = np.random.RandomState(0)


def named(array, *axes):
    return pz.nx.wrap(jnp.asarray(array)).tag(*axes)


@pytest.mark.parametrize("form", ["one_plus", "plain", "none"])
def test_rms_norm_forms(form):
    x = RNG.randn(3, 8).astype(np.float32)
    w = RNG.randn(8).astype(np.float32)
    scale = None if form == "none" else pz.Parameter(value=named(w, "embedding"), label="w")
    norm = RMSNorm(scale=scale, axis="embedding", eps=1e-6, form=form)
    y = norm(named(x, "seq", "embedding")).unwrap("seq", "embedding")
    normalised = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6)
    expected = {"one_plus": normalised * (1 + w), "plain": normalised * w, "none": normalised}[form]
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


def test_rms_norm_scales_in_float32_before_the_cast():
    x = jnp.asarray(RNG.randn(4, 16), jnp.bfloat16)
    w = jnp.asarray(RNG.randn(16) * 3, jnp.bfloat16)
    norm = RMSNorm(
        scale=pz.Parameter(value=named(w, "d"), label="w"), axis="d", eps=1e-6, form="one_plus"
    )
    y = norm(named(x, "n", "d")).unwrap("n", "d")
    xf = np.asarray(x, np.float32)
    exact = xf / np.sqrt((xf**2).mean(-1, keepdims=True) + 1e-6) * (1 + np.asarray(w, np.float32))
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y), np.asarray(jnp.asarray(exact, jnp.bfloat16)))


def test_embedding_scale_rounded_to_table_dtype():
    table = jnp.ones((5, 1152), jnp.bfloat16)
    embed = EmbedTokens.with_model_width(
        pz.Parameter(value=named(table, "vocab", "embedding"), label="e"), 1152
    )
    out = embed(named(np.array([[1, 2]]), "batch", "seq")).unwrap("batch", "seq", "embedding")
    assert float(out[0, 0, 0]) == 34.0  # sqrt(1152) = 33.94 rounds to 34.0 in bfloat16


def test_rope_rotate_half_pairs_and_linear_scaling():
    d, theta, factor = 8, 10_000.0, 8.0
    x = RNG.randn(1, 5, d).astype(np.float32)
    positions = named(np.arange(5)[None], "batch", "seq")
    rope = ApplyRoPE(axis="head_dim", theta=theta, rope_type="linear", factor=factor)
    y = rope(named(x, "batch", "seq", "head_dim"), token_positions=positions).unwrap(
        "batch", "seq", "head_dim"
    )
    inv = 1 / theta ** (np.arange(0, d, 2) / d) / factor
    angles = np.arange(5)[:, None] * inv
    cos, sin = np.cos(angles), np.sin(angles)
    first, second = x[0, :, : d // 2], x[0, :, d // 2 :]
    expected = np.concatenate([first * cos - second * sin, second * cos + first * sin], -1)
    np.testing.assert_allclose(y[0], expected, rtol=1e-5, atol=1e-6)


def test_proportional_rope_leaves_most_pairs_unrotated():
    inv = inverse_frequencies(512, 1_000_000.0, "proportional", partial_rotary_factor=0.25)
    assert inv.shape == (256,)
    assert np.all(inv[:64] > 0) and np.all(inv[64:] == 0)
    # The exponent divides by the full head dim, not by twice the rotated pairs.
    np.testing.assert_allclose(inv[1], 1_000_000.0 ** (-2 / 512), rtol=1e-6)


def test_positions_skip_padding():
    mask = named(np.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]]), "batch", "seq")
    positions = positions_from_mask(mask).unwrap("batch", "seq")
    np.testing.assert_array_equal(positions, [[-1, -1, 0, 1, 2], [0, 1, 2, -1, -1]])


@pytest.mark.parametrize(
    "mask, allowed",
    [
        (AttentionMask(causal=True), lambda q, k: k <= q),
        (AttentionMask(causal=True, window_before=3), lambda q, k: (k <= q) & (q - k < 3)),
        (
            AttentionMask(causal=False, window_before=3, window_after=3),
            lambda q, k: abs(q - k) <= 2,
        ),
        (AttentionMask(causal=False), lambda q, k: q == q),
    ],
)
def test_mask_edges(mask, allowed):
    positions = named(np.arange(7)[None], "batch", "seq")
    visible = mask.visible(token_positions=positions).unwrap("batch", "seq", "kv_seq")[0]
    q, k = np.indices((7, 7))
    np.testing.assert_array_equal(visible, allowed(q, k))


def _attention(softcap=None, implementation="auto"):
    return DotProductAttention(
        scale=0.3,
        softcap=softcap,
        mask=AttentionMask(causal=True, window_before=3),
        hook_attn_scores=HookPoint("scores", PATTERN_AXES),
        hook_pattern=HookPoint("pattern", PATTERN_AXES),
        implementation=implementation,
    )


def _qkv():
    return RNG.randn(2, 6, 4, 8), RNG.randn(2, 6, 2, 8), RNG.randn(2, 6, 2, 8)


def _numpy_attention(q, k, v, scale, softcap):
    k, v = np.repeat(k, 2, axis=2), np.repeat(v, 2, axis=2)  # head h reads kv head h // 2
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if softcap:
        scores = softcap * np.tanh(scores / softcap)
    qi, ki = np.indices(scores.shape[-2:])
    scores = np.where((ki <= qi) & (qi - ki < 3), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", weights, v)


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("implementation", ["explicit", "auto"])
def test_attention_against_numpy(softcap, implementation):
    q, k, v = _qkv()
    positions = named(np.tile(np.arange(6), (2, 1)), "batch", "seq")
    named_qkv = (
        named(q, "batch", "seq", "heads", "head_dim"),
        named(k, "batch", "seq", "kv_heads", "head_dim"),
        named(v, "batch", "seq", "kv_heads", "head_dim"),
    )
    out = _attention(softcap, implementation)(named_qkv, token_positions=positions)
    expected = _numpy_attention(q, k, v, 0.3, softcap)
    np.testing.assert_allclose(out.unwrap("batch", "seq", "heads", "head_dim"), expected, atol=1e-5)


@pytest.mark.parametrize(
    "mask",
    [
        AttentionMask(causal=True),
        AttentionMask(causal=True, window_before=3),
        AttentionMask(causal=False, window_before=3, window_after=3),
        AttentionMask(causal=False),
    ],
)
def test_banded_kernel_equals_explicit_mask(mask):
    """With plain 0..n-1 positions the fused path takes a band instead of a mask array."""
    q, k, v = _qkv()
    named_qkv = (
        named(q, "batch", "seq", "heads", "head_dim"),
        named(k, "batch", "seq", "kv_heads", "head_dim"),
        named(v, "batch", "seq", "kv_heads", "head_dim"),
    )
    positions = named(np.tile(np.arange(6), (2, 1)), "batch", "seq")
    attention = dataclasses.replace(_attention(implementation="fused"), mask=mask)
    banded = attention(named_qkv, token_positions=positions, positions_are_arange=True)
    masked = attention(named_qkv, token_positions=positions)
    np.testing.assert_allclose(
        banded.unwrap("batch", "seq", "heads", "head_dim"),
        masked.unwrap("batch", "seq", "heads", "head_dim"),
        atol=1e-5,
    )


def test_fused_path_only_without_pattern_hooks():
    assert not _attention().uses_explicit_weights()
    assert _attention(softcap=2.0).uses_explicit_weights()
    assert _attention(implementation="explicit").uses_explicit_weights()
