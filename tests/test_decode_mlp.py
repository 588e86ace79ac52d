"""The decode feed-forward kernel (Pallas), run in Pallas' interpreter on the CPU: against a
plain float32 computation, and inside generation (`sampling.KernelMLP`) against
transformers, with hooked layers falling back to the plain block."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz

import gemmalens as gl
from gemmalens import sampling
from gemmalens.kernels import decode_attention
from gemmalens.kernels import decode_mlp as kernel
from gemmalens.layers.mlp import GatedMLP
from tests import hf_reference as ref
from tests.pallas_blocks import edge_block_accesses
from tests.test_generation import PROMPTS, _hf_generate

NEW_TOKENS = 6


def _reference(x, w_gate, w_up, w_down):
    x, w_gate, w_up, w_down = (np.asarray(a, np.float64) for a in (x, w_gate, w_up, w_down))
    gate = x @ w_gate.T
    gelu = 0.5 * gate * (1 + np.tanh(np.sqrt(2 / np.pi) * (gate + 0.044715 * gate**3)))
    return (gelu * (x @ w_up.T)) @ w_down.T


def _inputs(rows, d_model, d_mlp, dtype=jnp.float32, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.randn(rows, d_model)
    w_gate = rng.randn(d_mlp, d_model) / np.sqrt(d_model)
    w_up = rng.randn(d_mlp, d_model) / np.sqrt(d_model)
    w_down = rng.randn(d_model, d_mlp) / np.sqrt(d_mlp)
    return tuple(jnp.asarray(a, dtype) for a in (x, w_gate, w_up, w_down))


def _launches(*args) -> dict[str, tuple]:
    """{kernel name: (grid, output shape)} of the Pallas calls `gated_mlp` makes."""
    found = {}

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                grid = tuple(eqn.params["grid_mapping"].grid)
                found[eqn.params["name"]] = (grid, tuple(eqn.outvars[0].aval.shape))
            for param in eqn.params.values():
                if hasattr(param, "jaxpr") and hasattr(param, "consts"):
                    walk(param.jaxpr)

    walk(jax.make_jaxpr(lambda *a: kernel.gated_mlp(*a, interpret=True))(*args).jaxpr)
    return found


@pytest.mark.parametrize(
    "rows, d_model, d_mlp, gate_up_programs, down_splits",
    [
        (1, 64, 128, 2, 1),  # one row; the tiny test model's sizes
        (3, 48, 80, 5, 1),  # blocks of 16 (not the largest choice), loops of several blocks
        (8, 128, 768, 12, 6),  # down projection split six ways (split-K)
        (16, 64, 1536, 24, 6),  # all 16 rows; six splits of two blocks each
        (5, 96, 192, 3, 3),  # three splits; 32-wide input blocks
    ],
)
def test_kernel_equals_the_plain_computation(rows, d_model, d_mlp, gate_up_programs, down_splits):
    args = _inputs(rows, d_model, d_mlp)
    out = kernel.gated_mlp(*args, interpret=True)
    want = _reference(*args)
    assert out.shape == (rows, d_model) and out.dtype == jnp.float32
    scale = np.abs(want).max()
    assert scale > 0.1, "an all-zero output would prove little"
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5 * scale)
    # The case exercises the tiling it is meant to (see the comments above).
    launches = _launches(*args)
    assert launches["gemmalens_decode_gate_up"][0] == (gate_up_programs,)
    # Blocks of 16 rows over ``rows`` rows: nothing padded before, nothing sliced after.
    assert launches["gemmalens_decode_down"][1] == (down_splits, rows, d_model)
    outside = {eqn.primitive.name for eqn in _top_level(*args)}
    assert "pallas_call" in outside and not outside & {"pad", "slice"}, outside


def _top_level(*args) -> list:
    """The equations of `gated_mlp`'s program outside its kernels (inside its jit)."""
    jaxpr = jax.make_jaxpr(lambda *a: kernel.gated_mlp(*a, interpret=True))(*args).jaxpr
    (jitted,) = [eqn for eqn in jaxpr.eqns if eqn.primitive.name in ("pjit", "jit")]
    return jitted.params["jaxpr"].jaxpr.eqns


@pytest.mark.parametrize("rows", [1, 3, 8, 15])
def test_blocks_past_the_last_row_are_masked(rows):
    # Pallas' Triton lowering masks only where a kernel asks, and the interpreter pads edge
    # blocks, so the tests above would pass even if the GPU kernels read and wrote past the
    # buffers. Each kernel's 16-row blocks over fewer rows (its input and its output) must
    # be read and written with a mask, and only so.
    args = _inputs(rows, 64, 256)
    accesses = edge_block_accesses(lambda *a: kernel.gated_mlp(*a), *args)
    want = {
        "gemmalens_decode_gate_up": {0: ["masked_load with mask"], 3: ["masked_swap with mask"]},
        "gemmalens_decode_down": {0: ["masked_load with mask"], 2: ["masked_swap with mask"]},
    }
    assert accesses == want


def test_no_block_is_past_the_edge_at_sixteen_rows():
    accesses = edge_block_accesses(lambda *a: kernel.gated_mlp(*a), *_inputs(16, 64, 256))
    assert accesses == {"gemmalens_decode_gate_up": {}, "gemmalens_decode_down": {}}


@pytest.mark.parametrize("rows, d_model, d_mlp", [(2, 64, 128), (11, 128, 768)])
def test_bfloat16_inputs(rows, d_model, d_mlp):
    args = _inputs(rows, d_model, d_mlp, dtype=jnp.bfloat16, seed=1)
    out = kernel.gated_mlp(*args, interpret=True)
    assert out.shape == (rows, d_model) and out.dtype == jnp.bfloat16
    # The reference from the same (bf16-rounded) values, in float64.
    want = _reference(*(np.asarray(a.astype(jnp.float32)) for a in args))
    scale = np.abs(want).max()
    np.testing.assert_allclose(
        np.asarray(out.astype(jnp.float32)), want, rtol=2e-2, atol=1e-2 * scale
    )


def test_shape_limits():
    assert kernel.MAX_ROWS == 16
    assert kernel.supported(1, 64, 128)
    assert kernel.supported(16, 1152, 6912)  # Gemma 3 1B
    assert kernel.supported(16, 48, 80)
    assert not kernel.supported(0, 64, 128)
    assert not kernel.supported(17, 64, 128)
    assert not kernel.supported(4, 40, 128)  # d_model not a multiple of 16
    assert not kernel.supported(4, 64, 72)  # d_mlp not a multiple of 16


@pytest.mark.parametrize(
    "rows, d_model, d_mlp, named",
    [(17, 64, 128, "17 rows"), (4, 40, 128, "d_model 40"), (4, 64, 72, "d_mlp 72")],
)
def test_unsupported_sizes_are_refused_clearly(rows, d_model, d_mlp, named):
    args = _inputs(rows, d_model, d_mlp)
    with pytest.raises(ValueError, match=f"cannot tile.*{named}") as error:
        kernel.gated_mlp(*args, interpret=True)
    assert "at most 16 rows and sizes divisible by 16" in str(error.value)


@pytest.fixture(scope="module")
def hf_and_directory(tmp_path_factory):
    directory = tmp_path_factory.mktemp("mlp-kernel-gen")
    return ref.gemma3_text(directory, perturbation=0.6, post_norm_gain=10.0), directory


@pytest.fixture(scope="module")
def hf_tokens(hf_and_directory):
    hf_model, _ = hf_and_directory
    return _hf_generate(hf_model, PROMPTS, NEW_TOKENS)


@pytest.fixture
def model(hf_and_directory):
    return gl.load(hf_and_directory[1])


@pytest.fixture
def kernel_calls(monkeypatch):
    """Runs generation with the MLP kernel in the interpreter and counts its (trace-time)
    uses: one per layer whose decode step runs it."""
    calls = []
    original = kernel.gated_mlp

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(kernel, "gated_mlp", counted)
    monkeypatch.setattr(sampling, "DECODE_MLP_KERNEL", "interpret")
    # Calls are counted while tracing: a program compiled by an earlier test (same shapes,
    # same tree) would not be traced again.
    sampling._generate_program.clear_cache()
    return calls


@pytest.mark.parametrize("attention_kernel", ["off", "interpret"])
def test_generation_with_the_kernel_matches_transformers(
    model, hf_tokens, kernel_calls, attention_kernel, monkeypatch
):
    attention_calls = []
    original = decode_attention.decode_attention

    def counted(*args, **kwargs):
        attention_calls.append(kwargs.get("window"))
        return original(*args, **kwargs)

    monkeypatch.setattr(decode_attention, "decode_attention", counted)
    monkeypatch.setattr(sampling, "DECODE_ATTENTION_KERNEL", attention_kernel)
    ours = np.asarray(model.generate(PROMPTS, NEW_TOKENS, stop_at_eos=False).tokens)
    layers = model.config.num_hidden_layers
    # Every layer's decode step (one token per row) used the kernel; the prompt did not.
    assert kernel_calls == [(len(PROMPTS), model.config.hidden_size)] * layers
    assert len(attention_calls) == (layers if attention_kernel == "interpret" else 0)
    np.testing.assert_array_equal(ours, hf_tokens)
    assert all(len(set(row)) > 2 for row in ours.tolist()), "degenerate output proves little"


def test_captured_hook_points_fall_back_to_the_plain_block(model, hf_tokens, kernel_calls):
    out = model.generate(PROMPTS, NEW_TOKENS, stop_at_eos=False, capture=["blocks.0.mlp.hook_post"])
    # Layer 0's activation is captured, so only the other layers may use the kernel.
    assert len(kernel_calls) == model.config.num_hidden_layers - 1
    steps = np.asarray(out.step_cache["blocks.0.mlp.hook_post"])
    assert steps.shape == (NEW_TOKENS, len(PROMPTS), 1, model.config.intermediate_size)
    assert np.isfinite(steps).all() and np.abs(steps).max() > 0
    np.testing.assert_array_equal(np.asarray(out.tokens), hf_tokens)


def test_interventions_fall_back_and_still_apply(model, hf_tokens, kernel_calls, monkeypatch):
    def ablate(value, name):
        return jnp.zeros_like(value)

    hooks = {"blocks.1.mlp.hook_post": ablate}
    hooked = np.asarray(model.generate(PROMPTS, NEW_TOKENS, stop_at_eos=False, hooks=hooks).tokens)
    assert len(kernel_calls) == model.config.num_hidden_layers - 1
    assert not np.array_equal(hooked, hf_tokens), "the ablation should change the output"
    # Without the kernel the same intervention gives the same tokens.
    monkeypatch.setattr(sampling, "DECODE_MLP_KERNEL", "off")
    plain = model.generate(PROMPTS, NEW_TOKENS, stop_at_eos=False, hooks=hooks).tokens
    np.testing.assert_array_equal(hooked, np.asarray(plain))


def _first_kernel_mlp(model, batch, setting):
    cached = sampling.with_kv_cache(model.model, batch, 8, "off", setting)
    layers = pz.select(cached).at_instances_of(sampling.KernelMLP).get_sequence()
    if setting == "off":
        assert not layers, "'off' leaves the feed-forward blocks as they are"
        mlp = pz.select(cached).at_instances_of(GatedMLP).get_sequence()[0]
        return sampling.KernelMLP(mlp, setting)
    return layers[0]


def _activations(layer, batch, seq=1, dtype=None):
    weights = layer.mlp.gate_proj.weights.value
    shape = (batch, seq, weights.named_shape["embedding"])
    return pz.nx.wrap(jnp.ones(shape, dtype or weights.dtype)).tag("batch", "seq", "embedding")


def test_auto_uses_the_kernel_on_gpus_from_batch_two(model, monkeypatch):
    assert sampling.DECODE_MLP_KERNEL == "auto"

    def decides(setting, batch, backend, seq=1):
        monkeypatch.setattr(jax, "default_backend", lambda: backend)
        layer = _first_kernel_mlp(model, batch, setting)
        return layer._kernel_applies(_activations(layer, batch, seq))

    assert not decides("auto", 1, "gpu")  # one row: XLA's kernels are faster
    assert decides("auto", 2, "gpu")
    assert decides("auto", 16, "gpu")
    assert not decides("auto", 2, "cpu")  # Triton kernels need a GPU
    assert decides("on", 1, "gpu")
    assert not decides("off", 8, "gpu")
    assert decides("interpret", 1, "cpu")
    assert not decides("on", 17, "gpu")  # more rows than the kernel tiles
    assert not decides("interpret", 2, "cpu", seq=2)  # a prompt, not a decode step


def test_other_blocks_fall_back(model):
    layer = _first_kernel_mlp(model, 2, "interpret")
    x = _activations(layer, 2)
    assert layer._kernel_applies(x)
    assert not layer._kernel_applies(_activations(layer, 2, dtype=jnp.bfloat16))
    sparse = dataclasses.replace(
        layer, mlp=dataclasses.replace(layer.mlp, gate_sparsity=pz.nn.Identity())
    )
    assert not sparse._kernel_applies(x)
    # The kernel's path and the plain block agree on this layer (outputs of order 100: the
    # test model's weights are large).
    values = np.random.RandomState(2).randn(*x.unwrap("batch", "seq", "embedding").shape)
    x = pz.nx.wrap(jnp.asarray(values, x.dtype)).tag("batch", "seq", "embedding")
    out = np.asarray(layer(x).unwrap("batch", "seq", "embedding"))
    want = np.asarray(layer.mlp(x).unwrap("batch", "seq", "embedding"))
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_an_unknown_kernel_setting_is_named(model, monkeypatch):
    monkeypatch.setattr(sampling, "DECODE_MLP_KERNEL", "yes")
    with pytest.raises(
        ValueError, match=r"'yes'.*'auto', 'on', 'off', 'interpret'.*DECODE_MLP_KERNEL"
    ):
        model.generate(PROMPTS, max_new_tokens=2)


def test_changing_the_setting_prepares_generation_again(model, kernel_calls, monkeypatch):
    monkeypatch.setattr(sampling, "DECODE_MLP_KERNEL", "off")
    off = np.asarray(model.generate(PROMPTS, NEW_TOKENS, stop_at_eos=False).tokens)
    assert kernel_calls == []
    monkeypatch.setattr(sampling, "DECODE_MLP_KERNEL", "interpret")
    on = np.asarray(model.generate(PROMPTS, NEW_TOKENS, stop_at_eos=False).tokens)
    assert len(kernel_calls) == model.config.num_hidden_layers  # not the program made "off"
    np.testing.assert_array_equal(on, off)
