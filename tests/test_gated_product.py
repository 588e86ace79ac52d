"""The prompt's gated-product kernel (`gemmalens.kernels.gated_product`) and the path that
takes it in `GatedMLP` (`mlp.PROMPT_MLP_KERNEL`).

The kernel itself needs a Hopper GPU: here it is lowered for CUDA (which checks its
shapes, shared memory and the Pallas API it is written against) and its arithmetic is
measured on the GPU by ``benchmarks/gated_product_kernel.py``. The model's side runs
everywhere: under ``"reference"`` the block takes the kernel's path (its batching and
derivative rules, the reshaping into rows) with XLA's arithmetic in place of the kernel,
which must give what the plain block gives, on every family, per layer and stacked, under
``vmap`` (patching sweeps) and ``grad`` (attribution), and leave hooked blocks alone.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz

import gemmalens as gl
from gemmalens import patching
from gemmalens.kernels import gated_product as kernel
from gemmalens.layers import mlp

TOKENS = np.random.RandomState(0).randint(3, 200, size=(2, 9))


@pytest.fixture
def prompt_kernel(monkeypatch):
    """Sets `PROMPT_MLP_KERNEL` for one test, counting the blocks traced through the
    kernel's path; JAX's compiled programs are dropped on the way in and out (they keep
    the setting they were traced with)."""
    traced = []
    original = mlp._kernel_or_reference

    def counting(*args):
        traced.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(mlp, "_kernel_or_reference", counting)

    def use(setting: str) -> list:
        monkeypatch.setattr(mlp, "PROMPT_MLP_KERNEL", setting)
        jax.clear_caches()
        traced.clear()
        return traced

    yield use
    jax.clear_caches()


def _call(m, name):
    extra = {"decoder_tokens": TOKENS[:, :5]} if name == "t5gemma2" else {}
    return np.asarray(m(TOKENS, **extra))


def _gemma4_with_per_layer_inputs():
    """A tiny Gemma 4 E2B (per-layer inputs, shared keys and values; no teaching model)."""
    config = gl.preset("gemma4_e2b")
    config = config.replace(
        vocab_size=512,
        vocab_size_per_layer_input=512,
        hidden_size=64,
        hidden_size_per_layer_input=8,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_global_key_value_heads=1,
        head_dim=16,
        global_head_dim=32,
        intermediate_size=128,
        num_hidden_layers=7,
        layer_types=config.layer_types[:7],
        num_kv_shared_layers=2,
    )
    return gl.build(config)


@pytest.mark.parametrize("name", ["gemma3", "gemma3n", "gemma4_e2b", "gemma4_moe", "t5gemma2"])
def test_the_kernels_path_gives_the_plain_blocks_logits(prompt_kernel, name):
    m = _gemma4_with_per_layer_inputs() if name == "gemma4_e2b" else gl.teaching_model(name)
    for form in (m, m.stacked()):
        prompt_kernel("off")
        plain = _call(form, name)
        traced = prompt_kernel("reference")
        fused = _call(form, name)
        assert traced, f"{name}: no gated block took the kernel's path"
        np.testing.assert_array_equal(fused, plain)


def test_hooked_blocks_and_sparse_gates_keep_the_plain_path(prompt_kernel):
    m = gl.teaching_model("gemma3")
    layers = m.config.num_hidden_layers
    traced = prompt_kernel("reference")
    m(TOKENS)
    assert len(traced) == layers
    traced = prompt_kernel("reference")
    _, cache = m.run_with_cache(TOKENS, ["blocks.1.mlp.hook_pre", "blocks.*.mlp.hook_post"])
    assert len(traced) == layers - 1  # block 1's gate is captured: it runs unfused
    prompt_kernel("off")
    _, plain = m.run_with_cache(TOKENS, ["blocks.1.mlp.hook_pre", "blocks.*.mlp.hook_post"])
    for hook in plain:
        np.testing.assert_array_equal(np.asarray(cache[hook]), np.asarray(plain[hook]))

    # Gemma 3n's first blocks rewrite the gate (Gaussian top-k) before the activation.
    m3n = gl.teaching_model("gemma3n")
    sparse = sum(
        layer.gate_sparsity is not None
        for layer in pz.select(m3n.model).at_instances_of(mlp.GatedMLP).get_sequence()
    )
    assert sparse > 0
    traced = prompt_kernel("reference")
    m3n(TOKENS)
    assert len(traced) == m3n.config.num_hidden_layers - sparse


def test_sweeps_and_attribution_through_the_kernels_path(prompt_kernel):
    """`vmap` over patched runs (the batching rule) and `grad` (the derivative rule)."""
    m = gl.teaching_model("gemma3")
    corrupted = TOKENS.copy()
    corrupted[:, 4] = TOKENS[:, 2]

    def metric(logits):
        return logits[:, -1, 5].mean()

    results = {}
    for setting in ("off", "reference"):
        traced = prompt_kernel(setting)
        results[setting] = [
            np.asarray(patching.sweep(m, TOKENS, corrupted, metric, "resid_pre")),
            np.asarray(patching.attribution_patching(m, TOKENS, corrupted, metric)),
        ]
    assert traced
    for fused, plain in zip(results["reference"], results["off"], strict=True):
        np.testing.assert_allclose(fused, plain, rtol=1e-6, atol=1e-6)


def test_batching_rule_folds_shared_weights_into_rows_and_maps_the_rest(prompt_kernel):
    traced = prompt_kernel("reference")
    rng = np.random.RandomState(1)
    x = jnp.asarray(rng.randn(3, 4, 5, 16), jnp.float32)
    gate, up = (jnp.asarray(rng.randn(2, 32, 16), jnp.float32) for _ in range(2))
    expected = jax.vmap(mlp._gated_reference, in_axes=(0, None, None))(x, gate[0], up[0])
    np.testing.assert_allclose(
        jax.vmap(mlp._gated_product, in_axes=(0, None, None))(x, gate[0], up[0]),
        expected,
        rtol=1e-6,
    )
    assert traced[-1] == (3, 4, 5, 16)  # one call for the whole batch
    per_weights = jax.vmap(mlp._gated_product, in_axes=(None, 0, 0))(x[0], gate, up)
    np.testing.assert_allclose(
        per_weights, jax.vmap(mlp._gated_reference, (None, 0, 0))(x[0], gate, up), rtol=1e-6
    )
    grads = jax.grad(lambda g: mlp._gated_product(x, g, up[0]).sum())(gate[0])
    expected_grads = jax.grad(lambda g: mlp._gated_reference(x, g, up[0]).sum())(gate[0])
    np.testing.assert_allclose(grads, expected_grads, rtol=1e-5)


def test_an_unknown_setting_is_named(prompt_kernel):
    prompt_kernel("fast")
    with pytest.raises(ValueError, match="PROMPT_MLP_KERNEL 'fast'.*'auto', 'on', 'off'"):
        gl.teaching_model("gemma3")(TOKENS)


@pytest.mark.parametrize(
    "rows, d_model, d_mlp, tiling",
    [
        (4096, 5376, 21504, kernel.DEFAULT_TILING),  # Gemma 3 27B, 4096 tokens
        (256, 1152, 6912, kernel.DEFAULT_TILING),  # Gemma 3 1B
        (512, 256, 512, dataclasses.replace(kernel.DEFAULT_TILING, rows=128, hidden=64)),
    ],
)
def test_the_kernel_lowers_for_hopper(monkeypatch, rows, d_model, d_mlp, tiling):
    """Lowered for CUDA on any machine: Pallas checks the kernel's shapes, layouts and
    shared memory (232,448 bytes on a Hopper) at this step."""
    monkeypatch.setattr(kernel, "_sm_count", lambda: 132)
    assert kernel.supported(rows, d_model, d_mlp, tiling)
    x = jax.ShapeDtypeStruct((rows, d_model), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((d_mlp, d_model), jnp.bfloat16)
    lowered = (
        jax.jit(lambda a, b, c: kernel.gated_product(a, b, c, tiling))
        .trace(x, w, w)
        .lower(lowering_platforms=("cuda",))
    )
    text = lowered.as_text()
    assert "mosaic_gpu" in text and f"tensor<{rows}x{d_mlp}xbf16>" in text


def test_the_kernel_refuses_what_it_cannot_tile():
    assert not kernel.supported(100, 256, 512)  # rows: a multiple of 128
    assert not kernel.supported(256, 100, 512)  # d_model: a multiple of 64
    x = jnp.zeros((128, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"gate \(256, 64\) and up \(256, 32\)"):
        kernel.gated_product(x, jnp.zeros((256, 64), jnp.bfloat16), jnp.zeros((256, 32)))
    with pytest.raises(ValueError, match="one 16-bit dtype"):
        kernel.gated_product(x.astype(jnp.float32), jnp.zeros((256, 64)), jnp.zeros((256, 64)))
    with pytest.raises(ValueError, match="cannot tile rows=100"):
        w = jnp.zeros((256, 64), jnp.bfloat16)
        kernel.gated_product(jnp.zeros((100, 64), jnp.bfloat16), w, w)
