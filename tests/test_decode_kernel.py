"""The decode-attention kernel (Pallas), run in Pallas' interpreter on the CPU: against a
plain computation of the same step, and inside generation against transformers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz

import gemmalens as gl
from gemmalens import sampling
from gemmalens.kernels import decode_attention as kernel
from tests import hf_reference as ref
from tests.pallas_blocks import edge_block_accesses
from tests.test_generation import PROMPTS, _hf_generate


def _reference_step(
    query, new_key, new_value, position, cache_positions, keys, values, scale, window
):
    """Write the new entry at slot position % length, then softmax attention over the
    visible slots (the layer's mask rule), in float32."""
    batch, length, kv_heads, _ = keys.shape
    rows = jnp.arange(batch)
    slot = position % length
    keys = keys.at[rows, slot].set(new_key)
    values = values.at[rows, slot].set(new_value)
    cache_positions = cache_positions.at[rows, slot].set(position)
    visible = (cache_positions >= 0) & (cache_positions <= position[:, None])
    if window is not None:
        visible &= position[:, None] - cache_positions < window
    group = query.shape[1] // kv_heads
    k = jnp.repeat(keys, group, axis=2)
    v = jnp.repeat(values, group, axis=2)
    scores = jnp.einsum("bhd,blhd->bhl", query, k) * scale
    scores = jnp.where(visible[:, None, :], scores, -jnp.inf)
    return jnp.einsum("bhl,blhd->bhd", jax.nn.softmax(scores, axis=-1), v), keys, values


def _ring_buffer_state(rng, batch, length, kv_heads, head_dim, positions):
    """Caches as generation leaves them: slot j holds the latest earlier position p with
    p % length == j; row 0 also has a padding hole (position -1)."""
    keys = rng.randn(batch, length, kv_heads, head_dim).astype(np.float32)
    values = rng.randn(batch, length, kv_heads, head_dim).astype(np.float32)
    cache_positions = np.full((batch, length), -1, np.int32)
    for row, position in enumerate(positions):
        for p in range(position):
            cache_positions[row, p % length] = p
    cache_positions[0, 1] = -1
    return jnp.asarray(keys), jnp.asarray(values), jnp.asarray(cache_positions)


@pytest.mark.parametrize(
    "batch, length, kv_heads, heads, head_dim, window, splits, block_k",
    [
        (3, 20, 1, 4, 16, None, 1, 16),  # global layer, one program per row
        (3, 20, 2, 4, 16, 8, 3, 16),  # sliding window, keys split over 3 programs
        (2, 40, 1, 2, 32, 16, 2, 16),  # ring buffer of the window, wrapped
        (2, 33, 2, 8, 16, None, 4, 32),  # length not a multiple of the block
    ],
)
def test_kernel_equals_the_plain_step(
    batch, length, kv_heads, heads, head_dim, window, splits, block_k
):
    rng = np.random.RandomState(0)
    # Positions before, at and past the cache length (wrapped ring buffers).
    positions = jnp.asarray(rng.randint(0, 2 * length, batch), jnp.int32)
    keys, values, cache_positions = _ring_buffer_state(
        rng, batch, length, kv_heads, head_dim, np.asarray(positions)
    )
    query = jnp.asarray(rng.randn(batch, heads, head_dim), jnp.float32)
    new_key = jnp.asarray(rng.randn(batch, kv_heads, head_dim), jnp.float32)
    new_value = jnp.asarray(rng.randn(batch, kv_heads, head_dim), jnp.float32)
    args = (query, new_key, new_value, positions, cache_positions, keys, values)
    want_z, want_keys, want_values = _reference_step(*args, scale=0.3, window=window)
    z, new_keys, new_values = kernel.decode_attention(
        *args, scale=0.3, window=window, splits=splits, block_k=block_k, interpret=True
    )
    np.testing.assert_allclose(np.asarray(z), np.asarray(want_z), atol=2e-6, rtol=1e-5)
    # The cache changes in exactly one slot per row: the new entry.
    np.testing.assert_array_equal(np.asarray(new_keys), np.asarray(want_keys))
    np.testing.assert_array_equal(np.asarray(new_values), np.asarray(want_values))
    assert np.abs(np.asarray(z)).max() > 0.1, "an all-zero output would prove little"


@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (8, 1), (2, 2)])
def test_the_query_block_past_the_group_is_read_masked(heads, kv_heads):
    # The kernel reads the query heads of one KV head as a block of 16 rows (tensor-core
    # tiles); past the group's heads that block runs off the array, and Pallas' Triton
    # lowering masks only where the kernel asks (the interpreter pads instead, so the test
    # above cannot see it). That read must be masked, and nothing else may run past an edge
    # (the outputs are 16 rows wide and sliced afterwards).
    batch, length, head_dim = 2, 32, 16
    rng = np.random.RandomState(0)
    positions = jnp.asarray([3, 40], jnp.int32)
    keys, values, cache_positions = _ring_buffer_state(
        rng, batch, length, kv_heads, head_dim, np.asarray(positions)
    )
    query = jnp.asarray(rng.randn(batch, heads, head_dim), jnp.float32)
    new_key = jnp.asarray(rng.randn(batch, kv_heads, head_dim), jnp.float32)
    args = (query, new_key, new_key, positions, cache_positions, keys, values)
    accesses = edge_block_accesses(
        lambda *a: kernel.decode_attention(*a, scale=0.3, block_k=16), *args
    )
    assert accesses == {"gemmalens_decode_attention": {0: ["masked_load with mask"]}}


def test_launch_settings_fit_shared_memory():
    # Gemma 3 in bfloat16 keeps the tuned blocks; float32 or wider heads get smaller ones
    # (a float32 cache of 256-wide heads once asked for more shared memory than an H100 has).
    assert kernel.launch_settings(512) == dict(splits=2, block_k=64, num_stages=3)
    for length, head_dim, itemsize in [(512, 256, 4), (8192, 512, 2), (4096, 512, 4)]:
        settings = kernel.launch_settings(length, head_dim, itemsize)
        blocks = settings["num_stages"] * settings["block_k"] * head_dim * itemsize * 2
        assert blocks <= 200 * 1024 and settings["block_k"] >= 16


def test_kernel_shape_limits():
    assert kernel.supported(head_dim=256, heads_per_kv_head=4)
    assert not kernel.supported(head_dim=24, heads_per_kv_head=4)  # not a power of two
    assert not kernel.supported(head_dim=8, heads_per_kv_head=4)  # below a tensor-core tile


@pytest.fixture(scope="module")
def hf_and_directory(tmp_path_factory):
    directory = tmp_path_factory.mktemp("kernel-gen")
    return ref.gemma3_text(directory, perturbation=0.6, post_norm_gain=10.0), directory


@pytest.fixture
def kernel_calls(monkeypatch):
    """Runs generation with the kernel in the interpreter and counts its (trace-time) uses."""
    calls = []
    original = kernel.decode_attention

    def counted(*args, **kwargs):
        calls.append(kwargs.get("window"))
        return original(*args, **kwargs)

    monkeypatch.setattr(kernel, "decode_attention", counted)
    monkeypatch.setattr(sampling, "DECODE_ATTENTION_KERNEL", "interpret")
    return calls


def test_generation_with_the_kernel_matches_transformers(hf_and_directory, kernel_calls):
    hf_model, directory = hf_and_directory
    model = gl.load(directory)
    ours = np.asarray(model.generate(PROMPTS, max_new_tokens=12, stop_at_eos=False).tokens)
    # Every attention layer of the decode step used the kernel (sliding and global ones).
    num_layers = model.config.num_hidden_layers
    assert len(kernel_calls) == num_layers
    assert None in kernel_calls and any(w is not None for w in kernel_calls)
    np.testing.assert_array_equal(ours, _hf_generate(hf_model, PROMPTS, 12))


def test_changing_the_setting_prepares_generation_again(
    hf_and_directory, kernel_calls, monkeypatch
):
    _, directory = hf_and_directory
    model = gl.load(directory)
    monkeypatch.setattr(sampling, "DECODE_ATTENTION_KERNEL", "off")
    off = np.asarray(model.generate(PROMPTS, max_new_tokens=4, stop_at_eos=False).tokens)
    assert kernel_calls == []
    monkeypatch.setattr(sampling, "DECODE_ATTENTION_KERNEL", "interpret")
    on = np.asarray(model.generate(PROMPTS, max_new_tokens=4, stop_at_eos=False).tokens)
    assert len(kernel_calls) == model.config.num_hidden_layers  # not the program made "off"
    np.testing.assert_array_equal(on, off)


def test_hooked_patterns_fall_back_to_explicit_attention(hf_and_directory, kernel_calls):
    _, directory = hf_and_directory
    model = gl.load(directory)
    out = model.generate(
        PROMPTS, max_new_tokens=4, stop_at_eos=False, capture=["blocks.0.attn.hook_pattern"]
    )
    # Layer 0's weights are captured, so only the other layers may use the kernel.
    assert len(kernel_calls) == model.config.num_hidden_layers - 1
    step_patterns = out.step_cache["blocks.0.attn.hook_pattern"]
    np.testing.assert_allclose(np.asarray(step_patterns).sum(-1), 1.0, atol=1e-5)


def test_auto_uses_the_kernel_on_gpus_from_batch_two(hf_and_directory, monkeypatch):
    _, directory = hf_and_directory
    model = gl.load(directory)
    assert sampling.DECODE_ATTENTION_KERNEL == "auto"

    def decides(kernel_setting, batch, backend):
        monkeypatch.setattr(jax, "default_backend", lambda: backend)
        cached = sampling.with_kv_cache(model.model, batch, 8, kernel_setting)
        layer = pz.select(cached).at_instances_of(sampling.CachingAttention).get_sequence()[0]
        tokens = pz.nx.wrap(jnp.ones((batch, 1), jnp.int32)).tag("batch", "seq")
        x = model.model.embed(tokens)
        q, k = (
            layer.attention.query(x, token_positions=tokens),
            layer.attention.key(x, token_positions=tokens),
        )
        return layer._kernel_applies(q, k, layer.cache.value)

    assert not decides("auto", 1, "gpu")  # batch 1: XLA's kernels were faster
    assert decides("auto", 2, "gpu")
    assert not decides("auto", 2, "cpu")  # Triton kernels need a GPU
    assert decides("on", 1, "gpu")
    assert not decides("off", 8, "gpu")
    assert decides("interpret", 1, "cpu")


def test_an_unknown_kernel_setting_is_named(hf_and_directory, monkeypatch):
    _, directory = hf_and_directory
    monkeypatch.setattr(sampling, "DECODE_ATTENTION_KERNEL", "yes")
    with pytest.raises(ValueError, match="'yes'.*'auto', 'on', 'off', 'interpret'"):
        gl.load(directory).generate(PROMPTS, max_new_tokens=2)
