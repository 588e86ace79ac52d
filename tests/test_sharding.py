"""Sharding (gemmalens.sharding): every teaching model on 8 simulated CPU devices, in a
subprocess (the device count is fixed when JAX starts), against the same model on one
device, per layer and with stacked layers (`Model.stacked`); patching sweeps with their
sites split over the data axis; prompts split along their tokens (sequence sharding); two
processes joined as two hosts; a one-device mesh in this process; bad meshes.

Sharded programs sum in another order (a head's or a neuron's contribution is added up on
its device, then across devices), so float32 values agree to rounding: each comparison is
relative to the magnitude of the values compared.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import PartitionSpec

import gemmalens as gl
from gemmalens.sharding import Placement
from tests import background

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = ["gemma3", "gemma3n", "gemma4_moe", "t5gemma2"]
MESH = {"data": 2, "model": 4}
RELATIVE = 1e-5


# The 8-device check runs in its own process, beside the rest of the suite
# (`tests.background`).
BACKGROUND = {
    "sharding_check": background.Job(
        ("-m", "tests.sharding_check", "{out}/results.json", str(MESH["model"]), str(MESH["data"])),
        env={
            "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
        },
        timeout=600,
        needed_by=("results",),  # the fixture below
    )
}


@pytest.fixture(scope="module")
def results():
    done = background.result("sharding_check", BACKGROUND["sharding_check"])
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((done.out / "results.json").read_text())


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_runs_equal_one_device(results, family):
    r = results[family]
    assert results["devices"] == 8
    scale = r["logit_scale"]
    assert r["logits"] <= RELATIVE * scale, (r["logits"], scale)
    assert r["captures"] <= RELATIVE, r["worst_capture"]
    assert r["captures_count"] > 50 and r["captures_are_numpy"]
    assert r["intervention"] <= RELATIVE * scale
    # Sweep metrics are logit spreads (of logit scale); attribution estimates likewise. The
    # sweep's own values move by far more than the tolerance (every token but the first is
    # corrupted), so a sharded sweep that did not patch would fail.
    assert r["sweep"] <= RELATIVE * scale < 0.1 * r["sweep_spread"]
    assert r["attribution"] <= RELATIVE * scale
    assert r["path_patching"] <= RELATIVE * scale and r["path_spread"] > 0
    # Greedy tokens agree, or part only at a near-tie of the one-device logits (two tokens
    # within rounding of each other, which the two ways of summing break differently).
    assert r["greedy_equal"] or all(gap <= RELATIVE * scale for gap in r["greedy_tie_gaps"]), (
        r["greedy_tokens"],
        r["greedy_tie_gaps"],
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_parameters_really_are_distributed(results, family):
    r = results[family]
    assert r["devices_holding_params"] == 8
    rules = r["rules"]
    assert rules["heads"] == rules["neurons"] == rules["vocab"] == "model"
    # The teaching models have one KV head: the 4-way model axis cannot split it, so the
    # K/V projections keep it whole while everything else the rules name is split.
    assert r["replicated"] == ["kv_heads"] and rules["kv_heads"] == "model"
    for label, shards in r["shards"].items():
        full = r["full"][label]
        expected = [
            size // MESH[rules[axis]] if axis in rules and size % MESH[rules[axis]] == 0 else size
            for axis, size in full.items()
        ]
        assert shards == [expected], (label, full, shards)
    split = [
        label for label in r["shards"] if r["shards"][label][0] != list(r["full"][label].values())
    ]
    assert any("q_proj" in s for s in split) and any("mlp" in s for s in split)
    assert "embed.embeddings" in split
    if family == "gemma4_moe":  # expert parallelism
        assert r["shards"]["blocks.0.moe.experts.down_proj"] == [[2, 256, 96]]


@pytest.mark.parametrize("family", FAMILIES)
def test_stacked_layers_on_a_mesh_equal_one_device(results, family):
    """``gl.load(path, mesh=..., stack_layers=True)`` on (data=2, model=4) against the
    per-layer model on one device: the same parameter values; logits, captured patterns
    and residuals of layers running inside a loop, an intervention inside the loop and a
    sweep agree to rounding."""
    r, scale = results["stacked"][family], results[family]["logit_scale"]
    prefix = "decoder." if family == "t5gemma2" else ""
    assert r["is_stacked"] and r["mesh"] == MESH
    assert r["values"] == 0.0
    assert {0, 1} <= set(r["looped"][prefix + "blocks"])  # layers 0 and 1 loop
    assert {f"{prefix}blocks.1.attn.hook_pattern", f"{prefix}blocks.1.hook_resid_post"} <= set(
        r["captured"]
    )
    assert r["logits"] <= RELATIVE * scale
    assert r["captures"] <= RELATIVE, r["worst_capture"]
    # The intervention (layer 0, inside the loop) moves the logits far beyond rounding.
    assert r["intervention"] <= RELATIVE * scale < 1e-3 * r["intervention_effect"]
    assert r["sweep"] <= RELATIVE * scale < 0.1 * r["sweep_spread"]


@pytest.mark.parametrize("family", FAMILIES)
def test_stacks_keep_the_layer_axis_whole_on_every_device(results, family):
    """Each stack ``[layer, *named axes]`` is placed with ``P(None, *spec)``: every device
    holds every layer of its slice of the named axes, split as each layer's parameter
    is; each was read from the checkpoint by `Placement.put_stack` (each device its own
    slices of the tensors)."""
    r, rules = results["stacked"][family], results[family]["rules"]
    stacks = r["stacks"]
    assert sorted(r["put_stack"]) == sorted(s["spec"] for s in stacks.values())
    for label, stack in stacks.items():
        divided = [
            axis in rules and size % MESH[rules[axis]] == 0 for axis, size in stack["named"].items()
        ]
        spec = PartitionSpec(
            None, *(rules[a] if d else None for a, d in zip(stack["named"], divided))
        )
        assert stack["spec"] == str(spec), (label, stack)
        shard = [stack["layers"]] + [
            size // MESH[rules[axis]] if d else size
            for (axis, size), d in zip(stack["named"].items(), divided)
        ]
        assert stack["shards"] == [shard], (label, stack)
    # Query heads split 4 ways (one per device of the model axis), every layer held.
    queries = [s for label, s in stacks.items() if ".attn.q_proj.weights" in label]
    assert queries
    for s in queries:
        assert s["named"]["heads"] == 4 and s["layers"] >= 2
        assert s["shards"][0][:2] == [s["layers"], 1], s
    if family == "gemma4_moe":  # expert parallelism, stacked
        assert stacks["blocks.*.moe.experts.down_proj"]["shards"] == [[4, 2, 256, 96]]


def test_every_way_to_a_stacked_model_on_a_mesh(results):
    """Gemma 3 on (data=2, model=4): `Model.stacked` of the sharded model (donating),
    ``gl.sharding.shard`` of a stacked model and ``gl.build(..., mesh=...,
    stack_layers=True)`` give the loaded stacked model's layouts (and, but for the random
    build's own values, its values); `Model.unstacked` gives the sharded per-layer model,
    and the per-layer ``gl.build(..., mesh=...)`` the per-layer load's layouts."""
    r = results["stacked"]
    assert r["restacked"] == [0.0, True] and r["restacked_mesh"]
    freed, deleted = r["restacked_freed"]
    assert freed > 0 and deleted == freed  # donate=True freed every per-layer array
    assert r["shard_of_stacked"] == [0.0, True]
    # One-device values of the same seed (to float rounding: made in another program).
    assert r["built"][0] <= 1e-7 and r["built"][1] and r["built_is_stacked"]
    assert r["built_per_layer"][0] <= 1e-7 and r["built_per_layer"][1]
    assert r["unstacked"] == [0.0, True] and not r["unstacked_is_stacked"]


def test_generation_kv_caches_are_split_by_kv_heads(results):
    kv = results["kv_cache"]
    # k and v: [batch, seq, kv_heads, head_dim]; positions: [batch, seq].
    assert "P('data', None, 'model', None)" in kv["specs"]
    assert "P('data', None)" in kv["specs"]
    assert kv["greedy_equal"]


def test_bad_meshes_get_clear_errors(results):
    bad = results["bad"]
    assert "blocks.0.attn.q_proj.weights has heads=4" in bad["heads_not_divisible"]
    assert "rules={'heads': None}" in bad["heads_not_divisible"]
    assert "names mesh axis 'tensor'" in bad["unknown_axis"]
    assert "('data', 'model')" in bad["unknown_axis"]
    assert "embed.embeddings would split its axes ['vocab', 'embedding']" in bad["axis_twice"]


@pytest.mark.parametrize("path", ["shared", "chunked", "vmapped"])
def test_sweep_sites_are_split_over_the_data_axis(results, path):
    """On (data=4, model=2): the same scores as on one device, and each device runs a
    share of the sites: its flops in the compiled sweep are well under those of the same
    sweep compiled without the split (about a quarter; unsplit they would be equal)."""
    r = results["sites"][path]
    assert r["shape"] == ([2, 5] if path == "vmapped" else [6, 9])  # [layer, pos]
    assert r["difference"] <= 1e-5 * r["scale"], r
    assert r["program"] == ("_sweep_shared" if path == "shared" else "_sweep_vmapped")
    assert r["flops_split"] <= 0.5 * r["flops_whole"], r


def test_sequence_sharding_splits_activations_along_tokens(results):
    r = results["seq"]
    for family in ("gemma3", "t5gemma2"):
        f = r[family]
        assert f["rules_seq"] == "seq" and f["input_spec"] == "P(None, 'seq')"
        assert f["logits"] <= RELATIVE and f["captures"] <= RELATIVE, f["worst_capture"]
        assert f["count"] > 50
        # Nothing constrains what comes back: the inputs' split went through every block.
        # [batch, pos, ...] values are split along pos; patterns [batch, head, q_pos,
        # k_pos] along the query positions (and heads over the model axis).
        for kind, spec in f["specs"].items():
            if kind.endswith(("pattern", "attn_scores")):
                assert spec == "P(None, 'model', 'seq')", (kind, spec)
            else:
                assert spec.startswith("P(None, 'seq'"), (kind, spec)
        assert f["logits_spec"] == f["forward_spec"] == "P(None, 'seq', 'model')"
        assert f["forward"] <= RELATIVE
    on_data = r["on_data"]  # rules={"seq": "data"}: the data axis splits the tokens
    assert on_data["input_spec"] == "P(None, 'data')"
    assert on_data["logits"] <= RELATIVE and on_data["captures"] <= RELATIVE
    assert on_data["specs"]["blocks.N.hook_resid_post"] == "P(None, 'data')"
    assert on_data["specs"]["blocks.N.attn.hook_pattern"] == "P(None, 'model', 'data')"
    # data=2, seq=2: rows over data, tokens over seq; a sweep (its sites over data) and
    # greedy generation (which does not split its KV caches by seq) as on one device.
    assert r["mixed_input_spec"] == "P('data', 'seq')"
    assert r["mixed_sweep"] <= 1e-5 * r["mixed_sweep_scale"]
    assert r["mixed_greedy_equal"]


def test_sequence_sharding_needs_a_length_the_split_divides(results):
    r = results["seq"]
    assert "The prompt has 9 tokens" in r["bad_length"]
    assert "Pad it to 12 tokens" in r["bad_length"]
    assert "gl.sharding.pad_sequence(tokens, 4, m.config.pad_token_id)" in r["bad_length"]
    assert "rules={'seq': None}" in r["bad_length"]
    # The fix: padded to 12, the real tokens' logits are the unpadded ones.
    assert r["padded_shape"] == [2, 12]
    assert r["padded"] <= RELATIVE * r["padded_scale"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_as_two_hosts(tmp_path):
    """Two processes with two CPU devices each join one job (jax.distributed, gloo) and
    run the Gemma 3 teaching model over a 4-device mesh: the same logits as here."""
    port = str(_free_port())
    outs = [tmp_path / f"{i}.json" for i in (0, 1)]
    env = {**os.environ}
    env.pop("GEMMALENS_COMPILATION_CACHE", None)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.multihost_check", port, str(i), str(outs[i])],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in (0, 1)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs[0][-3000:] + logs[1][-3000:]
    m = gl.teaching_model("gemma3")
    tokens = np.random.RandomState(0).randint(3, 400, (2, 9))
    logits, cache = m.run_with_cache(tokens, "blocks.3.hook_resid_post")
    for out in outs:
        r = json.loads(out.read_text())
        assert (r["process_count"], r["devices"], r["local_devices"]) == (2, 4, 2)
        # Each process holds the query heads of its own two devices only.
        assert r["local_q_proj_shards"] == [[1, 64, 256], [1, 64, 256]]
        scale = float(np.abs(np.asarray(logits)).max())
        assert np.abs(np.asarray(r["logits"]) - np.asarray(logits)).max() <= RELATIVE * scale
        resid = np.asarray(cache["blocks.3.hook_resid_post"])
        assert np.abs(np.asarray(r["resid"]) - resid).max() <= RELATIVE * np.abs(resid).max()


def test_one_device_mesh_is_the_plain_model():
    m = gl.teaching_model("gemma3")
    mesh = gl.sharding.make_mesh()
    on_mesh = gl.sharding.shard(m, mesh)
    tokens = np.random.RandomState(1).randint(3, 400, (2, 7))
    assert np.array_equal(np.asarray(on_mesh(tokens)), np.asarray(m(tokens)))
    assert on_mesh.mesh is mesh and m.mesh is None
    assert on_mesh.sharding_rules["heads"] == "model"
    built = gl.build(m.config, mesh=mesh)
    assert built.placement is not None
    with pytest.raises(ValueError, match="pass mesh= as well"):
        gl.build(m.config, rules={"heads": None})


def test_make_mesh_and_rules_errors():
    with pytest.raises(ValueError, match=r"needs 4 devices; there are 1"):
        gl.sharding.make_mesh(model=2, data=2)
    with pytest.raises(ValueError, match=r"data=1 x seq=2 x model=2 needs 4 devices"):
        gl.sharding.make_mesh(model=2, seq=2)
    with pytest.raises(ValueError, match=r"data=1 x seq=2 does not divide the 1 devices"):
        gl.sharding.make_mesh(seq=2)
    mesh = gl.sharding.make_mesh()
    shapes = [("blocks.0.attn.q_proj.weights", {"heads": 4, "head_dim": 8, "embedding": 16})]
    with pytest.raises(ValueError, match="names mesh axis 'experts'"):
        Placement.fit(mesh, "gemma3", shapes, {"heads": "experts"})
    placement = Placement.fit(mesh, "gemma3", shapes, {"vocab": None})
    assert "vocab" not in placement.rules and math.prod(mesh.shape.values()) == 1


def test_sequence_rule_and_input_placement():
    """The ``seq`` rule on meshes of several devices, without the devices (abstract
    meshes): on with a ``seq`` mesh axis, opt-in on the data axis, never on a parameter."""
    from jax.sharding import AbstractMesh

    shapes = [
        ("vision.embeddings.position_embedding.embeddings", {"seq": 4096, "embedding": 8}),
        ("blocks.0.attn.q_proj.weights", {"heads": 4, "head_dim": 8, "embedding": 8}),
    ]
    seq_mesh = AbstractMesh((2, 4, 1), ("data", "seq", "model"))
    p = Placement.fit(seq_mesh, "gemma3", shapes)
    assert p.rules["seq"] == "seq" and p.seq_axes == ("seq",) and p.seq_ways == 4
    assert p.spec(shapes[0][1]) == PartitionSpec(None, None)  # a parameter's seq stays whole
    assert p.input_sharding((2, 16)).spec == PartitionSpec("data", "seq")
    assert p.input_sharding((3, 16)).spec == PartitionSpec(None, "seq")  # 3 rows: whole
    with pytest.raises(ValueError, match="has 9 tokens.*Pad it to 12 tokens"):
        p.input_sharding((2, 9))
    # Generation's caches are not split by seq.
    cache = {"batch": 2, "seq": 16, "kv_heads": 1, "head_dim": 8}
    assert p.activation_sharding(cache).spec[:2] == ("data", None)
    assert Placement.fit(seq_mesh, "gemma3", shapes, {"seq": None}).seq_ways == 1

    data_mesh = AbstractMesh((4, 2), ("data", "model"))
    plain = Placement.fit(data_mesh, "gemma3", shapes)
    assert "seq" not in plain.rules and plain.seq_ways == 1  # opt-in
    assert plain.input_sharding((4, 9)).spec == PartitionSpec("data", None)
    assert plain.input_sharding((2, 9)) is None
    assert plain.site_sharding().spec == PartitionSpec("data")
    on_data = Placement.fit(data_mesh, "gemma3", shapes, {"seq": "data"})
    assert on_data.input_sharding((4, 16)).spec == PartitionSpec(None, "data")  # batch whole
    model_only = Placement.fit(AbstractMesh((1, 8), ("data", "model")), "gemma3", shapes)
    assert model_only.site_sharding() is None
    with pytest.raises(ValueError, match="names mesh axis 'seq'"):
        Placement.fit(data_mesh, "gemma3", shapes, {"seq": "seq"})


def test_pad_sequence():
    tokens = np.array([[2, 5, 6, 7, 8], [2, 9, 10, 0, 0]])
    padded, mask = gl.sharding.pad_sequence(tokens, 4, pad_id=0)
    assert padded.shape == mask.shape == (2, 8)
    assert padded[:, 5:].sum() == 0 and mask.tolist() == [[1] * 5 + [0] * 3, [1] * 3 + [0] * 5]
    same, _ = gl.sharding.pad_sequence(padded, 4, pad_id=0)
    assert same.shape == (2, 8)
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        gl.sharding.pad_sequence(tokens[0], 4, pad_id=0)


def test_memory_estimate_against_a_count_by_hand():
    config = gl.teaching_model("gemma3").config
    tokens = 300
    e = gl.sharding.memory_estimate(config, tokens=tokens, dtype="float32")
    assert e["parameters"] * 1e9 == pytest.approx(config.num_params())
    kv = sum(
        2 * config.num_key_value_heads * config.head_dim
        * (min(config.sliding_window, tokens) if kind == "sliding_attention" else tokens)
        for kind in config.layer_types
    )  # fmt: skip
    assert e["kv_cache_gib"] * 2**30 == pytest.approx(4 * kv)
    patterns = config.num_hidden_layers * config.num_attention_heads * tokens**2
    assert e["patterns_gib"] * 2**30 == pytest.approx(4 * patterns)
    assert e["parameters_gib_per_device"] == e["parameters_gib"]  # one device
    # Split along the tokens over 4 devices: each holds a quarter of the query positions
    # (300 -> 75 each); the weights and the generation KV cache are not split by seq.
    split = gl.sharding.memory_estimate(config, tokens=tokens, dtype="float32", seq=4)
    assert split["patterns_gib_per_device"] == pytest.approx(e["patterns_gib"] / 4)
    assert split["parameters_gib_per_device"] == e["parameters_gib"]
    assert split["kv_cache_gib_per_device"] == e["kv_cache_gib"]


def test_docs_memory_table_is_the_computed_one():
    page = (open(os.path.join(ROOT, "docs", "sharding.md"))).read()
    assert gl.sharding.memory_table() in page
