"""Real sizes: first call, capture, cache and steady speed, gemmalens beside transformers.

    python benchmarks/real_size_speed.py --out real_size_speed.json   # on one H200 / H100
    python benchmarks/real_size_speed.py --tiny                       # smoke run, CPU

``--tiny`` keeps each preset's layer pattern at tiny widths and 14 layers
(``REAL_SIZE_SPEED_DEPTH=real`` keeps the real depth: the CPU figures in the notes).

Each measurement runs in a fresh process (so "first call" means a new process's first
call, and memory is given back between cases), with random bfloat16 weights of the real
presets. gemmalens builds its model directly (`gl.build`), stacked (`Model.stacked`) or
not; transformers builds the same architecture from the matching config (`to_hf`) with its
own random initialisation, sdpa attention. The smoke run shares processes between cases
(``--grouped``, its default: `groups`), since starting a process that imports torch or
JAX took most of its time; its figures mean nothing anyway. Rows:

* ``first call``: the time from the first call to its logits (tracing, compiling, running);
* ``new capture set``: the first `run_with_cache` of every ``hook_resid_post`` (one more
  program to compile), then its steady time;
* ``second process``: a new process's first call with the compilation cache the first
  process filled;
* ``steady``: the median of five calls after the first;
* the patching sweep of Gemma 3 1B (``resid_pre`` at every layer and position of one
  64-token prompt): first call and steady;
* load + first forward of a Gemma 3 4B checkpoint (transformers' random weights, saved
  with ``save_pretrained``, bfloat16): ``gl.load`` stacked and not, ``from_pretrained``.

Prints a Markdown table and writes the raw figures as JSON (``--out``).

``--alternate ROUNDS`` measures the steady forward only, the way a floor is checked:
gemmalens per-layer (``--stacked-too``: and stacked) and transformers in fresh processes,
taking turns ``ROUNDS`` times per model, so that a slow spell of the machine falls on both
sides; it prints each side's figures, their means and the ratio of the means::

    python benchmarks/real_size_speed.py --alternate 3 --models gemma3_27b_text --out alt.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

# gemmalens' cases run under JAX's default (BFC) allocator, as a user's notebook does, taking
# 95% of the card up front (JAX's default is 75%): without preallocation the stacked 27B runs
# out of memory on an 80 GB card (free memory in pieces), and CUDA's own pool
# (XLA_PYTHON_CLIENT_ALLOCATOR=cuda_async) avoids that but ran the 27B 1-3% slower (run k,
# docs/benchmarks.md). Other processes (transformers, and this script's driver, which asks
# JAX for the device's name) leave JAX without preallocation. Memory settings in the
# environment win. Ignored off the GPU.
GEMMALENS_MEMORY = {
    "XLA_PYTHON_CLIENT_PREALLOCATE": "true",
    "XLA_PYTHON_CLIENT_MEM_FRACTION": ".95",
}
_MEMORY_KEYS = (
    "XLA_PYTHON_CLIENT_PREALLOCATE",
    "XLA_PYTHON_CLIENT_MEM_FRACTION",
    "XLA_PYTHON_CLIENT_ALLOCATOR",
)
_USER_MEMORY = [key for key in _MEMORY_KEYS if key in os.environ]


def use_memory_settings(ours: bool) -> None:
    """Sets this process's JAX memory options (before JAX starts): `GEMMALENS_MEMORY` for a
    gemmalens case, no preallocation otherwise; nothing when the user set any of them."""
    if not _USER_MEMORY:
        os.environ.update(GEMMALENS_MEMORY if ours else {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"})


def child_environment(extra: dict[str, str]) -> dict[str, str]:
    """The environment of a case's process: this one's, without the memory options this
    process chose for itself (the case chooses its own), plus ``extra``."""
    inherited = {
        key: value
        for key, value in os.environ.items()
        if key not in _MEMORY_KEYS or key in _USER_MEMORY
    }
    return {**inherited, **extra}


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _timing import median_seconds  # noqa: E402  (beside this script)

# (preset, shapes [(batch, length)]) per measured model.
REAL = {
    "gemma3_27b_text": [(1, 4096)],
    "gemma4_26b_a4b": [(1, 4096), (8, 1024)],
    "gemma4_31b": [(1, 4096)],
}
TINY_SHAPES = [(1, 64)]
SWEEP_PRESET, SWEEP_LENGTH = "gemma3_1b", 64
LOAD_PRESET, LOAD_LENGTH = "gemma3_4b_text", 128


def tiny_config(name: str, smoke: bool = True) -> Any:
    """The preset with tiny widths and its layer pattern (CPU runs): its real depth, or
    14 layers for a smoke run (``smoke``)."""
    import gemmalens as gl

    config = gl.preset(name)
    changes: dict[str, Any] = dict(
        vocab_size=512, hidden_size=64, num_attention_heads=2, num_key_value_heads=1
    )
    if smoke:  # two periods and a remainder: enough to loop, quick to compile
        changes["num_hidden_layers"] = 14
    if config.family == "gemma3":
        changes.update(intermediate_size=128, head_dim=16, query_pre_attn_scalar=16)
    elif config.family == "gemma4":
        changes.update(
            intermediate_size=128,
            head_dim=16,
            global_head_dim=32,
            num_global_key_value_heads=1,
        )
        if getattr(config, "num_experts", None):
            changes.update(num_experts=4, top_k_experts=2, moe_intermediate_size=32)
    return config.replace(**{k: v for k, v in changes.items() if hasattr(config, k)})


def config_for(name: str, tiny: bool) -> Any:
    import gemmalens as gl

    if tiny:
        return tiny_config(name, smoke=os.environ.get("REAL_SIZE_SPEED_DEPTH") != "real")
    return gl.preset(name)


def sync(value: Any) -> Any:
    import jax

    jax.block_until_ready(value)
    return value


def peak_memory() -> dict:
    """The device's peak memory in use so far, where it reports one (GPUs)."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return {} if peak is None else {"peak_gib": peak / 2**30}


def steady(fn, repeats: int = 5) -> float:
    """The median of ``repeats`` calls made after the first (which the caller timed)."""
    return median_seconds(fn, repeats, warmup=False)


def tokens(batch: int, length: int, vocab: int) -> Any:
    import numpy as np

    return np.random.default_rng(0).integers(3, vocab, (batch, length), dtype=np.int32)


# ------------------------------------------------------------------------- one process


def ours(name: str, stacked: bool, tiny: bool, captures: bool, loop_unroll: int = 1) -> dict:
    """gemmalens in this process: build, first call, steady, capture set (``loop_unroll``:
    `stacking.LOOP_UNROLL`, layers per loop step)."""
    import jax.numpy as jnp

    import gemmalens as gl
    from gemmalens.layers import stacking

    stacking.LOOP_UNROLL = loop_unroll
    config = config_for(name, tiny)
    dtype = jnp.float32 if tiny else jnp.bfloat16
    started = time.perf_counter()
    m = gl.build(config, dtype=dtype, stack_layers=stacked)
    sync(m.model)
    out: dict[str, Any] = {"build_s": time.perf_counter() - started}
    if stacked:
        out["runs"] = {k: [list(r) for r in v] for k, v in stacking.runs(m.model).items()}
    for batch, length in TINY_SHAPES if tiny else REAL[name]:
        ids = tokens(batch, length, config.vocab_size)
        started = time.perf_counter()
        sync(m(ids))
        row = {"first_call_s": time.perf_counter() - started, **peak_memory()}
        row["steady_s"] = steady(lambda ids=ids: sync(m(ids)))
        if captures:
            names = [n for n in m.hook_names if n.endswith("hook_resid_post")]
            started = time.perf_counter()
            sync(m.run_with_cache(ids, names))
            row["capture_first_s"] = time.perf_counter() - started
            row["capture_steady_s"] = steady(
                lambda ids=ids, names=names: sync(m.run_with_cache(ids, names)), 3
            )
            captures = False  # one shape is enough
        out[f"{batch}x{length}"] = row
    return out


def ours_sweep(stacked: bool, tiny: bool) -> dict:
    """The patching sweep of every layer and position (``resid_pre``), first and steady."""
    import jax.numpy as jnp

    import gemmalens as gl
    from gemmalens import patching

    config = config_for(SWEEP_PRESET, tiny)
    m = gl.build(config, dtype=jnp.float32 if tiny else jnp.bfloat16, stack_layers=stacked)
    clean = tokens(1, SWEEP_LENGTH, config.vocab_size)
    corrupted = clean.copy()
    corrupted[0, 5] = 7

    def metric(logits):
        return logits[:, -1, 11].mean() - logits[:, -1, 12].mean()

    def run():
        return sync(patching.sweep(m, clean, corrupted, metric, site="resid_pre"))

    started = time.perf_counter()
    scores = run()
    first = time.perf_counter() - started
    return {"sites": int(scores.size), "first_call_s": first, "steady_s": steady(run)}


def theirs(name: str, tiny: bool) -> dict:
    """transformers (sdpa) in this process: random init, first call, steady."""
    import torch

    config = config_for(name, tiny)
    device = "cpu" if tiny or not torch.cuda.is_available() else "cuda"
    started = time.perf_counter()
    model = hf_model(config, device, torch.float32 if tiny else torch.bfloat16)
    out: dict[str, Any] = {"build_s": time.perf_counter() - started, "device": device}

    def torch_sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for batch, length in TINY_SHAPES if tiny else REAL[name]:
        ids = torch.as_tensor(tokens(batch, length, config.vocab_size), device=device)

        def call(ids=ids):
            with torch.no_grad():
                model(ids, use_cache=False)
            torch_sync()

        started = time.perf_counter()
        call()
        out[f"{batch}x{length}"] = {
            "first_call_s": time.perf_counter() - started,
            "steady_s": steady(call),
        }
    return out


def hf_model(config: Any, device: str, dtype: Any) -> Any:
    """transformers' causal LM of ``config`` with its own random initialisation."""
    import torch
    import transformers

    from gemmalens.families.hf_config import to_hf

    hf = to_hf(config)
    model_type = hf.pop("model_type")
    classes = {
        "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
        "gemma4_text": ("Gemma4TextConfig", "Gemma4ForCausalLM"),
    }
    config_class, model_class = classes[model_type]
    hf_config = getattr(transformers, config_class)(**hf)
    hf_config._attn_implementation = "sdpa"
    torch.set_default_dtype(dtype)
    with torch.device(device):
        return getattr(transformers, model_class)(hf_config).eval()


def save_checkpoint(directory: str, tiny: bool) -> dict:
    """Writes transformers' random ``LOAD_PRESET`` (bfloat16) as a checkpoint folder."""
    import torch

    device = "cpu" if tiny or not torch.cuda.is_available() else "cuda"
    model = hf_model(config_for(LOAD_PRESET, tiny), device, torch.bfloat16)
    started = time.perf_counter()
    model.save_pretrained(directory)
    return {"save_s": time.perf_counter() - started}


def ours_load(directory: str, tiny: bool, stacked: bool) -> dict:
    """``gl.load`` of the checkpoint, then the first forward of 1 x LOAD_LENGTH tokens."""
    import jax.numpy as jnp

    import gemmalens as gl

    started = time.perf_counter()
    m = gl.load(directory, dtype=jnp.bfloat16, stack_layers=stacked)
    sync(m.model)
    loaded = time.perf_counter()
    sync(m(tokens(1, LOAD_LENGTH, m.config.vocab_size)))
    done = time.perf_counter()
    return {"load_s": loaded - started, "first_call_s": done - loaded, "total_s": done - started}


def theirs_load(directory: str, tiny: bool) -> dict:
    """transformers' ``from_pretrained`` of the checkpoint, then its first forward."""
    import torch
    import transformers

    device = "cpu" if tiny or not torch.cuda.is_available() else "cuda"
    started = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.bfloat16, device_map=device, attn_implementation="sdpa"
    ).eval()
    if device == "cuda":
        torch.cuda.synchronize()
    loaded = time.perf_counter()
    ids = torch.as_tensor(tokens(1, LOAD_LENGTH, model.config.vocab_size), device=device)
    with torch.no_grad():
        model(ids, use_cache=False)
    if device == "cuda":
        torch.cuda.synchronize()
    done = time.perf_counter()
    return {"load_s": loaded - started, "first_call_s": done - loaded, "total_s": done - started}


def phases(jitted: Any, *args: Any, **kwargs: Any) -> dict:
    """Where a first call's time goes: tracing, lowering, compiling, running (JAX's
    ahead-of-time steps, in one process with the compilation cache off)."""
    started = time.perf_counter()
    traced = jitted.trace(*args, **kwargs)
    t_traced = time.perf_counter()
    lowered = traced.lower()
    t_lowered = time.perf_counter()
    compiled = lowered.compile()
    t_compiled = time.perf_counter()
    return {
        "trace_s": t_traced - started,
        "lower_s": t_lowered - t_traced,
        "compile_s": t_compiled - t_lowered,
        "hlo_lines": lowered.as_text().count("\n"),
        "compiled": compiled,
    }


def ours_phases(name: str, tiny: bool, variant: str = "preset") -> dict:
    """The phases (`phases`) of a stacked model's first forward, and of the Gemma 3 1B
    sweep (``name`` = ``SWEEP_PRESET``). ``variant``: ``"periods"`` loops over the repeating
    period (`stacking.LOOP_STYLE`) instead of kinds of block; ``"all_global"`` makes every
    layer global (one kind of block), to see what each block in the loop costs to
    compile."""
    import jax.numpy as jnp

    import gemmalens as gl
    from gemmalens import lens, patching
    from gemmalens.compiling import Distinct
    from gemmalens.layers import stacking

    config = config_for(name, tiny)
    if variant == "periods":
        stacking.LOOP_STYLE = "periods"
    if variant == "all_global":
        config = config.replace(layer_types=("full_attention",) * config.num_hidden_layers)
    dtype = jnp.float32 if tiny else jnp.bfloat16
    m = gl.build(config, dtype=dtype, stack_layers=name != SWEEP_PRESET)
    if name == SWEEP_PRESET:
        clean = tokens(1, SWEEP_LENGTH, config.vocab_size)
        corrupted = clean.copy()
        corrupted[0, 5] = 7

        def metric(logits):
            return logits[:, -1, 11].mean() - logits[:, -1, 12].mean()

        # The sweep's own steps (private: a diagnostic, not an API).
        runs = patching._prepare_runs(m, clean, corrupted, None, None, {}, patching._Media.of())
        names = patching.site_names(m, "resid_pre")
        program, args, kwargs = patching._sweep_program(
            m, runs, names, metric, "resid_pre", None, None
        )
        out = phases(program, *args, **kwargs)
        compiled = out.pop("compiled")

        def run():
            return sync(compiled(*args))
    else:
        batch, length = TINY_SHAPES[0] if tiny else REAL[name][0]
        inputs = m._prepare(tokens(batch, length, config.vocab_size), None, {})
        model = Distinct(m._treedef, m._leaves)
        out = phases(lens._run_distinct, m.logits_of, model, inputs)
        compiled = out.pop("compiled")

        def run():
            return sync(compiled(model, inputs))

    started = time.perf_counter()
    run()
    out["run_s"] = time.perf_counter() - started
    out["steady_s"] = steady(run)
    return out


CASES = {
    "ours_phases": ours_phases,
    "ours": ours,
    "ours_sweep": ours_sweep,
    "theirs": theirs,
    "save_checkpoint": save_checkpoint,
    "ours_load": ours_load,
    "theirs_load": theirs_load,
}


# ----------------------------------------------------------------------------- driver


def in_one_process(
    cases: list[tuple[str, dict[str, Any]]], env: dict[str, str], timeout: float
) -> list[dict]:
    """Runs ``(case, kwargs)`` pairs one after another in one fresh Python process (a real
    run: one pair a process) and returns their figures in order (each its own error where
    it failed; every one the process's error where the process did). ``process_s`` is the
    whole process's."""
    command = [sys.executable, __file__, "--cases", json.dumps(cases)]
    started = time.perf_counter()
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout * len(cases),
            env=child_environment(env),
        )
    except subprocess.TimeoutExpired:
        return [{"error": f"did not finish in {timeout * len(cases):.0f} s"} for _ in cases]
    lines = [line for line in done.stdout.splitlines() if line.startswith("[")]
    if done.returncode != 0 or not lines:
        return [{"error": (done.stderr or done.stdout)[-2000:]} for _ in cases]
    results = json.loads(lines[-1])
    seconds = time.perf_counter() - started
    return [{**result, "process_s": seconds} for result in results]


def run_cases(cases: list[tuple[str, dict[str, Any]]]) -> list[dict]:
    """The cases in this process, in order; a failing case gives its traceback and the
    next one still runs."""
    results = []
    for case, kwargs in cases:
        try:
            results.append(CASES[case](**kwargs))
        except Exception:
            results.append({"error": traceback.format_exc()[-2000:]})
    return results


def groups(cases: list[tuple]) -> list[list[tuple]]:
    """``(where, key, case, env, kwargs)`` cases in shared processes (``--grouped``): one per
    side (gemmalens or transformers) and environment, transformers' first (gemmalens'
    loads read the checkpoint it writes); a ``"second_process"`` case keeps a process of
    its own, after the case that filled its compilation cache."""
    shared: dict[tuple, list[tuple]] = {}
    for index, case in enumerate(cases):
        _, key, name, env, _ = case
        side = name.startswith("ours")
        group = (side, tuple(sorted(env.items())))
        if key.endswith("second_process"):
            group += (index,)
        shared.setdefault(group, []).append(case)
    return sorted(shared.values(), key=lambda group: group[0][2].startswith("ours"))


def measure(
    tiny: bool,
    names: list[str],
    timeout: float,
    log,
    unstacked: list[str] | None = None,
    workdir: str | None = None,
    grouped: bool = False,
) -> dict:
    """Every case, the floors' own first (a short lease keeps what matters most);
    ``log(results, name, what, row)`` after each. ``grouped``: in shared processes
    (`groups`), for a smoke run."""
    results: dict[str, Any] = {"tiny": tiny, "versions": versions(), "models": {}}
    cache = tempfile.mkdtemp(prefix="gemmalens-cache-")
    off = {"GEMMALENS_COMPILATION_CACHE": "off"}
    sweep: dict[str, Any] = {}
    results["sweep"] = {SWEEP_PRESET: sweep}
    for name in names:
        results["models"][name] = {}

    def own_cache(name: str) -> dict[str, str]:
        # A cold cache per model: the first process compiles, the second reads.
        return {"GEMMALENS_COMPILATION_CACHE": os.path.join(cache, name)}

    cases = []  # (where, key, case, env, kwargs)
    for name in names:
        kwargs = dict(name=name, stacked=True, tiny=tiny, captures=True)
        cases.append((results["models"][name], "stacked", "ours", own_cache(name), kwargs))
    cases.append((sweep, "stacked", "ours_sweep", off, dict(stacked=True, tiny=tiny)))
    cases.append((sweep, "unstacked", "ours_sweep", off, dict(stacked=False, tiny=tiny)))
    load: dict[str, Any] = {}
    results["load"] = {LOAD_PRESET: load}
    directory = os.path.join(workdir or cache, "checkpoint")
    for key, case, kwargs in [
        ("checkpoint", "save_checkpoint", dict(directory=directory, tiny=tiny)),
        ("stacked", "ours_load", dict(directory=directory, tiny=tiny, stacked=True)),
        ("transformers", "theirs_load", dict(directory=directory, tiny=tiny)),
        ("unstacked", "ours_load", dict(directory=directory, tiny=tiny, stacked=False)),
    ]:
        if tiny and key == "unstacked":
            continue  # the smoke run: the stacked load runs the same code
        cases.append((load, key, case, off, kwargs))
    for name in names:
        kwargs = dict(name=name, stacked=True, tiny=tiny, captures=False)
        where = results["models"][name]
        cases.append((where, "stacked_second_process", "ours", own_cache(name), kwargs))
    for name in names:
        kwargs = dict(name=name, tiny=tiny)
        cases.append((results["models"][name], "transformers", "theirs", off, kwargs))
    for name in names:
        if unstacked is None or name in unstacked:
            kwargs = dict(name=name, stacked=False, tiny=tiny, captures=True)
            cases.append((results["models"][name], "unstacked", "ours", off, kwargs))

    def done(where, key, case, kwargs):
        what = kwargs.get("name", LOAD_PRESET if "load" in case or "save" in case else SWEEP_PRESET)
        log(results, what, f"{case} {key}", where[key])

    try:
        for group in groups(cases) if grouped else [[case] for case in cases]:
            env = group[0][3]
            rows = in_one_process([(c, kwargs) for _, _, c, _, kwargs in group], env, timeout)
            for (where, key, case, _, kwargs), row in zip(group, rows, strict=True):
                where[key] = row
                done(where, key, case, kwargs)
    finally:  # the compilation caches and, without a workdir, the checkpoint
        shutil.rmtree(cache, ignore_errors=True)
    return results


def alternate(tiny: bool, names: list[str], rounds: int, timeout: float, stacked_too: bool, log):
    """Steady forwards only, one fresh process a figure, the sides taking turns ``rounds``
    times per model: gemmalens per-layer, transformers (and gemmalens stacked). Returns
    ``{"versions": ..., "alternate": {model: {form: [rows], "means": {...}}}}``."""
    results: dict[str, Any] = {"tiny": tiny, "versions": versions(), "alternate": {}}
    off = {"GEMMALENS_COMPILATION_CACHE": "off"}
    forms = [("per_layer", "ours", {"stacked": False}), ("transformers", "theirs", {})]
    if stacked_too:
        forms.append(("stacked", "ours", {"stacked": True}))
    for name in names:
        rows: dict[str, Any] = {form: [] for form, _, _ in forms}
        results["alternate"][name] = rows
        for _ in range(rounds):
            for form, case, extra in forms:
                kwargs = dict(name=name, tiny=tiny, **extra)
                if case == "ours":
                    kwargs["captures"] = False
                (row,) = in_one_process([(case, kwargs)], off, timeout)
                rows[form].append(row)
                log(results, name, form, row)
        rows["means"] = alternate_means(rows)
    return results


def alternate_means(rows: dict[str, list[dict]]) -> dict[str, Any]:
    """Each form's mean steady time per shape over its processes, and transformers' mean
    over each gemmalens form's (the speed-up); forms with a failed process are left out."""
    means: dict[str, Any] = {}
    for form, runs in rows.items():
        if form == "means" or not runs or any("error" in run for run in runs):
            continue
        shapes = [key for key in runs[0] if "x" in key and key[0].isdigit()]
        means[form] = {
            shape: sum(run[shape]["steady_s"] for run in runs) / len(runs) for shape in shapes
        }
    theirs = means.get("transformers", {})
    for form in [f for f in means if f != "transformers"]:
        means[f"{form}_speed_up"] = {
            shape: theirs[shape] / seconds
            for shape, seconds in means[form].items()
            if shape in theirs
        }
    return means


def alternate_table(results: dict) -> str:
    lines = [
        "| model | form | shape | steady, each process | mean | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for name, rows in results["alternate"].items():
        means = rows["means"]
        for form, runs in rows.items():
            if form == "means":
                continue
            for shape in means.get(form, {"?": None}):
                each = ", ".join(
                    f"{run[shape]['steady_s']:.4f}" if shape in run else "failed" for run in runs
                )
                mean = means.get(form, {}).get(shape)
                up = means.get(f"{form}_speed_up", {}).get(shape)
                lines.append(
                    f"| {name} | {form} | {shape} | {each} s | "
                    f"{f'{mean:.4f} s' if mean else '–'} | {f'{up:.3f}x' if up else ''} |"
                )
    return "\n".join(lines)


def versions() -> dict:
    import jax

    out = {"python": platform.python_version(), "jax": jax.__version__}
    try:
        import torch
        import transformers

        out.update(torch=torch.__version__, transformers=transformers.__version__)
    except ImportError:
        pass
    devices = jax.devices()
    out["device"] = devices[0].device_kind if devices else "none"
    out["host"] = host()
    return out


def host() -> str:
    """The host's processor and CPU count: first calls are mostly compiling on the host,
    and the same code compiled 1.4-1.6x slower on one H100 machine than on another."""
    model = platform.processor() or "unknown processor"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            names = [
                line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")
            ]
        model = names[0] if names else model
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} CPUs"


def table(results: dict) -> str:
    def seconds(row: dict, *keys: str) -> str:
        for key in keys:
            row = row.get(key, {}) if isinstance(row, dict) else {}
        return f"{row:.2f} s" if isinstance(row, (int, float)) else "–"

    lines = [
        "| model | shape | first call: stacked / unstacked / transformers | new capture set: "
        "stacked / unstacked | second process (warm cache) | steady: stacked / unstacked / "
        "transformers | speed-up vs transformers |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rows in results["models"].items():
        rows = {"unstacked": {}, "transformers": {}, "stacked_second_process": {}, **rows}
        shapes = [k for k in rows["stacked"] if "x" in k and k[0].isdigit()]
        for shape in shapes:
            ours_s = rows["stacked"].get(shape, {}).get("steady_s")
            theirs_s = rows["transformers"].get(shape, {}).get("steady_s")
            ratio = f"{theirs_s / ours_s:.2f}x" if ours_s and theirs_s else "–"
            lines.append(
                f"| {name} | {shape} | {seconds(rows, 'stacked', shape, 'first_call_s')} / "
                f"{seconds(rows, 'unstacked', shape, 'first_call_s')} / "
                f"{seconds(rows, 'transformers', shape, 'first_call_s')} | "
                f"{seconds(rows, 'stacked', shape, 'capture_first_s')} / "
                f"{seconds(rows, 'unstacked', shape, 'capture_first_s')} | "
                f"{seconds(rows, 'stacked_second_process', shape, 'first_call_s')} | "
                f"{seconds(rows, 'stacked', shape, 'steady_s')} / "
                f"{seconds(rows, 'unstacked', shape, 'steady_s')} / "
                f"{seconds(rows, 'transformers', shape, 'steady_s')} | {ratio} |"
            )
    for name, sweep in results.get("sweep", {}).items():
        lines.append(
            f"| {name} sweep ({sweep['stacked'].get('sites', '?')} sites) | 1x{SWEEP_LENGTH} | "
            f"{seconds(sweep, 'stacked', 'first_call_s')} / "
            f"{seconds(sweep, 'unstacked', 'first_call_s')} / – | | | "
            f"{seconds(sweep, 'stacked', 'steady_s')} / "
            f"{seconds(sweep, 'unstacked', 'steady_s')} / – | |"
        )
    for name, load in results.get("load", {}).items():
        lines.append(
            f"| {name}: load + first forward 1x{LOAD_LENGTH} | | "
            f"{seconds(load, 'stacked', 'total_s')} / {seconds(load, 'unstacked', 'total_s')} / "
            f"{seconds(load, 'transformers', 'total_s')} (load "
            f"{seconds(load, 'stacked', 'load_s')} / {seconds(load, 'unstacked', 'load_s')} / "
            f"{seconds(load, 'transformers', 'load_s')}) | | | | |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny widths on CPU (smoke run)")
    parser.add_argument("--out", type=Path, help="write the raw figures as JSON here")
    parser.add_argument("--models", nargs="+", choices=list(REAL), help="(all; --tiny: 26B-A4B)")
    parser.add_argument(
        "--unstacked",
        nargs="*",
        choices=list(REAL),
        help="models also measured unstacked (all; --tiny: none)",
    )
    parser.add_argument(
        "--workdir", help="where the checkpoint for the load row is written (/dev/shm: RAM)"
    )
    parser.add_argument("--timeout", type=float, default=600, help="seconds per process")
    parser.add_argument(
        "--grouped",
        action=argparse.BooleanOptionalAction,
        help="share processes between cases (default with --tiny): quicker, figures not comparable",
    )
    parser.add_argument(
        "--alternate",
        type=int,
        metavar="ROUNDS",
        help="steady forwards only: per-layer and transformers processes, ROUNDS turns each",
    )
    parser.add_argument(
        "--stacked-too", action="store_true", help="with --alternate: stacked processes too"
    )
    parser.add_argument("--case", choices=list(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--kwargs", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--cases", help=argparse.SUPPRESS)  # [[case, kwargs], ...]
    args = parser.parse_args(argv)
    cases = json.loads(args.cases) if args.cases else None
    # JAX is imported lazily, later. The driver starts it too (`versions`), so it must not
    # take the card from its cases.
    first_case = args.case or (cases[0][0] if cases else "")  # a group is of one side
    use_memory_settings(ours=first_case.startswith("ours"))
    if args.case:
        print(json.dumps(CASES[args.case](**json.loads(args.kwargs))), flush=True)
        return None
    if cases:
        print(json.dumps(run_cases(cases)), flush=True)
        return None

    def log(results, name, what, row):
        print(f"{name}, {what}: {json.dumps(row)[:400]}", flush=True)
        if args.out:  # keep what is measured if a later case runs out of time
            args.out.write_text(json.dumps(results, indent=2) + "\n")

    models = args.models or (["gemma4_26b_a4b"] if args.tiny else list(REAL))
    if args.alternate:
        results = alternate(args.tiny, models, args.alternate, args.timeout, args.stacked_too, log)
        print(alternate_table(results))
        if args.out:
            args.out.write_text(json.dumps(results, indent=2) + "\n")
        failed = [
            f"{name} {form}"
            for name, rows in results["alternate"].items()
            for form, runs in rows.items()
            if form != "means" and any("error" in run for run in runs)
        ]
        if args.tiny and failed:
            sys.exit(f"failed: {failed}")
        return results
    unstacked = args.unstacked
    if args.tiny and unstacked is None:
        unstacked = []  # the smoke run: the unstacked sweep runs the per-layer model's code
    grouped = args.tiny if args.grouped is None else args.grouped
    results = measure(args.tiny, models, args.timeout, log, unstacked, args.workdir, grouped)
    print(table(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    failed = [what for what, row in _rows(results) if "error" in row]
    if args.tiny and failed:  # a smoke run fails loudly; a real run keeps what it measured
        sys.exit(f"failed: {failed}")
    return results


def _rows(results: dict) -> list[tuple[str, dict]]:
    rows = [(f"{n} {k}", r) for n, rs in results["models"].items() for k, r in rs.items()]
    rows += [(f"{n} sweep {k}", r) for n, rs in results["sweep"].items() for k, r in rs.items()]
    rows += [(f"{n} load {k}", r) for n, rs in results["load"].items() for k, r in rs.items()]
    return rows


if __name__ == "__main__":
    main()
