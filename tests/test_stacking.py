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
from gemmalens.layers.params import RandomInit
from tests import hf_reference as ref

S, F = "sliding_attention", "full_attention"
TOKENS = np.random.RandomState(5).randint(3, 250, (2, 9))
DECODER_TOKENS = np.random.RandomState(6).randint(3, 250, (2, 6))
# Relative to each value's largest entry: float32 rounding of a reordered computation (a
# loop and a chain of layers may add in another order), and XLA's CPU kernels round
# differently from one processor to another (an AMD EPYC gave 2.1e-5 where the machines
# before it stayed below 2e-5); a wrong layer or weight is off by orders more.
RELATIVE = 5e-5

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


def tiny_gemma3(layers: int):
    """Gemma 3 1B's layer pattern at tiny widths and ``layers`` layers."""
    return gl.preset("gemma3_1b").replace(
        num_hidden_layers=layers,
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        query_pre_attn_scalar=8,
    )


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
        out[stack] = []
        for kind, start, *rest in plan:
            if kind == "loop":
                out[stack] += range(start, rest[0])
            elif kind == "scan":
                out[stack] += range(start, start + rest[0] * rest[1])
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


def test_unrolled_loop_agrees(pairs, monkeypatch):
    """Two layers per loop step (`stacking.LOOP_UNROLL`; 7 layers, so a remainder step)
    give the same logits and captures as one, with an intervention inside the loop, and
    the same values as the per-layer model."""
    pair = pairs("gemma3")
    assert stacking.runs(pair.stacked.model) == {"blocks": [("loop", 0, 7, 2)]}
    hooks = {"blocks.3.hook_resid_pre": lambda value, name: value * 2.0}

    def run(m):
        jax.clear_caches()  # the setting is read when a program is traced
        with m.hooks(hooks):
            return m.run_with_cache(TOKENS, names="blocks.*.hook_resid_post")

    logits, cache = run(pair.stacked)
    monkeypatch.setattr(stacking, "LOOP_UNROLL", 2)
    unrolled_logits, unrolled_cache = run(pair.stacked)
    plain_logits, plain_cache = run(pair.plain)
    assert len(cache.keys()) == 7 and list(cache.keys()) == list(unrolled_cache.keys())
    for ours, reference in [(logits, unrolled_logits), (plain_logits, unrolled_logits)]:
        close(ours, reference)
    for hook in cache.keys():
        close(cache[hook], unrolled_cache[hook])
        close(plain_cache[hook], unrolled_cache[hook])
    m = pair.stacked
    program = str(jax.make_jaxpr(lambda t: m.logits_of(m._frozen, t, None))(jnp.asarray(TOKENS)))
    assert "unroll=2" in program  # the setting reached the loop
    unhooked = pair.plain.run_with_cache(TOKENS, names="blocks.6.hook_resid_post")[1]
    assert not np.allclose(
        unhooked["blocks.6.hook_resid_post"], plain_cache["blocks.6.hook_resid_post"]
    )


def test_plans_follow_each_family_pattern(pairs):
    """Which layers loop, family by family (the tiny layouts above): one loop over the
    stack, with one kind of block per distinct structure (local and global attention)."""
    assert stacking.runs(pairs("gemma3").stacked.model) == {"blocks": [("loop", 0, 7, 2)]}
    # Layers 4 and 5 publish keys and values, 6 and 7 read them: each runs on its own.
    for name in ("gemma3n", "gemma4_e2b"):
        assert stacking.runs(pairs(name).stacked.model)["blocks"] == [
            ("loop", 0, 4, 2),
            *[("one", i) for i in range(4, 8)],
        ]
    assert stacking.runs(pairs("gemma4_moe").stacked.model) == {"blocks": [("loop", 0, 6, 2)]}
    assert stacking.runs(pairs("t5gemma2").stacked.model) == {
        "encoder.blocks": [("loop", 0, 4, 2)],
        "decoder.blocks": [("loop", 0, 4, 2)],
    }


def test_periods_loop_like_kinds(pairs, monkeypatch):
    """The other loop style (`stacking.LOOP_STYLE = "periods"`: one copy of each block of
    the repeating period) gives the same values, and both styles carry their counters."""
    pair = pairs("gemma3")
    kinds = pair.stacked.run_with_cache(TOKENS)
    m = pair.stacked
    kinds_jaxpr = jax.make_jaxpr(lambda: m.logits_of(m._frozen, jnp.asarray(TOKENS), None))()
    monkeypatch.setattr(stacking, "LOOP_STYLE", "periods")
    assert stacking.runs(pair.stacked.model) == {
        "blocks": [("scan", 0, 1, 5), ("one", 5), ("one", 6)]
    }
    jax.clear_caches()  # the compiled forward would otherwise be the kinds loop's
    periods = pair.stacked.with_tree(pair.stacked.model).run_with_cache(TOKENS)
    jaxpr = jax.make_jaxpr(lambda: m.logits_of(m._frozen, jnp.asarray(TOKENS), None))()
    assert "cond[" not in str(jaxpr)  # no switch between kinds
    # Both loops' counters ride in their carries, not as a scanned `arange`: slices at
    # ``start + step * counter`` are what XLA:GPU's dynamic-slice fusion reads in place.
    periods_scans, kinds_scans = (
        [e for e in _all_equations(j.jaxpr) if e.primitive.name == "scan"]
        for j in (jaxpr, kinds_jaxpr)
    )
    assert periods_scans and kinds_scans
    assert all(
        len(e.invars) == e.params["num_consts"] + e.params["num_carry"]
        for e in periods_scans + kinds_scans
    )
    close(kinds[0], periods[0])
    for hook in kinds[1].keys():
        close(kinds[1][hook], periods[1][hook])


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


def _all_equations(jaxpr):
    """The equations of a jaxpr, those of its loops' and branches' bodies included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _all_equations(inner)


def _equations(jaxpr) -> int:
    """How many equations a jaxpr holds, those of its loops' and branches' bodies included."""
    return sum(1 for _ in _all_equations(jaxpr))


def _forward_equations(m) -> list:
    """The equations of ``m``'s forward over ``TOKENS`` (bodies of loops and switches
    included)."""
    extra = (jnp.asarray(DECODER_TOKENS), None) if hasattr(m, "decode") else ()
    jaxpr = jax.make_jaxpr(lambda: m.logits_of(m._frozen, jnp.asarray(TOKENS), None, *extra))()
    return list(_all_equations(jaxpr.jaxpr))


def _switched_primitives(m) -> list[list[str]]:
    """For each switch in ``m``'s forward, the primitives its branches hold."""
    return [
        [
            e.primitive.name
            for branch in eqn.params["branches"]
            for e in _all_equations(branch.jaxpr)
        ]
        for eqn in _forward_equations(m)
        if eqn.primitive.name == "cond"
    ]


def test_kinds_merge_where_only_called_layers_differ(pairs):
    """Gemma 3's local and global layers share every stack and differ only in RoPE's base
    and the attention's window: the loop runs them as one step that switches on the kind
    only at those layers (the query's and the key's RoPE, the attention kernel), so the
    projections and norms read their weights at the loop's counter outside any switch.
    Gemma 3n's and T5Gemma 2's kinds merge too; Gemma 4's hold stacks of other widths and
    keep one branch per kind, which reads its own weights."""
    switches = _switched_primitives(pairs("gemma3").stacked)
    assert len(switches) == 3
    assert all("dynamic_slice" not in inside for inside in switches)
    assert sum("dot_general" in inside for inside in switches) == 1  # the attention
    for name in ("gemma3n", "t5gemma2"):
        switches = _switched_primitives(pairs(name).stacked)
        assert switches and all("dynamic_slice" not in inside for inside in switches)
    switches = _switched_primitives(pairs("gemma4_e2b").stacked)
    assert any("dynamic_slice" in inside and "dot_general" in inside for inside in switches)


def test_activation_reads_behind_a_barrier_inside_loops(pairs, monkeypatch):
    """Inside a loop over stacked layers on a GPU, the MLP's activation reads the gate
    from behind an optimization barrier (`mlp.ACTIVATION_BARRIER`), which keeps XLA:GPU
    from putting it in cuBLASLt's epilogue (where the gate's weights would be copied out of
    their stack every layer). Per-layer models and other backends do not get it; with it
    the values and gradients are the same."""
    from gemmalens.layers import mlp

    pair = pairs("gemma3")

    def barriers(m) -> int:
        return sum(e.primitive.name == "optimization_barrier" for e in _forward_equations(m))

    assert mlp.ACTIVATION_BARRIER == "gpu loops"
    assert barriers(pair.stacked) == 0  # not on this backend (the CPU)
    monkeypatch.setattr(mlp, "ACTIVATION_BARRIER", "loops")
    assert barriers(pair.stacked) == 1  # one loop, one MLP in its step
    assert barriers(pair.plain) == 0
    jax.clear_caches()  # the programs compiled before were traced without it
    close(pair.plain(TOKENS), pair.stacked(TOKENS))
    plain, stacked = (
        patching.attribution_patching(m, TOKENS, corrupted_tokens(), metric, site="resid_pre")
        for m in (pair.plain, pair.stacked)
    )
    close(plain, stacked, 1e-4)
    monkeypatch.setattr(mlp, "ACTIVATION_BARRIER", "never")
    assert barriers(pair.stacked) == 0
    jax.clear_caches()


@pytest.mark.parametrize("site", ["resid_pre", "z"])
def test_sweep_loops_over_layers_and_equals_a_loop_of_forwards(pairs, site, monkeypatch):
    """The shared-runs sweep runs every block but the last as one loop over layers (two
    kinds of block here: local and global attention). It equals a Python loop of patched
    forwards, on the per-layer model (whose blocks it copies into stacks) and on the
    stacked one (whose stacks it indexes), and so does its unrolled form (per-layer models
    whose block weights exceed `patching.STACK_COPY_LIMIT_BYTES`)."""
    from tests.test_patching import _loop_sweep

    pair = pairs("gemma3")
    assert patching.shares_runs(pair.plain._frozen)
    expected = _loop_sweep(pair.plain, TOKENS, corrupted_tokens(), metric, site)
    assert np.ptp(expected) > 1e-3
    for m in (pair.plain, pair.stacked):
        close(expected, patching.sweep(m, TOKENS, corrupted_tokens(), metric, site=site), 1e-4)
    monkeypatch.setattr(patching, "STACK_COPY_LIMIT_BYTES", 0)
    jax.clear_caches()
    unrolled = patching.sweep(pair.plain, TOKENS, corrupted_tokens(), metric, site=site)
    close(expected, unrolled, 1e-4)


def test_sweep_program_does_not_grow_with_depth():
    """The traced sweep of a stacked model has as many equations at 24 layers as at 12."""

    def size(layers: int) -> int:
        config = tiny_gemma3(layers)
        m = gl.build(config, stack_layers=True)
        corrupted = corrupted_tokens()
        runs = patching._prepare_runs(m, TOKENS, corrupted, None, None, {}, patching._Media.of())
        names = patching.site_names(m, "resid_pre")
        program, args, kwargs = patching._sweep_program(
            m, runs, names, metric, "resid_pre", None, None
        )
        # The program's own trace: it compiles with gemmalens' XLA options, which JAX
        # takes only on a top-level jit (so not inside make_jaxpr).
        return _equations(program.trace(*args, **kwargs).jaxpr.jaxpr)

    assert size(12) == size(24)


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


def test_encoder_decoder_programs_take_each_stack_once(pairs, monkeypatch):
    """T5Gemma 2's own programs (encode, decode, generate and its cross keys and values)
    agree stacked and per-layer and hand the compiled program each stack once
    (`compiling.Distinct`), as the forward does."""
    from gemmalens import compiling, encdec, sampling
    from gemmalens.layers import merged_attention

    plans = []

    def spy(fn):
        def recording(plan, *args, **kwargs):
            plans.append(plan)
            return fn(plan, *args, **kwargs)

        return recording

    monkeypatch.setattr(encdec, "_encode", spy(encdec._encode))
    monkeypatch.setattr(encdec, "_decode", spy(encdec._decode))
    monkeypatch.setattr(sampling, "_generate", spy(sampling._generate))
    monkeypatch.setattr(merged_attention, "_project", spy(merged_attention._project))
    pair = pairs("t5gemma2")
    prompt = TOKENS[:1, :5]
    new = {}
    for key in ("plain", "stacked"):
        m = getattr(pair, key)
        plans.clear()
        new[key] = m.generate(prompt, max_new_tokens=5, stop_at_eos=False).tokens
        new[key + "_logits"] = m.decode(DECODER_TOKENS, m.encode(TOKENS))
        assert len(plans) == 5  # generate: encode, cross keys, decode steps; encode; decode
        assert all(isinstance(plan, compiling.Distinct) for plan in plans)
        if key == "stacked":
            for plan in plans:
                arguments = jax.tree.leaves(plan)
                assert len(arguments) < len(plan.leaves)  # the stacks once, not per layer
                assert len({id(a) for a in arguments}) == len(arguments)
    np.testing.assert_array_equal(np.asarray(new["plain"]), np.asarray(new["stacked"]))
    close(new["plain_logits"], new["stacked_logits"], 1e-4)
    assert np.abs(np.asarray(new["plain_logits"])).max() > 1e-4


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
        config = tiny_gemma3(layers)
        m = gl.build(config, stack_layers=stacked)
        leaves, treedef = m._leaves, m._treedef

        def forward(leaves):
            return m.logits_of(jax.tree.unflatten(treedef, leaves), jnp.asarray(TOKENS), None)

        return len(jax.make_jaxpr(forward)(leaves).jaxpr.eqns)

    assert size(12, True) == size(24, True)
    assert size(24, False) > 1.8 * size(12, False)


def test_stacked_build_makes_each_stack_in_one_piece(monkeypatch):
    """``gl.build(..., stack_layers=True)`` writes each stack directly (`RandomInit.stack`):
    the same values as stacking the per-layer model, and no per-layer copy of a stacked
    parameter is ever made."""
    config = gl.preset("gemma3_1b").replace(
        num_hidden_layers=4, vocab_size=256, hidden_size=32, intermediate_size=64
    )
    made: list[str] = []
    original = RandomInit.value

    def recording(self, request):
        made.append(request.label)
        return original(self, request)

    monkeypatch.setattr(RandomInit, "value", recording)
    direct = gl.build(config, stack_layers=True)
    # Every value is made once, inside the program that writes its stack (or on its own).
    assert len(made) == len(set(made)) == len(stacking.parameter_values(direct.model))
    monkeypatch.setattr(RandomInit, "value", original)
    plain = gl.build(config)
    ours, theirs = (stacking.parameter_values(m.model) for m in (direct, plain))
    assert ours.keys() == theirs.keys()
    for label, value in theirs.items():
        axes = tuple(value.named_shape)
        np.testing.assert_array_equal(ours[label].unwrap(*axes), value.unwrap(*axes), label)
    close(plain(TOKENS), direct(TOKENS))


def test_donated_arrays_are_freed():
    m = gl.build(gl.preset("gemma3_1b").replace(num_hidden_layers=2, vocab_size=256))

    original = pz.select(m.model).at_instances_of(pz.Parameter).get_sequence()
    in_blocks = [p for p in original if p.label.startswith("blocks.")]
    m.stacked(donate=True)
    assert in_blocks and all(p.value.data_array.is_deleted() for p in in_blocks)


def _stack_specs(m) -> dict[str, str]:
    return {
        view.stack.label: str(view.stack.value.data_array.sharding.spec)
        for view in pz.select(m.model).at_instances_of(stacking.LayerSlice).get_sequence()
    }


def test_stacked_layers_on_a_mesh(pairs):
    """Stacking and a mesh go together (a one-device mesh here; 8 devices in
    tests/test_sharding.py): ``gl.load(path, mesh=..., stack_layers=True)`` of a saved
    checkpoint holds the one-device load's values, each stack placed ``P(None, *spec)``
    (the layer axis whole), and runs as it does; `Model.stacked` of a model on the mesh
    (donating), ``gl.sharding.shard`` of a stacked model and ``gl.build(...,
    stack_layers=True, mesh=...)`` place their stacks alike; `Model.unstacked` gives
    per-layer parameters placed as a per-layer load's."""
    pair = pairs("gemma3")
    mesh = gl.sharding.make_mesh()
    m = gl.load(pair.directory, mesh=mesh, stack_layers=True)
    assert m.is_stacked and m.mesh is mesh
    specs = _stack_specs(m)
    assert specs["blocks.*.attn.q_proj.weights"] == "P(None, 'model', None, None)"
    assert specs["blocks.*.mlp.down_proj.weights"] == "P(None, None, 'model')"
    assert all(spec.startswith("P(None") for spec in specs.values())
    ours, theirs = (stacking.parameter_values(x.model) for x in (m, pair.plain))
    assert ours.keys() == theirs.keys()
    for label, value in theirs.items():
        axes = tuple(value.named_shape)
        np.testing.assert_array_equal(ours[label].unwrap(*axes), value.unwrap(*axes), label)
    close(pair.plain(TOKENS), m(TOKENS))
    hooks = {"blocks.3.attn.hook_z": lambda v, name: v.at[:, :, 1].set(0.0)}
    close(pair.plain.run_with_hooks(TOKENS, hooks), m.run_with_hooks(TOKENS, hooks))

    per_layer = gl.load(pair.directory, mesh=mesh)
    in_blocks = [
        p.value.data_array
        for p in pz.select(per_layer.model).at_instances_of(pz.Parameter).get_sequence()
        if p.label.startswith("blocks.")
    ]
    restacked = per_layer.stacked(donate=True)
    assert in_blocks and all(a.is_deleted() for a in in_blocks)
    resharded = gl.sharding.shard(pair.stacked, mesh)
    built = gl.build(pair.plain.config, mesh=mesh, stack_layers=True)
    for other in (restacked, resharded, built):
        assert other.is_stacked and other.mesh is mesh and _stack_specs(other) == specs
    close(m(TOKENS), resharded(TOKENS))
    close(gl.build(pair.plain.config, stack_layers=True)(TOKENS), built(TOKENS))

    back = m.unstacked()
    assert not back.is_stacked and back.mesh is mesh
    placed = {p.label: p for p in pz.unbind_params(gl.load(pair.directory, mesh=mesh).model)[1]}
    for p in pz.unbind_params(back.model)[1]:
        assert p.value.data_array.sharding.spec == placed[p.label].value.data_array.sharding.spec
    assert str(placed["blocks.3.attn.q_proj.weights"].value.data_array.sharding.spec) == (
        "P('model', None, None)"
    )


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


def test_a_stack_is_one_argument_of_the_compiled_forward(pairs):
    """Every layer's view holds the same stack; the compiled forward takes it once, not
    once per layer (at 27B, 62 layers would count as 3 TB of arguments)."""
    from gemmalens import compiling

    m = pairs("gemma3").stacked
    distinct, index = compiling.distinct_leaves(m._leaves)
    stacks = {
        id(s.stack.value.data_array)
        for s in pz.select(m.model).at_instances_of(stacking.LayerSlice).get_sequence()
    }
    assert len(index) == len(m._leaves) and len(distinct) < len(m._leaves)
    held = {id(leaf) for leaf in distinct}
    assert stacks <= held
    assert sum(id(leaf) in stacks for leaf in distinct) == len(stacks)
    argument_bytes = sum(leaf.nbytes for leaf in distinct)
    model_bytes = sum(v.data_array.nbytes for v in stacking.parameter_values(m.model).values())
    assert argument_bytes <= model_bytes


@pytest.mark.parametrize("site", ["resid_pre", "z"])
def test_sweeps_and_attribution_take_each_stack_once(pairs, site):
    """The sweep (shared runs for resid_pre, vmapped for a head site) and attribution hand
    their compiled programs the model as `compiling.Distinct`: each stack is one argument,
    not one per layer, and the tree inside is the model again."""
    from gemmalens import compiling

    m = pairs("gemma3").stacked
    runs = patching._prepare_runs(
        m, TOKENS, corrupted_tokens(), None, None, {}, patching._Media.of()
    )
    names = patching.site_names(m, site)
    _, args, _ = patching._sweep_program(m, runs, names, metric, site, None, None)
    model_leaves = jax.tree.leaves(m._frozen)
    arguments = jax.tree.leaves(args[0])
    assert isinstance(args[0], compiling.Distinct)
    assert len(arguments) < len(model_leaves)
    assert len({id(a) for a in arguments}) == len(arguments) == len({id(a) for a in model_leaves})
    rebuilt = jax.tree.unflatten(jax.tree.structure(args[0]), arguments).tree()
    assert jax.tree.structure(rebuilt) == jax.tree.structure(m._frozen)
    assert all(a is b for a, b in zip(jax.tree.leaves(rebuilt), model_leaves))


def test_integer_columns_are_progressions_where_evenly_spaced():
    """A loop reads a stack at ``start + step * counter`` where the layers are evenly
    spaced (XLA can then fuse the slice into the matrix products), from a table else."""
    progression = stacking._integers([3, 5, 7, 9])
    assert isinstance(progression, stacking._Progression)
    assert [progression[i] for i in range(4)] == [3, 5, 7, 9]
    assert stacking._integers([0, 1, 2])[jnp.int32(2)] == 2
    assert stacking._integers([4])[0] == 4
    table = stacking._integers([0, 1, 3])
    assert not isinstance(table, stacking._Progression)
    assert [int(table[i]) for i in range(3)] == [0, 1, 3]


def test_embedding_lookup_does_not_transpose_the_table():
    """The token lookup gathers whole rows of the table as stored: no transpose (a copy
    of the whole table) in the program."""
    m = gl.build(tiny_gemma3(2))
    text = jax.jit(lambda t: m.logits_of(m._frozen, t, None)).lower(jnp.asarray(TOKENS)).as_text()
    vocab, width = m.config.vocab_size, m.config.hidden_size
    assert f"tensor<{vocab}x{width}x" in text
    assert f"-> tensor<{width}x{vocab}x" not in text


def test_a_loop_keeps_attention_fused_where_nothing_is_hooked(monkeypatch):
    """Inside a loop, a hook position that no layer uses is a bare hook point, so the
    attention of a stacked model takes the fused kernel (no [seq, seq] weights) exactly
    where the per-layer model does; capturing the pattern switches both to explicit."""
    from gemmalens.layers.attention import DotProductAttention

    calls = []
    original = DotProductAttention._explicit

    def explicit(self, *args, **kwargs):
        calls.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DotProductAttention, "_explicit", explicit)
    config = gl.preset("gemma3_1b").replace(
        num_hidden_layers=7, vocab_size=256, hidden_size=32, intermediate_size=64
    )
    m = gl.build(config, stack_layers=True)
    assert stacking.runs(m.model)["blocks"][0][0] == "loop"
    m(TOKENS)
    assert calls == []
    m.run_with_cache(TOKENS, "blocks.*.attn.hook_pattern")
    assert calls  # traced explicitly, once per kind of block in the loop
