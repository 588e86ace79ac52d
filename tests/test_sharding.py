"""Sharding (gemmalens.sharding): every teaching model on 8 simulated CPU devices, in a
subprocess (the device count is fixed when JAX starts), against the same model on one
device; two processes joined as two hosts; a one-device mesh in this process; bad meshes.

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

import gemmalens as gl
from gemmalens.sharding import Placement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = ["gemma3", "gemma3n", "gemma4_moe", "t5gemma2"]
MESH = {"data": 2, "model": 4}
RELATIVE = 1e-5


def _run(args, env_extra=None, timeout=600):
    env = {**os.environ, **(env_extra or {})}
    env.pop("GEMMALENS_COMPILATION_CACHE", None)
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding") / "results.json"
    done = _run(
        ["tests.sharding_check", str(out), str(MESH["model"]), str(MESH["data"])],
        {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_runs_equal_one_device(results, family):
    r = results[family]
    assert results["devices"] == 8
    scale = r["logit_scale"]
    assert r["logits"] <= RELATIVE * scale, (r["logits"], scale)
    assert r["captures"] <= RELATIVE, r["worst_capture"]
    assert r["captures_count"] > 50 and r["captures_are_numpy"]
    assert r["intervention"] <= RELATIVE * scale
    # Sweep metrics are logit differences (of logit scale); attribution estimates likewise.
    assert r["sweep"] <= RELATIVE * scale
    assert r["attribution"] <= RELATIVE * scale
    assert r["greedy_equal"], r["greedy_tokens"]


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
    mesh = gl.sharding.make_mesh()
    shapes = [("blocks.0.attn.q_proj.weights", {"heads": 4, "head_dim": 8, "embedding": 16})]
    with pytest.raises(ValueError, match="names mesh axis 'experts'"):
        Placement.fit(mesh, "gemma3", shapes, {"heads": "experts"})
    placement = Placement.fit(mesh, "gemma3", shapes, {"vocab": None})
    assert "vocab" not in placement.rules and math.prod(mesh.shape.values()) == 1


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


def test_docs_memory_table_is_the_computed_one():
    page = (open(os.path.join(ROOT, "docs", "sharding.md"))).read()
    assert gl.sharding.memory_table() in page
