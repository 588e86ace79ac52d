"""The persistent compilation cache: a second process loads what the first compiled, it
turns off, leaves a user's own JAX directory alone, and never fails the import.

Each test runs fresh Python processes: the cache is set up at ``import gemmalens`` and
JAX opens it once per process, so the test process itself cannot show either.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]
_RESULT = "RESULT:"

# Child prelude: count JAX's persistent-cache hits (a public monitoring event) and report
# the cache's state as JSON on the last line.
_PRELUDE = """
import dataclasses, json, time, warnings
import jax, numpy as np
HITS = []
jax.monitoring.register_event_listener(
    lambda event, **kw: HITS.append(event) if event == "/jax/compilation_cache/cache_hits" else None
)
def report(**values):
    import gemmalens as gl
    values["info"] = dataclasses.asdict(gl.compilation_cache.info())
    values["jax_dir"] = jax.config.jax_compilation_cache_dir
    print("RESULT:" + json.dumps(values))
"""


def _child(code: str, **env: str) -> dict:
    """Runs ``code`` after the prelude in a new interpreter with ``env`` (and none of the
    caller's cache settings); returns what it reported."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("GEMMALENS_COMPILATION_CACHE", "JAX_COMPILATION_CACHE"))
        and not k.startswith("JAX_PERSISTENT_CACHE")
    }
    clean.update(env, JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, "-c", _PRELUDE + textwrap.dedent(code)],
        cwd=ROOT,
        env=clean,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith(_RESULT)]
    assert lines, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads(lines[-1][len(_RESULT) :])


def _files(directory: pathlib.Path) -> set[str]:
    return {p.name for p in directory.rglob("*") if p.is_file()} if directory.exists() else set()


_FORWARD = """
import gemmalens as gl
m = gl.teaching_model("gemma3")
tokens = np.array([[2, 10, 20, 30, 40, 50, 60, 70]])
before = len(HITS)
start = time.perf_counter()
jax.block_until_ready(m(tokens))
report(forward_hits=len(HITS) - before, seconds=time.perf_counter() - start)
"""


def test_a_second_process_loads_the_forward_the_first_compiled(tmp_path):
    cache = tmp_path / "cache"
    # JAX's own threshold variable, at 0 so every program is written: it also checks that
    # gemmalens keeps a threshold the user chose.
    env = {
        "GEMMALENS_COMPILATION_CACHE": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }

    first = _child(_FORWARD, **env)
    assert first["jax_dir"] == str(cache)
    assert first["info"]["enabled"] and first["info"]["managed_by"] == "gemmalens"
    assert first["info"]["min_compile_time_secs"] == 0.0
    assert first["forward_hits"] == 0  # an empty directory cannot hit
    written = _files(cache)
    assert any(name.startswith("jit__run_distinct-") for name in written), written
    assert first["info"]["entries"] == len([n for n in written if n.endswith("-cache")])
    assert first["info"]["size_bytes"] == sum(p.stat().st_size for p in cache.iterdir())

    second = _child(_FORWARD, **env)
    assert second["forward_hits"] >= 1
    # Every program is written when it misses (threshold 0): no new file means the forward
    # was loaded, not compiled again.
    assert _files(cache) == written


def test_off_leaves_jax_unset_and_writes_nothing(tmp_path):
    home, xdg = tmp_path / "home", tmp_path / "xdg"
    for value in ("off", ""):
        result = _child(
            "jax.block_until_ready(jax.jit(lambda x: x * 3 + 1)(np.arange(4.0)))\nreport()",
            GEMMALENS_COMPILATION_CACHE=value,
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            HOME=str(home),
            XDG_CACHE_HOME=str(xdg),
        )
        assert result["jax_dir"] is None
        assert not result["info"]["enabled"] and result["info"]["path"] is None
        assert "turned off" in result["info"]["note"]
    assert _files(home) == set() and _files(xdg) == set()


def test_a_directory_the_user_gave_jax_is_kept(tmp_path):
    mine, ours = tmp_path / "mine", tmp_path / "ours"
    result = _child(
        f"""
        jax.config.update("jax_compilation_cache_dir", {str(mine)!r})
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        import gemmalens as gl
        jax.block_until_ready(jax.jit(lambda x: x * 3 + 1)(np.arange(4.0)))
        report()
        """,
        GEMMALENS_COMPILATION_CACHE=str(ours),
    )
    assert result["jax_dir"] == str(mine)
    assert result["info"]["managed_by"] == "user" and "leaves it alone" in result["info"]["note"]
    assert result["info"]["min_compile_time_secs"] == 0.0
    assert result["info"]["entries"] >= 1 and _files(mine)
    assert not ours.exists()


def test_an_unwritable_directory_warns_and_stays_off(tmp_path):
    # A path under a regular file cannot be created even by root (these tests may run as
    # root, for whom permission bits do not stop writes).
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    code = """
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import gemmalens as gl
        jax.block_until_ready(jax.jit(lambda x: x * 3 + 1)(np.arange(4.0)))
        report(warnings=[str(w.message) for w in caught if "compilation cache" in str(w.message)])
        """
    for env in (
        {"GEMMALENS_COMPILATION_CACHE": str(blocker / "jax")},  # a directory they chose
        {"XDG_CACHE_HOME": str(blocker)},  # the default location, as under a read-only home
    ):
        result = _child(code, **env)
        assert len(result["warnings"]) == 1 and str(blocker) in result["warnings"][0]
        assert result["jax_dir"] is None and not result["info"]["enabled"]
        assert "cannot be written" in result["info"]["note"]


def test_default_location_and_configure_at_run_time(tmp_path):
    xdg, elsewhere = tmp_path / "xdg", tmp_path / "elsewhere"
    default = xdg / "gemmalens" / "jax"
    result = _child(
        f"""
        import gemmalens as gl
        at_import = dataclasses.asdict(gl.compilation_cache.info())
        gl.compilation_cache.configure(min_compile_time_secs=0)
        jax.block_until_ready(jax.jit(lambda x: x * 3 + 1)(np.arange(4.0)))
        gl.compilation_cache.configure({str(elsewhere)!r})
        jax.block_until_ready(jax.jit(lambda x: x * 5 + 2)(np.arange(4.0)))
        gl.compilation_cache.configure(False)
        jax.block_until_ready(jax.jit(lambda x: x * 7 + 3)(np.arange(4.0)))
        report(at_import=at_import)
        """,
        XDG_CACHE_HOME=str(xdg),
    )
    at_import = result["at_import"]
    assert at_import["path"] == str(default) and at_import["managed_by"] == "gemmalens"
    assert at_import["min_compile_time_secs"] == 0.2 and at_import["entries"] == 0
    # One program in each directory: the move took effect at once, and off wrote nothing.
    assert len([n for n in _files(default) if n.endswith("-cache")]) == 1
    assert len([n for n in _files(elsewhere) if n.endswith("-cache")]) == 1
    assert result["jax_dir"] is None and not result["info"]["enabled"]


def test_compiler_options_default_and_opt_out():
    """gemmalens compiles without Triton GEMMs and with dynamic-slice fusion (short
    programs without Triton norm fusions, long and stacked ones without the dot merger;
    generation programs with dynamic-slice fusion alone) unless GEMMALENS_XLA_OPTIONS=xla
    asks for XLA's own defaults (read at import)."""
    script = (
        "import json, gemmalens as gl; c = gl.compiling; "
        "print(json.dumps([c.XLA_OPTIONS, c.SHORT_OPTIONS, c.DOT_MERGER_OFF, c.DECODING_OPTIONS]))"
    )
    seen = {}
    for value in ("", "xla"):
        env = {**os.environ, "GEMMALENS_XLA_OPTIONS": value, "JAX_PLATFORMS": "cpu"}
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
        )
        assert done.returncode == 0, done.stderr[-2000:]
        seen[value] = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen[""] == [
        {"xla_gpu_enable_triton_gemm": False, "xla_gpu_enable_dynamic_slice_fusion": True},
        {"xla_disable_hlo_passes": "triton-softmax-rewriter"},
        {"xla_gpu_dot_merger_threshold_mb": 0},
        {"xla_gpu_enable_dynamic_slice_fusion": True},
    ]
    assert seen["xla"] == [{}, {}, {}, {}]


def test_short_programs_compile_with_their_own_options():
    """A program of at most SHORT_PROGRAM_TOKENS token positions (its token ids' batch x
    length; the model's own arrays do not count) is compiled by the jit carrying
    SHORT_OPTIONS, a longer one by the jit carrying DOT_MERGER_OFF instead; both give the
    same logits on the CPU, where the passes they differ in do not exist."""
    import numpy as np

    import gemmalens as gl
    from gemmalens import compiling, lens

    m = gl.teaching_model("gemma3")
    program = lens._run_distinct
    model = m._frozen_distinct
    limit = compiling.SHORT_PROGRAM_TOKENS
    short = m._prepare(np.ones((2, limit // 2), np.int32), None, {})
    long = m._prepare(np.ones((1, limit + 1), np.int32), None, {})
    assert compiling.token_positions((m.logits_of, model, short), {}) == limit
    assert compiling.token_positions((m.logits_of, model, long), {}) == limit + 1
    short_options = {**compiling.XLA_OPTIONS, **compiling.SHORT_OPTIONS}
    assert program.options_for((m.logits_of, model, short), {}) == short_options
    long_options = {**compiling.XLA_OPTIONS, **compiling.DOT_MERGER_OFF}
    assert program.options_for((m.logits_of, model, long), {}) == long_options
    assert compiling.token_positions((model, np.zeros(3, np.float32)), {}) == 0
    ids = np.arange(3, 11, dtype=np.int32)[None]
    inputs = m._prepare(ids, None, {})
    with_short = np.asarray(program._with(short_options)(m.logits_of, model, inputs))
    with_long = np.asarray(program._with(long_options)(m.logits_of, model, inputs))
    np.testing.assert_array_equal(with_short, with_long)
    np.testing.assert_array_equal(np.asarray(m(ids)), with_short)


def test_programs_taking_a_stacked_model_compile_with_their_own_options():
    """A short program given a stacked model (its tree holds `LayerSlice` views) adds
    DOT_MERGER_OFF, as long programs do; a per-layer model, whose tied embedding table the
    tree holds twice, does not. The stacked model's logits are the per-layer model's on
    the CPU."""
    import numpy as np

    import gemmalens as gl
    from gemmalens import compiling, lens

    m = gl.teaching_model("gemma3")
    stacked = m.stacked()
    program = lens._run_distinct
    ids = np.arange(3, 11, dtype=np.int32)[None]
    inputs = m._prepare(ids, None, {})
    short_options = {**compiling.XLA_OPTIONS, **compiling.SHORT_OPTIONS}
    plain_model, stacked_model = m._frozen_distinct, stacked._frozen_distinct
    assert len({id(a) for a in plain_model.leaves}) < len(plain_model.leaves)  # tied table
    assert not compiling.takes_stacked((m.logits_of, plain_model, inputs), {})
    assert compiling.takes_stacked((m.logits_of, stacked_model, inputs), {})
    assert program.options_for((m.logits_of, plain_model, inputs), {}) == short_options
    assert program.options_for((m.logits_of, stacked_model, inputs), {}) == {
        **short_options,
        **compiling.DOT_MERGER_OFF,
    }
    np.testing.assert_allclose(np.asarray(stacked(ids)), np.asarray(m(ids)), atol=1e-4)


def test_generation_programs_compile_with_decoding_options():
    """Generation programs (prefill and decode loop) compile with DECODING_OPTIONS, which
    keep XLA's Triton GEMMs and norm fusions, whatever their prompt's length; a long
    prompt or a stacked model adds DOT_MERGER_OFF as elsewhere. `Model.generate` compiles
    its program with them, and its tokens are those of the same program compiled with the
    forward's short-program options (on the CPU the passes they differ in do not exist)."""
    import numpy as np

    import gemmalens as gl
    from gemmalens import compiling, sampling

    limit = compiling.SHORT_PROGRAM_TOKENS
    short, long = np.ones((2, 8), np.int32), np.ones((1, limit + 1), np.int32)
    decoding = dict(compiling.DECODING_OPTIONS)
    for program in (sampling._generate_program, sampling._generate):
        assert program.options_for((short,), {}) == decoding
        assert program.options_for((long,), {}) == {**decoding, **compiling.DOT_MERGER_OFF}
    if compiling.XLA_OPTIONS:  # unless GEMMALENS_XLA_OPTIONS=xla
        assert "xla_gpu_enable_triton_gemm" not in decoding
        assert compiling.XLA_OPTIONS["xla_gpu_enable_triton_gemm"] is False

    m = gl.teaching_model("gemma3")
    prompt = np.arange(3, 11, dtype=np.int32)[None]
    program = sampling._generate_program
    tokens = np.asarray(m.generate(prompt, max_new_tokens=4, stop_at_eos=False).tokens)
    assert tuple(sorted(decoding.items())) in program._by_options
    as_forward = {**compiling.XLA_OPTIONS, **compiling.SHORT_OPTIONS}
    original = compiling.DECODING_OPTIONS
    try:
        compiling.DECODING_OPTIONS = as_forward  # read at each call: the same model compiles anew
        again = np.asarray(m.generate(prompt, max_new_tokens=4, stop_at_eos=False).tokens)
    finally:
        compiling.DECODING_OPTIONS = original
    assert tuple(sorted(as_forward.items())) in program._by_options
    np.testing.assert_array_equal(tokens, again)


def test_compiled_entry_points_run_inside_other_traces():
    """gemmalens' programs carry compiler options, which JAX takes only on a top-level
    jit: inside another trace (eval_shape, jit, make_jaxpr) they run as plain jits."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import gemmalens as gl
    from gemmalens import compiling

    @compiling.jit
    def double(x):
        return x * 2

    assert float(double(1.5)) == 3.0
    assert float(jax.jit(lambda x: double(x) + 1)(1.5)) == 4.0
    assert jax.eval_shape(double, jnp.ones(3)).shape == (3,)
    assert "mul" in str(jax.make_jaxpr(double)(1.5))
    m = gl.teaching_model("gemma3")
    tokens = np.arange(3, 11)[None]

    def logits_and_values():
        logits, cache = m.run_with_cache(tokens, "*hook_resid_post")
        return logits, dict(cache.items())

    logits, values = jax.eval_shape(logits_and_values)
    assert logits.shape == (1, 8, m.config.vocab_size)
    assert len(values) == m.config.num_hidden_layers


def test_caches_are_released_near_the_memory_map_limit(monkeypatch):
    """Each compiled CPU program keeps its code in memory mappings of its own, and Linux
    limits a process's mappings (``vm.max_map_count``): a long session that reached it
    once ended in a crash inside XLA's compiler. After compiling a program of its own,
    gemmalens clears JAX's caches when the process nears the limit, warning once; below it
    nothing is cleared."""
    import warnings

    import jax
    import jax.numpy as jnp
    import numpy as np
    import pytest

    import gemmalens as gl
    from gemmalens import compiling

    maps = compiling._memory_maps()
    if maps is None:
        pytest.skip("no /proc/self/maps: the guard only acts on Linux")
    count, limit = maps
    assert 0 < count < limit
    m = gl.teaching_model("gemma3")
    bystander = jax.jit(lambda x: x + 1)
    bystander(jnp.ones(2))
    assert bystander._cache_size() == 1

    # Below the limit: a new program compiles and nothing is cleared.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logits = m(np.arange(3, 9)[None])
    assert bystander._cache_size() == 1

    # Near it (the limit lowered to just above the count): the next compile clears every
    # cache and warns once, and results are unchanged.
    monkeypatch.setattr(compiling, "_warned_about_maps", False)
    monkeypatch.setattr(compiling, "_compiles_until_count", 0)
    monkeypatch.setattr(
        compiling, "_memory_maps", lambda: (count, int(count / compiling.MAP_LIMIT_SHARE))
    )
    with pytest.warns(RuntimeWarning, match="max_map_count") as warned:
        m(np.arange(3, 10)[None])  # a new shape: a new program
    assert warned[0].filename == __file__  # the line of the user's call
    assert bystander._cache_size() == 0
    bystander(jnp.ones(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: cleared again, silently
        again = m(np.arange(3, 9)[None])  # compiled again, the same numbers
    assert bystander._cache_size() == 0
    np.testing.assert_array_equal(np.asarray(again), np.asarray(logits))

    # Only a call that compiles looks at the mappings, and after a count far from the
    # limit the next compiles skip counting until they could have used up the room.
    looks = []
    monkeypatch.setattr(compiling, "_memory_maps", lambda: looks.append(1) or (count, limit))
    double = compiling.jit(lambda x: x * 2)
    double(jnp.ones(3))
    double(jnp.ones(3))
    assert len(looks) == 1
    skipped = compiling._compiles_until_count
    room = compiling.MAP_LIMIT_SHARE * limit - count
    assert skipped == int(room // compiling.MAPS_PER_COMPILE_BOUND) > 0
    double(jnp.ones(4))  # compiles: skipped
    assert len(looks) == 1 and compiling._compiles_until_count == skipped - 1
