"""First calls of the teaching models on a CPU, gemmalens beside transformers.

    python benchmarks/cpu_first_call.py             # every teaching model, 32 tokens, 3 rounds
    python benchmarks/cpu_first_call.py --smoke     # one model, few processes (what the tests run)

The floor a notebook or CI user meets: a fresh Python process on a small CPU, a teaching
model (`gemmalens.teaching_models()`), one prompt of ``--tokens`` random ids at batch 1.
Every figure comes from a fresh subprocess, so that the first call really compiles:

* gemmalens: ``import gemmalens``, ``gl.teaching_model(name)``, the first forward
  (tracing and compiling included), the second and the steady one (median), the first and
  second ``run_with_cache`` of every hook, then the first ``run_with_cache`` of
  ``*hook_resid_post``. Three processes per round: the persistent compilation cache cold
  (``GEMMALENS_COMPILATION_CACHE`` at a fresh temporary directory, which this process
  fills), warm (a second process on that directory) and off. Also recorded: the seconds
  JAX spent compiling (or loading from the cache), from ``jax.monitoring``.
* transformers (eager attention, float32) loading the same checkpoint folder with
  ``AutoModelForCausalLM`` (``AutoModelForSeq2SeqLM`` for the encoder-decoder): ``import
  torch, transformers``, ``from_pretrained``, the first, second and steady forward, and
  the first forwards with ``output_hidden_states=True, output_attentions=True`` and with
  ``output_hidden_states=True`` alone (the nearest things to ``run_with_cache``), under
  ``torch.inference_mode()`` with ``torch.set_num_threads`` set to the usable CPUs.

Before the measurements one untimed process imports both libraries and loads every model
(cache off), so that the operating system's file cache and Python's bytecode (written to a
temporary ``PYTHONPYCACHEPREFIX``, as a pip install would have compiled it) are warm for
everyone. ``JAX_COMPILATION_CACHE_DIR`` and ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS``
are removed from the children's environment, so gemmalens' defaults apply.

Two cores are easily disturbed: before each measured process the script waits (up to
``--wait-idle`` seconds) for the machine to be idle, and measures a process again (up to
``--attempts`` tries) when other processes kept more than ``--max-other-cores`` cores busy
while it ran; that figure is kept for every process. Figures are medians over
``--repeats`` rounds; ratios are gemmalens / transformers (below 1: gemmalens is faster).
Prints a Markdown table and writes the raw figures as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SMOKE_MODEL = "t5gemma2"  # the smallest teaching model
STEADY_CALLS = 5


def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def prompt(config: dict, length: int) -> dict:
    """BOS and random ids for the encoder or decoder-only model; for an encoder-decoder
    also the decoder's ids, starting with the decoder start token (BOS, as T5Gemma 2)."""
    import numpy as np

    vocab = config.get("vocab_size") or config["decoder"]["vocab_size"]
    rng = np.random.RandomState(0)
    tokens = rng.randint(3, vocab, (1, length)).astype(np.int32)
    tokens[:, 0] = config.get("bos_token_id", 2)
    inputs = {"tokens": tokens}
    if config.get("is_encoder_decoder"):
        decoder = rng.randint(3, vocab, (1, length)).astype(np.int32)
        decoder[:, 0] = config.get("decoder_start_token_id", config.get("bos_token_id", 2))
        inputs["decoder_tokens"] = decoder
    return inputs


def read_config(name: str) -> dict:
    # The teaching folder without importing gemmalens (the parent stays light).
    return json.loads(
        (REPO / "gemmalens" / "assets" / "teaching" / name / "config.json").read_text()
    )


def clock(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


# ------------------------------------------------------------------------ child processes


def child_gemmalens(name: str, length: int, steady_calls: int) -> dict:
    start = time.perf_counter()
    import gemmalens as gl

    import_s = time.perf_counter() - start
    import jax

    # Seconds JAX spends tracing, lowering and compiling (or reading a compiled program from
    # the persistent cache: the backend-compile event spans both), and the cache hits.
    events: dict[str, float] = {}
    counts: dict[str, int] = {}

    def on_duration(event, duration_secs, **_):
        events[event] = events.get(event, 0.0) + duration_secs
        counts[event] = counts.get(event, 0) + 1

    def on_event(event, **_):
        counts[event] = counts.get(event, 0) + 1

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)

    def phase(fn) -> tuple:
        before_e, before_c = dict(events), dict(counts)
        value, seconds = clock(fn)
        spent = {k: v - before_e.get(k, 0.0) for k, v in events.items()}
        done = {k: v - before_c.get(k, 0) for k, v in counts.items()}
        return value, dict(
            seconds=seconds,
            compile_s=spent.get("/jax/core/compile/backend_compile_duration", 0.0),
            trace_s=spent.get("/jax/core/compile/jaxpr_trace_duration", 0.0),
            lower_s=spent.get("/jax/core/compile/jaxpr_to_mlir_module_duration", 0.0),
            compiles=done.get("/jax/core/compile/backend_compile_duration", 0),
            cache_hits=done.get("/jax/compilation_cache/cache_hits", 0),
        )

    def sync(value):
        leaves = value if isinstance(value, tuple) else (value,)
        jax.block_until_ready([dict(v) if isinstance(v, gl.ActivationCache) else v for v in leaves])
        return value

    result: dict = dict(import_s=import_s)
    model, result["load"] = phase(lambda: _loaded(gl, jax, name))
    inputs = prompt(json.loads((gl.teaching_model_path(name) / "config.json").read_text()), length)
    tokens = inputs.pop("tokens")
    forward = lambda: sync(model(tokens, **inputs))  # noqa: E731
    logits, result["forward_1"] = phase(forward)
    _, result["forward_2"] = phase(forward)
    steady = [phase(forward)[1]["seconds"] for _ in range(steady_calls)]
    result["forward_steady_s"] = statistics.median(steady)
    every = lambda: sync(model.run_with_cache(tokens, **inputs))  # noqa: E731
    (_, cache), result["cache_all_1"] = phase(every)
    _, result["cache_all_2"] = phase(every)
    resid = lambda: sync(model.run_with_cache(tokens, names="*hook_resid_post", **inputs))  # noqa: E731
    (_, resid_cache), result["cache_resid_1"] = phase(resid)
    _, result["cache_resid_2"] = phase(resid)
    info = gl.compilation_cache.info()
    result.update(
        hooks=len(cache),
        resid_hooks=len(resid_cache),
        cache_enabled=info.enabled,
        cache_entries=info.entries,
        cache_bytes=info.size_bytes,
        cache_min_compile_time_s=info.min_compile_time_secs,
        last_logits=[float(x) for x in jax.device_get(logits)[0, -1]],
    )
    return result


def _loaded(gl, jax, name):
    model = gl.teaching_model(name)
    jax.block_until_ready(jax.tree.leaves(model.model))
    return model


def child_transformers(name: str, length: int, steady_calls: int, threads: int) -> dict:
    start = time.perf_counter()
    import torch
    import transformers

    import_s = time.perf_counter() - start
    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    directory = REPO / "gemmalens" / "assets" / "teaching" / name
    config = read_config(name)
    auto = (
        transformers.AutoModelForSeq2SeqLM
        if config.get("is_encoder_decoder")
        else transformers.AutoModelForCausalLM
    )
    result: dict = dict(import_s=import_s, torch_threads=torch.get_num_threads())
    model, load_s = clock(
        lambda: auto.from_pretrained(
            directory, dtype=torch.float32, attn_implementation="eager"
        ).eval()
    )
    result.update(load=dict(seconds=load_s), auto_class=auto.__name__, cls=type(model).__name__)
    inputs = prompt(config, length)
    kwargs = {"input_ids": torch.as_tensor(inputs["tokens"], dtype=torch.long)}
    if "decoder_tokens" in inputs:
        kwargs["decoder_input_ids"] = torch.as_tensor(inputs["decoder_tokens"], dtype=torch.long)

    def call(**flags):
        return lambda: model(**kwargs, **flags)

    with torch.inference_mode():
        out, seconds = clock(call())
        result["forward_1"] = dict(seconds=seconds)
        result["forward_2"] = dict(seconds=clock(call())[1])
        result["forward_steady_s"] = statistics.median(
            clock(call())[1] for _ in range(steady_calls)
        )
        both = call(output_hidden_states=True, output_attentions=True)
        hidden = call(output_hidden_states=True)
        result["cache_all_1"] = dict(seconds=clock(both)[1])
        result["cache_all_2"] = dict(seconds=clock(both)[1])
        result["cache_resid_1"] = dict(seconds=clock(hidden)[1])
        result["cache_resid_2"] = dict(seconds=clock(hidden)[1])
    result["last_logits"] = out.logits[0, -1].float().tolist()
    return result


def child_warmup(models: list[str], threads: int) -> dict:
    """Imports both libraries and loads every model once, timing nothing that counts."""
    import torch
    import transformers

    import gemmalens as gl

    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    for name in models:
        gl.teaching_model(name)
        config = read_config(name)
        auto = (
            transformers.AutoModelForSeq2SeqLM
            if config.get("is_encoder_decoder")
            else transformers.AutoModelForCausalLM
        )
        auto.from_pretrained(gl.teaching_model_path(name), dtype=torch.float32)
    return {}


# ------------------------------------------------------------------------ the parent


def child_env(pycache: str | None, compilation_cache: str) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    env.update(
        GEMMALENS_COMPILATION_CACHE=compilation_cache,
        HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        TRANSFORMERS_VERBOSITY="error",
        TQDM_DISABLE="1",
    )
    for name in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
        env.pop(name, None)
    if pycache is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = pycache
    return env


def run_child(args: list[str], env: dict) -> dict:
    command = [sys.executable, __file__, *args]
    # Other work on a 2-core machine skews everything: how many cores other processes kept
    # busy, on average, while this one ran is kept, so that a noisy round can be seen.
    busy, used = busy_cpu_seconds(), children_cpu_seconds()
    start = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - start
    others = None
    if busy is not None:
        others = max(0.0, (busy_cpu_seconds() - busy - (children_cpu_seconds() - used)) / wall)
    if run.returncode:
        error = run.stderr[-3000:].strip() or f"exit status {run.returncode}"
        return dict(error=error, other_busy_cores=others)
    result = json.loads(run.stdout.strip().splitlines()[-1])
    result.update(process_wall_s=wall, other_busy_cores=others)
    return result


def wait_for_idle(limit_s: float, window_s: float = 2.0, idle_cores: float = 0.1) -> float:
    """Waits (up to ``limit_s``) for a window in which other work keeps fewer than
    ``idle_cores`` cores busy; returns the seconds waited. Without /proc, returns at once."""
    start = time.perf_counter()
    while time.perf_counter() - start < limit_s:
        before = busy_cpu_seconds()
        if before is None:
            break
        time.sleep(window_s)
        if (busy_cpu_seconds() - before) / window_s < idle_cores:
            break
    return time.perf_counter() - start


def busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (Linux), else None."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """CPU seconds of this process's finished children (0 where the platform cannot say)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0.0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def seconds(result: dict, key: str) -> float | None:
    value = result.get(key)
    return value.get("seconds") if isinstance(value, dict) else value


def median_of(runs: list[dict], key: str, field: str = "seconds") -> float | None:
    values = []
    for run in runs:
        value = run.get(key)
        value = value.get(field) if isinstance(value, dict) else value
        if value is not None:
            values.append(value)
    return statistics.median(values) if values else None


def summarise(runs: list[dict]) -> dict:
    """Medians over rounds of every timed figure of one kind of process."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return dict(error=runs[0]["error"] if runs else "not run")
    summary: dict = {}
    for key in ("import_s", "forward_steady_s", "process_wall_s"):
        summary[key] = median_of(ok, key)
    for key in ("load", "forward_1", "forward_2", "cache_all_1", "cache_all_2"):
        summary[key] = median_of(ok, key)
        summary[key + "_compile_s"] = median_of(ok, key, "compile_s")
    for key in ("cache_resid_1", "cache_resid_2"):
        summary[key] = median_of(ok, key)
        summary[key + "_compile_s"] = median_of(ok, key, "compile_s")
    summary["to_first_logits_s"] = statistics.median(
        r["import_s"] + seconds(r, "load") + seconds(r, "forward_1") for r in ok
    )
    for key in ("hooks", "resid_hooks", "cls", "auto_class", "torch_threads"):
        if key in ok[0]:
            summary[key] = ok[0][key]
    if "cache_entries" in ok[0]:
        # Per round: programs in the cache when the process ended, and programs it read.
        summary["cache_entries"] = [r["cache_entries"] for r in ok]
        summary["cache_hits"] = [
            sum(r[k]["cache_hits"] for k in ("load", "forward_1", "cache_all_1", "cache_resid_1"))
            for r in ok
        ]
    return summary


def measure(args: argparse.Namespace) -> dict:
    threads = cpu_count()
    kinds = (
        ["cold", "warm", "transformers"] if args.smoke else ["cold", "warm", "off", "transformers"]
    )
    raw: dict = {name: {kind: [] for kind in kinds} for name in args.models}
    with tempfile.TemporaryDirectory(prefix="cpu_first_call_") as tmp:
        pycache = None if args.smoke else str(Path(tmp) / "pycache")
        if not args.smoke:
            warm = run_child(
                ["--child", "warmup", "--models", ",".join(args.models)], child_env(pycache, "off")
            )
            if "error" in warm:
                print(f"warm-up failed:\n{warm['error']}", file=sys.stderr)
        for round_index in range(args.repeats):
            for name in args.models:
                common = ["--model", name, "--tokens", str(args.tokens)]
                common += ["--steady-calls", str(args.steady_calls)]
                # JAX's cache keys hold the cache directory's path (its GPU autotuning
                # cache lives under it), so the warm process must read the very directory
                # the cold one filled: each attempt starts from what the kept cold
                # process left there (a warm process may write what the cold one did not).
                cache_dir = Path(tmp) / f"jax_{name}_{round_index}"
                filled = Path(tmp) / f"jax_{name}_{round_index}_as_filled"
                for kind in kinds:
                    for attempt in range(1, args.attempts + 1):
                        waited = wait_for_idle(args.wait_idle)
                        if kind in ("cold", "warm"):
                            shutil.rmtree(cache_dir, ignore_errors=True)
                        if kind == "warm" and filled.is_dir():
                            shutil.copytree(filled, cache_dir)
                        if kind == "transformers":
                            child = ["--child", "transformers", "--threads", str(threads)]
                            env = child_env(pycache, "off")
                        else:
                            child = ["--child", "gemmalens"]
                            env = child_env(pycache, "off" if kind == "off" else str(cache_dir))
                        result = run_child(child + common, env)
                        result.update(attempt=attempt, waited_for_idle_s=waited)
                        status = result.get("error", "").splitlines()[-1:] or [
                            f"first forward {seconds(result, 'forward_1'):.2f} s"
                        ]
                        others = result["other_busy_cores"]
                        noisy = others is not None and others > args.max_other_cores
                        others = "" if others is None else f" (other work: {others:.2f} cores)"
                        print(
                            f"round {round_index + 1} {name} {kind}, attempt {attempt}: "
                            f"{status[0]}{others}",
                            flush=True,
                        )
                        if not noisy or "error" in result:
                            break
                    raw[name][kind].append(result)
                    if kind == "cold" and cache_dir.is_dir():
                        shutil.copytree(cache_dir, filled)
    results: dict = dict(models={}, tokens=args.tokens, repeats=args.repeats)
    for name in args.models:
        entry: dict = {}
        ours = next((r for r in raw[name]["cold"] if "last_logits" in r), None)
        theirs = next((r for r in raw[name]["transformers"] if "last_logits" in r), None)
        if ours and theirs:
            entry["max_abs_diff_last_logits"] = max(
                abs(a - b) for a, b in zip(ours["last_logits"], theirs["last_logits"])
            )
        for kind in kinds:
            for run in raw[name][kind]:
                run.pop("last_logits", None)
        entry["raw"] = raw[name]
        results["models"][name] = entry
    summarise_models(results)
    return results


def summarise_models(results: dict) -> None:
    """(Re)computes each model's summaries from its raw runs, in place."""
    for entry in results["models"].values():
        entry.update({kind: summarise(runs) for kind, runs in entry["raw"].items()})


def _shipped() -> list[str]:
    """The text teaching models: random token ids are their whole input. (The vision one,
    gemma3_vision, reads images too; its first calls with an image are not measured here.)"""
    import gemmalens as gl

    return [name for name in gl.teaching_models() if "vision_config" not in read_config(name)]


def git_commit() -> str | None:
    run = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
    )
    return run.stdout.strip() or None


def versions() -> dict:
    def _version(package: str) -> str:
        try:
            return version(package)
        except Exception:  # noqa: BLE001
            return "not installed"

    return dict(
        date=time.strftime("%Y-%m-%d"),
        commit=git_commit(),
        cpu=cpu_model(),
        cpus=cpu_count(),
        python=platform.python_version(),
        jax=_version("jax"),
        jaxlib=_version("jaxlib"),
        torch=_version("torch"),
        transformers=_version("transformers"),
        gemmalens=_version("gemmalens"),
    )


def table(results: dict) -> str:
    rows = [
        "| model | measurement | gemmalens, cache cold | gemmalens, cache warm | "
        "gemmalens, cache off | transformers eager | ratio cold / transformers | "
        "ratio warm / transformers |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]

    def fmt(value):
        if value is None:
            return "n/a"
        if value >= 1:
            return f"{value:.2f} s"
        return f"{value * 1e3:.0f} ms" if value >= 0.1 else f"{value * 1e3:.1f} ms"

    def ratio(ours, theirs):
        if ours is None or not theirs:
            return ""
        return f"{ours / theirs:.2f}x" if ours / theirs >= 0.1 else f"{ours / theirs:.3f}x"

    for name, entry in results["models"].items():
        cold, warm = entry.get("cold", {}), entry.get("warm", {})
        off, tf = entry.get("off", {}), entry.get("transformers", {})
        hooks, resid = cold.get("hooks", "?"), cold.get("resid_hooks", "?")
        lines = [
            ("import (gemmalens; torch + transformers)", "import_s"),
            ("load the checkpoint", "load"),
            ("first forward", "forward_1"),
            ("first forward: of which JAX compiling or reading the cache", "forward_1_compile_s"),
            ("second forward", "forward_2"),
            (f"steady forward (median of {results.get('steady_calls', STEADY_CALLS)})",
             "forward_steady_s"),
            (f"first run_with_cache, every hook ({hooks}); transformers: hidden states "
             "+ attentions", "cache_all_1"),
            ("first run_with_cache, every hook: of which JAX compiling or reading the cache", "cache_all_1_compile_s"),
            ("second run_with_cache, every hook; transformers: the same", "cache_all_2"),
            (f"first run_with_cache of *hook_resid_post ({resid}); transformers: hidden "
             "states", "cache_resid_1"),
            ("first run_with_cache of *hook_resid_post: of which JAX compiling or reading the cache",
             "cache_resid_1_compile_s"),
            ("import + load + first forward (time to first logits)", "to_first_logits_s"),
        ]  # fmt: skip
        for what, key in lines:
            theirs = None if "_compile_s" in key else tf.get(key)
            values = [fmt(side.get(key)) if side else "" for side in (cold, warm, off)]
            if "error" in off or not off:
                values[2] = "not run" if not off else "failed"
            tf_text = "" if "_compile_s" in key else ("failed" if "error" in tf else fmt(theirs))
            rows.append(
                f"| {name} | {what} | {' | '.join(values)} | {tf_text} | "
                f"{ratio(cold.get(key), theirs)} | {ratio(warm.get(key), theirs)} |"
            )
    notes = []
    for name, entry in results["models"].items():
        for kind in ("cold", "warm", "off", "transformers"):
            if "error" in entry.get(kind, {}):
                last = entry[kind]["error"].splitlines()[-1]
                notes.append(f"{name}, {kind}: failed ({last})")
        if "max_abs_diff_last_logits" in entry:
            tf = entry["transformers"]
            notes.append(
                f"{name}: transformers loaded it as {tf.get('cls')} ({tf.get('auto_class')}); "
                f"last-position logits agree to {entry['max_abs_diff_last_logits']:.1e}; "
                f"programs the cold processes left in the cache, by round: "
                f"{entry['cold'].get('cache_entries')}; programs the warm ones read from it: "
                f"{entry['warm'].get('cache_hits')}."
            )
    others = [
        run["other_busy_cores"]
        for entry in results["models"].values()
        for runs in entry["raw"].values()
        for run in runs
        if run.get("other_busy_cores") is not None
    ]
    if others:
        notes.append(
            f"{results['versions']['cpus']} CPUs; other processes kept {min(others):.2f} to "
            f"{max(others):.2f} cores busy on average while each measured process ran "
            f"(median {statistics.median(others):.2f})."
        )
    return "\n".join(rows) + ("\n\n" + "\n".join(notes) if notes else "")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated teaching models (default: all)")
    parser.add_argument("--repeats", type=int, help="rounds of fresh processes (default 3)")
    parser.add_argument("--tokens", type=int, help="prompt length (default 32)")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    parser.add_argument(
        "--smoke", action="store_true", help=f"{SMOKE_MODEL} only, 8 tokens, one round, no "
        "cache-off process and no warm-up (what the tests run)"
    )  # fmt: skip
    parser.add_argument("--tiny", action="store_true", help="the same as --smoke")
    parser.add_argument(
        "--wait-idle",
        type=float,
        help="before each measured process, wait up to this many seconds for the machine "
        "to be idle (default 600; 0 in --smoke)",
    )
    parser.add_argument(
        "--max-other-cores",
        type=float,
        default=0.25,
        help="measure a process again when other work kept more cores than this busy "
        "while it ran (default 0.25)",
    )
    parser.add_argument(
        "--attempts", type=int, help="at most this many tries per process (default 3; 1 in --smoke)"
    )
    parser.add_argument("--steady-calls", type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--child", choices=["gemmalens", "transformers", "warmup"], help=argparse.SUPPRESS
    )
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--table-from", type=Path, help="print the table of a saved --out file")
    args = parser.parse_args(argv)
    args.smoke = args.smoke or args.tiny
    if args.table_from:
        results = json.loads(args.table_from.read_text())
        summarise_models(results)
        print(json.dumps(results["versions"]))
        print(table(results))
        return results
    if args.child == "warmup":
        print(json.dumps(child_warmup(args.models.split(","), cpu_count())))
        return {}
    if args.child:
        steady = args.steady_calls or STEADY_CALLS
        if args.child == "gemmalens":
            result = child_gemmalens(args.model, args.tokens, steady)
        else:
            result = child_transformers(args.model, args.tokens, steady, args.threads)
        print(json.dumps(result))
        return result

    if args.models:
        args.models = args.models.split(",")
    else:
        # The teaching models this installation ships (the smoke run needs no import).
        args.models = [SMOKE_MODEL] if args.smoke else _shipped()
    args.repeats = args.repeats or (1 if args.smoke else 3)
    args.tokens = args.tokens or (8 if args.smoke else 32)
    args.steady_calls = args.steady_calls or (2 if args.smoke else STEADY_CALLS)
    if args.wait_idle is None:
        args.wait_idle = 0.0 if args.smoke else 600.0
    args.attempts = args.attempts or (1 if args.smoke else 3)
    started = git_commit(), time.strftime("%Y-%m-%d %H:%M:%S")
    results = measure(args)
    results["steady_calls"] = args.steady_calls
    results["versions"] = versions()
    # Children import gemmalens from the working tree: say where it stood at both ends.
    results["versions"].update(commit_at_start=started[0], started=started[1])
    results["versions"]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    given = sys.argv[1:] if argv is None else argv
    results["command"] = " ".join(["python benchmarks/cpu_first_call.py", *given])
    print(json.dumps(results["versions"]))
    print(table(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
