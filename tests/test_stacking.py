"""Stacked layers (`gemmalens.layers.stacking`, ``Model.stacked``, ``stack_layers=True``)
give what the per-layer model gives, on every family: logits, every hook's captured value,
interventions inside a scanned run, patching sweeps, attribution patching, generation and
saved checkpoints. The per-layer model is itself checked against transformers elsewhere
(the parity tests); here each family's tiny checkpoint is laid out so that its blocks do
repeat, and a test fails if nothing runs as a loop.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz

import gemmalens as gl
from gemmalens import patching
from gemmalens.checkpoints.save import save_checkpoint
from gemmalens.layers import stacking
from tests import hf_reference as ref

S, F = "sliding_attention", "full_attention"
TOKENS = np.random.RandomState(5).randint(3, 250, (2, 9))
DECODER_TOKENS = np.random.RandomState(6).randint(3, 250, (2, 6))
# Relative to each value's largest entry: float32 rounding of a reordered computation.
RELATIVE = 2e-5

BUILDERS = {
    # Seven layers: 5 local + 1 global, then a local one alone.
    "gemma3": lambda d: ref.gemma3_text(d),
    # Per-layer inputs, AltUp, LAuReL and KV sharing; layers 0-3 repeat [S, F] (the same
    # MLP width and sparsity), 4-5 publish keys and values, 6-7 read them.
    "gemma3n": lambda d: ref.gemma3n_text(
        d,
        num_hidden_layers=8,
        layer_types=[S, F] * 4,
        intermediate_size=[96] * 8,
        activation_sparsity_pattern=[0.95] * 4 + [0.0] * 4,
    ),
    "gemma4_e2b": lambda d: ref.gemma4_text(
        d, moe=False, num_hidden_layers=8, layer_types=[S, F] * 4
    ),
    "gemma4_moe": lambda d: ref.gemma4_text(d, moe=True),
    "t5gemma2": lambda d: ref.t5gemma2(
        d,
        encoder=dict(num_hidden_layers=4, layer_types=[S, F, S, F]),
        decoder=dict(num_hidden_layers=4, layer_types=[S, F, S, F]),
    ),
}
FAMILIES = list(BUILDERS)


def streams(name: str) -> dict:
    return {"decoder_tokens": DECODER_TOKENS} if name == "t5gemma2" else {}


def close(a, b, relative=RELATIVE) -> None:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    finite = np.isfinite(a)
    np.testing.assert_array_equal(finite, np.isfinite(b))
    scale = max(np.abs(a[finite]).max(initial=0.0), 1e-6)
    assert np.abs(a[finite] - b[finite]).max(initial=0.0) <= relative * scale


class Pair:
    def __init__(self, name, directory):
        self.name = name
        self.directory = directory
        self.plain = gl.load(directory)
        self.stacked = gl.load(directory, stack_layers=True)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return ref.on_demand(tmp_path_factory, BUILDERS, Pair)


def scanned_layers(m) -> dict[str, list[int]]:
    """The layers of each stack that run inside a loop."""
    out = {}
    for stack, plan in stacking.runs(m.model).items():
        out[stack] = [
            layer
            for kind, start, *rest in plan
            if kind == "scan"
            for layer in range(start, start + rest[0] * rest[1])
        ]
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_and_every_hook_agree(pairs, name):
    pair = pairs(name)
    assert pair.stacked.is_stacked and not pair.plain.is_stacked
    scanned = scanned_layers(pair.stacked)
    assert any(len(layers) >= 2 for layers in scanned.values()), stacking.runs(pair.stacked.model)
    close(pair.plain(TOKENS, **streams(name)), pair.stacked(TOKENS, **streams(name)))
    plain_logits, plain_cache = pair.plain.run_with_cache(TOKENS, **streams(name))
    logits, cache = pair.stacked.run_with_cache(TOKENS, **streams(name))
    close(plain_logits, logits)
    assert list(cache.keys()) == list(plain_cache.keys())
    for hook in plain_cache.keys():
        close(plain_cache[hook], cache[hook])


def test_plans_follow_each_family_pattern(pairs):
    """Which layers loop, family by family (the tiny layouts above)."""
    assert stacking.runs(pairs("gemma3").stacked.model) == {
        "blocks": [("scan", 0, 1, 5), ("one", 5), ("one", 6)]
    }
    # Layers 4 and 5 publish keys and values (each is one of a kind); 6 and 7 read them.
    assert scanned_layers(pairs("gemma3n").stacked)["blocks"][:4] == [0, 1, 2, 3]
    assert scanned_layers(pairs("gemma4_e2b").stacked)["blocks"][:4] == [0, 1, 2, 3]
    assert stacking.runs(pairs("gemma4_moe").stacked.model) == {"blocks": [("scan", 0, 3, 2)]}
    assert stacking.runs(pairs("t5gemma2").stacked.model) == {
        "encoder.blocks": [("scan", 0, 2, 2)],
        "decoder.blocks": [("scan", 0, 2, 2)],
    }


def test_plan_runs_finds_the_longest_period():
    pattern = list("LLLLLG") * 10 + ["L", "L"]  # Gemma 3 27B: 62 layers
    assert stacking.plan_runs(pattern) == [("scan", 0, 6, 10), ("scan", 60, 1, 2)]
    assert stacking.plan_runs(list("ABCD")) == [("one", i) for i in range(4)]
    assert stacking.plan_runs(list("AAAB")) == [("scan", 0, 1, 3), ("one", 3)]


@pytest.mark.parametrize("name", FAMILIES)
def test_interventions_inside_a_loop_touch_their_layer_only(pairs, name):
    pair = pairs(name)
    stack, layers = next((s, ls) for s, ls in scanned_layers(pair.stacked).items() if ls)
    prefix = "" if stack == "blocks" else stack.removesuffix("blocks")
    layer = layers[len(layers) // 2]  # inside the loop, not its first repeat
    hooks = {
        f"{prefix}blocks.{layer}.hook_resid_mid": lambda v, name: v * 0.5,
        f"{prefix}blocks.{layer}.attn.hook_pattern": lambda v, name: v.at[..., 0].set(0.0),
    }
    plain = pair.plain.run_with_hooks(TOKENS, hooks, **streams(name))
    stacked = pair.stacked.run_with_hooks(TOKENS, hooks, **streams(name))
    close(plain, stacked)
    untouched = pair.plain(TOKENS, **streams(name))
    assert np.abs(np.asarray(plain) - np.asarray(untouched)).max() > 1e-3


def metric(logits):
    return logits[:, -1, 11].mean() - logits[:, -1, 12].mean()


def corrupted_tokens():
    corrupted = TOKENS.copy()
    corrupted[:, 2] = 7
    return corrupted


@pytest.mark.parametrize("name", ["gemma3", "t5gemma2"])
def test_patching_sweeps_agree(pairs, name):
    """A sweep runs its own per-block program: the stacked blocks' slices feed it."""
    pair = pairs(name)
    prefix = "encoder." if name == "t5gemma2" else ""
    # A head site too (the general, vmapped form of the sweep).
    for site in ("resid_pre", "z"):
        plain, stacked = (
            patching.sweep(
                m, TOKENS, corrupted_tokens(), metric, site=prefix + site, **streams(name)
            )
            for m in (pair.plain, pair.stacked)
        )
        close(plain, stacked, 1e-4)
        assert np.abs(np.asarray(plain)).max() > 1e-4


@pytest.mark.parametrize("name", ["gemma3", "gemma3n", "gemma4_moe"])
def test_attribution_patching_agrees(pairs, name):
    """Gradients through the loop (and its switches) equal the per-layer model's: plain
    blocks, per-layer inputs and AltUp, routed experts."""
    pair = pairs(name)
    site = ("encoder." if name == "t5gemma2" else "") + "resid_pre"
    plain, stacked = (
        patching.attribution_patching(
            m, TOKENS, corrupted_tokens(), metric, site=site, **streams(name)
        )
        for m in (pair.plain, pair.stacked)
    )
    close(plain, stacked, 1e-4)
    assert np.abs(np.asarray(plain)).max() > 1e-4


def test_generation_agrees(pairs):
    pair = pairs("gemma3")
    prompt = TOKENS[:1, :5]
    plain = pair.plain.generate(prompt, max_new_tokens=6, stop_at_eos=False).tokens
    stacked = pair.stacked.generate(prompt, max_new_tokens=6, stop_at_eos=False).tokens
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(stacked))


def test_saved_checkpoint_is_per_layer(pairs, tmp_path):
    pair = pairs("gemma3")
    hf_config = json.loads((pair.directory / "config.json").read_text())
    save_checkpoint(pair.stacked, tmp_path, hf_config, dtype="float32")
    again = gl.load(tmp_path)
    assert not again.is_stacked
    close(pair.plain(TOKENS), again(TOKENS))


def test_tree_keeps_per_layer_labels_and_views(pairs):
    m = pairs("gemma3").stacked
    slices = pz.select(m.model).at_instances_of(stacking.LayerSlice).get_sequence()
    views = {s.label: s for s in slices}
    view = views["blocks.3.attn.q_proj.weights"]
    assert view.stack.label == "blocks.*.attn.q_proj.weights"
    assert view.stack.value.positional_shape == (7,)
    values = stacking.parameter_values(pairs("gemma3").plain.model)
    np.testing.assert_array_equal(
        view.value.unwrap(*view.value.named_shape),
        values["blocks.3.attn.q_proj.weights"].unwrap(*view.value.named_shape),
    )
    # Treescope shows each block with its per-layer views, not the stacks again.
    import treescope

    text = treescope.render_to_text(m.model.blocks.sublayers[3])
    assert "label='blocks.3.attn.q_proj.weights'" in text
    assert "layer 3 of blocks.*.attn.q_proj.weights (7 layers |" in text
    # The unstacked copy is the per-layer model again.
    back = m.unstacked()
    assert not back.is_stacked
    close(pairs("gemma3").plain(TOKENS), back(TOKENS))


def test_compiled_program_does_not_grow_with_depth():
    """The traced program of a stacked model is the same size at 12 and at 24 layers
    (one loop body); the per-layer model's doubles."""

    def size(layers: int, stacked: bool) -> int:
        config = gl.preset("gemma3_1b").replace(
            num_hidden_layers=layers,
            vocab_size=256,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            query_pre_attn_scalar=8,
        )
        m = gl.build(config, stack_layers=stacked)
        leaves, treedef = m._leaves, m._treedef

        def forward(leaves):
            return m.logits_of(jax.tree.unflatten(treedef, leaves), jnp.asarray(TOKENS), None)

        return len(jax.make_jaxpr(forward)(leaves).jaxpr.eqns)

    assert size(12, True) == size(24, True)
    assert size(24, False) > 1.8 * size(12, False)


def test_donated_arrays_are_freed_and_meshes_refused():
    m = gl.build(gl.preset("gemma3_1b").replace(num_hidden_layers=2, vocab_size=256))

    original = pz.select(m.model).at_instances_of(pz.Parameter).get_sequence()
    in_blocks = [p for p in original if p.label.startswith("blocks.")]
    m.stacked(donate=True)
    assert all(p.value.data_array.is_deleted() for p in in_blocks)
    with pytest.raises(NotImplementedError, match="mesh"):
        gl.build(gl.preset("gemma3_1b"), mesh=object(), stack_layers=True)
    stacked = gl.build(
        gl.preset("gemma3_1b").replace(num_hidden_layers=2, vocab_size=256), stack_layers=True
    )
    with pytest.raises(NotImplementedError, match="unstacked"):
        gl.sharding.shard(stacked, mesh=None)


def test_adapters_and_saes_attach_to_stacked_layers():
    """A LoRA adapter or a spliced SAE edits its block: that block leaves the loop and
    the result equals the per-layer model's."""
    from gemmalens import lora, sae

    m = gl.teaching_model("gemma3")
    stacked = m.stacked()
    tokens = TOKENS[:1]
    adapted = lora.attach(stacked, rank=4, seed=1)
    close(lora.attach(m, rank=4, seed=1)(tokens), adapted(tokens))
    close(lora.merge(lora.attach(m, rank=4, seed=1))(tokens), lora.merge(adapted)(tokens))
    dictionary = gl.teaching_saes()["resid_post"]
    spliced = sae.splice(stacked, dictionary, include_error=False)
    close(sae.splice(m, dictionary, include_error=False)(tokens), spliced(tokens))
    layer = int(dictionary.hook_in.split(".")[1])
    assert ("one", layer) in stacking.runs(spliced.model)["blocks"]
