"""The mixture-of-experts layer under `jax.vmap` and `jax.grad`, and the patching analyses
that vmap (`patching.sweep`'s general form) or differentiate (`attribution_patching`) whole
forward passes of a Gemma 4 MoE model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz

import gemmalens as gl
from gemmalens import patching
from gemmalens.layers.moe import MixtureOfExperts, grouped_experts, grouped_matmul

TOKENS, WIDTH, D_EXPERT, EXPERTS, TOP_K = 5, 8, 6, 4, 2


def _close(got, expected, tolerance=1e-6):
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.shape == expected.shape
    scale = max(np.abs(expected).max(), 1e-30)
    assert np.abs(got - expected).max() <= tolerance * scale


@pytest.fixture(scope="module")
def routed():
    """Random expert inputs ``[3, 2, tokens, ...]`` and weights; expert 2 unused."""
    rng = np.random.RandomState(0)
    lead = (3, 2, TOKENS)
    x = rng.randn(*lead, WIDTH).astype(np.float32)
    indices = np.stack(
        [rng.choice([0, 1, 3], TOP_K, replace=False) for _ in range(int(np.prod(lead)))]
    )
    indices = indices.reshape(*lead, TOP_K).astype(np.int32)
    weights = rng.rand(*lead, EXPERTS).astype(np.float32)
    gate_up = rng.randn(EXPERTS, 2 * D_EXPERT, WIDTH).astype(np.float32)
    down = rng.randn(EXPERTS, WIDTH, D_EXPERT).astype(np.float32)
    return x, indices, weights, gate_up, down


def _every_expert(x, indices, weights, gate_up, down):
    """Dense reference: every expert on every token, masked to the chosen ones."""
    chosen = jax.nn.one_hot(indices, EXPERTS).sum(-2)  # [..., E]
    fused = jnp.einsum("eoh,...h->...eo", gate_up, x)
    gate, up = jnp.split(fused, 2, axis=-1)
    out = jnp.einsum("ehi,...ei->...eh", down, jax.nn.gelu(gate, approximate=True) * up)
    return jnp.einsum("...e,...eh->...h", weights * chosen, out)


def test_grouped_experts_vmap_equals_a_loop(routed):
    x, indices, weights, gate_up, down = routed

    def one(x, indices, weights):
        return grouped_experts(x, indices, weights, gate_up, down)

    # Leading axis.
    loop = np.stack([one(x[i], indices[i], weights[i]) for i in range(3)])
    _close(jax.vmap(one)(x, indices, weights), loop)
    _close(loop, _every_expert(x, indices, weights, gate_up, down), 1e-5)
    # A non-leading axis, in and out, with the weights shared (in_axes None).
    loop = np.stack([one(x[:, j], indices[:, j], weights[:, j]) for j in range(2)], axis=1)
    _close(jax.vmap(one, in_axes=1, out_axes=1)(x, indices, weights), loop)
    # Nested, over different axes, under jit: one token per innermost call.
    nested = jax.jit(jax.vmap(jax.vmap(jax.vmap(one), in_axes=1), in_axes=0))
    got = nested(x, indices, weights)  # [3, TOKENS, 2, WIDTH]
    loop = np.zeros(got.shape, np.float32)
    for a, t, b in np.ndindex(3, TOKENS, 2):
        loop[a, t, b] = one(x[a, b, t], indices[a, b, t], weights[a, b, t])
    _close(got, loop)
    # Only the routing batched; and batched weights (a vmap over parameters).
    _close(
        jax.vmap(lambda i, w: one(x[0], i, w))(indices, weights),
        np.stack([one(x[0], indices[i], weights[i]) for i in range(3)]),
    )
    stacked = np.stack([gate_up, gate_up[::-1], 2 * gate_up])
    by_params = jax.vmap(lambda g: grouped_experts(x[0], indices[0], weights[0], g, down))
    _close(
        by_params(stacked),
        np.stack([grouped_experts(x[0], indices[0], weights[0], g, down) for g in stacked]),
    )


def test_grouped_matmul_vmap_with_batched_group_sizes():
    """Different groupings per batch entry, including rows past the groups (zeros)."""
    rng = np.random.RandomState(1)
    lhs = rng.randn(3, 7, 4).astype(np.float32)
    rhs = rng.randn(3, 5, 4).astype(np.float32)
    sizes = np.array([[2, 0, 5], [1, 3, 1], [0, 0, 4]], np.int32)  # last sums to 4 < 7
    got = jax.vmap(grouped_matmul, in_axes=(0, None, 0))(lhs, rhs, sizes)
    expected = np.zeros((3, 7, 5), np.float32)
    for b in range(3):
        row = 0
        for g, size in enumerate(sizes[b]):
            expected[b, row : row + size] = lhs[b, row : row + size] @ rhs[g].T
            row += size
    _close(got, expected)

    # And its gradient, against the dense product masked by group.
    def dense(lhs, rhs, sizes):
        ends = np.cumsum(sizes)
        group = np.searchsorted(ends, np.arange(7), side="right")
        mask = jax.nn.one_hot(group, 3)  # rows past the groups: all zero
        return jnp.einsum("rg,rk,gnk->rn", mask, lhs, rhs)

    def loss(f, lhs, rhs):
        return sum(jnp.sum(jnp.sin(f(lhs[b], rhs, sizes[b]))) for b in range(3))

    def vmapped_loss(lhs, rhs):
        out = jax.vmap(grouped_matmul, in_axes=(0, None, 0))(lhs, rhs, sizes)
        return jnp.sum(jnp.sin(out))

    for got, expected in zip(
        jax.grad(vmapped_loss, (0, 1))(lhs, rhs),
        jax.grad(lambda a, b: loss(dense, a, b), (0, 1))(lhs, rhs),
    ):
        _close(got, expected, 1e-5)


def test_grad_through_vmapped_experts_equals_the_loop(routed):
    x, indices, weights, gate_up, down = routed

    def vmapped(x, weights, gate_up, down):
        out = jax.vmap(
            lambda a, i, w: grouped_experts(a, i, w, gate_up, down), in_axes=1, out_axes=1
        )(x, indices, weights)
        return jnp.sum(jnp.sin(out))

    def loop(x, weights, gate_up, down):
        total = 0.0
        for j in range(2):
            out = grouped_experts(x[:, j], indices[:, j], weights[:, j], gate_up, down)
            total = total + jnp.sum(jnp.sin(out))
        return total

    def dense(x, weights, gate_up, down):
        return jnp.sum(jnp.sin(_every_expert(x, indices, weights, gate_up, down)))

    args = (x, weights, gate_up, down)
    got = jax.jit(jax.grad(vmapped, argnums=(0, 1, 2, 3)))(*args)
    for got_, loop_, dense_ in zip(
        got,
        jax.grad(loop, argnums=(0, 1, 2, 3))(*args),
        jax.grad(dense, argnums=(0, 1, 2, 3))(*args),
    ):
        _close(got_, loop_, 1e-5)  # sums over rows in another order
        _close(got_, dense_, 1e-5)


# ------------------------------------------------------------------ on the MoE model


@pytest.fixture(scope="module")
def model():
    return gl.teaching_model("gemma4_moe")


def test_moe_layer_vmap_and_grad_equal_a_loop(model):
    layer = pz.select(model._frozen).at_instances_of(MixtureOfExperts).get_sequence()[0]
    rng = np.random.RandomState(2)
    x = rng.randn(3, 2, 4, model.config.hidden_size).astype(np.float32)

    @jax.jit
    def run(x):  # [batch, seq, embedding]
        return layer(pz.nx.wrap(x).tag("batch", "seq", "embedding")).unwrap(
            "batch", "seq", "embedding"
        )

    loop = np.stack([run(x[:, j]) for j in range(2)], axis=1)
    _close(jax.jit(jax.vmap(run, in_axes=1, out_axes=1))(x), loop)
    nested = jax.jit(jax.vmap(jax.vmap(run)))(x[:, :, None])
    _close(nested, np.asarray(run(x.reshape(6, 4, -1))).reshape(3, 2, 1, 4, -1))

    def loss_vmapped(x):
        return jnp.sum(jnp.sin(jax.vmap(run, in_axes=1, out_axes=1)(x)))

    def loss_loop(x):
        return sum(jnp.sum(jnp.sin(run(x[:, j]))) for j in range(2))

    _close(jax.jit(jax.grad(loss_vmapped))(x), jax.jit(jax.grad(loss_loop))(x), 1e-5)


CLEAN, CORRUPTED = "Bob gave a book to", "Alice gave a book to"


@pytest.fixture(scope="module")
def prompts(model):
    clean, _ = model.to_tokens(CLEAN)
    corrupted, _ = model.to_tokens(CORRUPTED)
    assert clean.shape == corrupted.shape
    clean_logits, corrupted_logits = np.asarray(model(clean)), np.asarray(model(corrupted))
    good, bad = int(clean_logits[0, -1].argmax()), int(corrupted_logits[0, -1].argmax())
    if good == bad:
        bad = int(np.argsort(clean_logits[0, -1])[-2])

    def metric(logits):
        return logits[0, -1, good] - logits[0, -1, bad]

    return np.asarray(clean), np.asarray(corrupted), metric


def _loop_sweep(model, clean, corrupted, metric, site):
    """The reference: `run_with_hooks` on the corrupted prompt with the clean run's value
    (numpy) put back at one site per batch row, rows being independent runs: row
    ``layer * seq + p`` patches position p of that layer. One hook function serves every
    layer (it reads the layer off the hook name), so this compiles once."""
    names = patching.site_names(model, site)
    _, cache = model.run_with_cache(clean, names=list(names))
    clean_values = {name: np.asarray(cache[name])[0] for name in names}  # [seq, ...]
    layers, seq = len(names), clean.shape[1]

    def put_back(value, name):
        rows = names.index(name) * seq + np.arange(seq)
        return value.at[rows, np.arange(seq)].set(jnp.asarray(clean_values[name]))

    runs = np.repeat(corrupted, layers * seq, axis=0)
    logits = np.asarray(model.run_with_hooks(runs, {n: put_back for n in names}))
    scores = [float(metric(jnp.asarray(logits[r : r + 1]))) for r in range(layers * seq)]
    return np.array(scores, np.float32).reshape(layers, seq)


@pytest.mark.parametrize("site", ["resid_pre", "mlp_out"])
def test_sweep_equals_a_loop_of_run_with_hooks(model, prompts, site):
    clean, corrupted, metric = prompts
    got = np.asarray(patching.sweep(model, clean, corrupted, metric, site=site))
    expected = _loop_sweep(model, clean, corrupted, metric, site)
    assert got.shape == (model.config.num_hidden_layers, clean.shape[1])
    _close(got, expected, 1e-4)
    # Not a constant table: the patches do something.
    assert np.ptp(expected) > 1e-2


def test_patching_the_clean_run_into_itself_changes_nothing(model, prompts):
    clean, _, metric = prompts
    got = np.asarray(patching.sweep(model, clean, clean, metric, site="resid_pre"))
    clean_metric = float(metric(model(clean)))
    _close(got, np.full(got.shape, clean_metric), 1e-4)


def test_attribution_patching_runs_on_the_moe_model(model, prompts):
    clean, corrupted, metric = prompts
    got = np.asarray(patching.attribution_patching(model, clean, corrupted, metric))
    assert got.shape == (model.config.num_hidden_layers, clean.shape[1])
    assert np.isfinite(got).all()
    # Positions before the first difference are equal in both runs: no attribution there.
    assert (got[:, 0] == 0).all()
    assert np.abs(got).max() > 0
