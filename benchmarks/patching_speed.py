"""Activation patching and capture speed on a CPU, gemmalens beside TransformerLens.

    python benchmarks/patching_speed.py            # the small Gemma 3 of issue 3, 32 tokens
    python benchmarks/patching_speed.py --tiny     # a smoke run (what the tests run)

One random Gemma 3 (hidden 256, 6 layers, 4 heads of 64 with 2 KV heads, MLP 1024, vocab
4096; weights perturbed away from transformers' initialisation and saved with
``save_pretrained``) is loaded by gemmalens, by TransformerLens's ``TransformerBridge``
(3.9.0 when last run; booted from the same local directory) and by transformers (eager
attention). One prompt
of 32 tokens and a corrupted copy with one token changed; the metric is a logit difference
at the last position. Measured, in one process unless said otherwise:

* the ``resid_pre`` patching sweep (layers x positions = 192 sites): TransformerLens's
  ``get_act_patch_resid_pre`` against ``gemmalens.patching.sweep``, on its first call
  (gemmalens's in a fresh process, so compiling is included) and in steady state; the same
  sweep when the prompts already differ right after BOS (the least sharing there is); the
  other sites (``attn_out``, ``mlp_out``, head outputs) in steady state;
* a plain loop of one patched transformers forward per site (forward pre-hooks), the
  yardstick that needs no TransformerLens;
* path patching to the logits from every head (``gemmalens.patching.path_patching``)
  against a loop of one transformers forward per head, every ``o_proj`` input held;
* ``run_with_cache`` of every hook against a plain forward, for both libraries;
* a plain forward against transformers eager.

Times are medians of several calls after a warm-up. If TransformerLens is not installed,
its rows say so and the loop of transformers forwards is the comparison. Prints a Markdown
table and writes the figures as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # TransformerLens shows a progress bar per sweep

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _timing import median_seconds  # noqa: E402  (beside this script)

import gemmalens as gl  # noqa: E402
from gemmalens import patching  # noqa: E402

ISSUE_3 = dict(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    query_pre_attn_scalar=64,
    max_position_embeddings=2048,
)
TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    query_pre_attn_scalar=16,
    max_position_embeddings=128,
)
# TransformerLens's sweep functions and gemmalens's site names.
TL_SITES = {
    "resid_pre": "get_act_patch_resid_pre",
    "attn_out": "get_act_patch_attn_out",
    "mlp_out": "get_act_patch_mlp_out",
    "z": "get_act_patch_attn_head_out_all_pos",
}


def settings(tiny: bool) -> dict:
    if tiny:
        return dict(config=TINY, seq=12, diff_at=6, repeats=3, tl_repeats=1, other_sites=["z"])
    return dict(
        config=ISSUE_3,
        seq=32,
        diff_at=16,
        repeats=7,
        tl_repeats=3,
        other_sites=["attn_out", "mlp_out", "z"],
    )


def timed(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up."""
    return median_seconds(fn, repeats)


def block(value):
    leaves = value if isinstance(value, tuple) else (value,)
    jax.block_until_ready([dict(v) if isinstance(v, gl.ActivationCache) else v for v in leaves])
    return value


def make_checkpoint(directory: Path, config: dict) -> None:
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**config)).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(directory)


def prompts(setup: dict, diff_at: int) -> tuple[np.ndarray, np.ndarray]:
    """BOS + random tokens, and a copy with the token at ``diff_at`` changed."""
    vocab = setup["config"]["vocab_size"]
    clean = np.random.RandomState(1).randint(3, vocab, (1, setup["seq"])).astype(np.int32)
    clean[:, 0] = 2
    corrupted = clean.copy()
    corrupted[:, diff_at] = (clean[:, diff_at] + vocab // 2) % (vocab - 3) + 3
    return clean, corrupted


class LogitDiff:
    """``logits[:, -1, good] - logits[:, -1, bad]`` averaged over the batch; works on jax
    arrays and torch tensors alike. Hashable by its tokens, so gemmalens compiles once."""

    def __init__(self, good: int, bad: int):
        self.good, self.bad = good, bad

    def __call__(self, logits):
        return (logits[:, -1, self.good] - logits[:, -1, self.bad]).mean()

    def __hash__(self):
        return hash((self.good, self.bad))

    def __eq__(self, other):
        return isinstance(other, LogitDiff) and (self.good, self.bad) == (other.good, other.bad)


def choose_metric(model: gl.Model, clean: np.ndarray, corrupted: np.ndarray) -> LogitDiff:
    good = int(np.asarray(model(clean))[0, -1].argmax())
    ranked = np.argsort(np.asarray(model(corrupted))[0, -1])[::-1]
    bad = int(ranked[0] if ranked[0] != good else ranked[1])
    return LogitDiff(good, bad)


def first_call(directory: Path, setup: dict, diff_at: int) -> dict:
    """In a fresh process: load, then time the first sweep (tracing and compiling included)."""
    model = gl.load(directory)
    clean, corrupted = prompts(setup, diff_at)
    metric = LogitDiff(*json.loads(os.environ["PATCHING_SPEED_METRIC"]))
    start = time.perf_counter()
    scores = np.asarray(patching.sweep(model, clean, corrupted, metric, site="resid_pre"))
    return dict(seconds=time.perf_counter() - start, scores=scores.tolist())


def first_call_in_subprocess(directory: Path, args: argparse.Namespace, metric, diff_at: int):
    command = [sys.executable, __file__, "--first-call", str(directory), "--diff-at", str(diff_at)]
    command += ["--tiny"] if args.tiny else []
    # The persistent compilation cache off: a cached program from an earlier run of this
    # script would make the "first call" a cache read.
    env = {
        **os.environ,
        "PATCHING_SPEED_METRIC": json.dumps([metric.good, metric.bad]),
        "GEMMALENS_COMPILATION_CACHE": "off",
    }
    for name in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
        env.pop(name, None)
    run = subprocess.run(command, capture_output=True, text=True, env=env)
    if run.returncode:
        raise RuntimeError(f"the first-call process failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def hf_loop_sweep(hf, clean: np.ndarray, corrupted: np.ndarray, metric) -> np.ndarray:
    """The yardstick without TransformerLens: one patched transformers forward per site,
    the clean residual stream put back with a forward pre-hook on the decoder layer."""
    clean_ids = torch.as_tensor(clean, dtype=torch.long)
    ids = torch.as_tensor(corrupted, dtype=torch.long)
    with torch.inference_mode():
        hidden = hf(input_ids=clean_ids, output_hidden_states=True).hidden_states
        layers = hf.model.layers
        scores = np.zeros((len(layers), clean.shape[1]), np.float32)
        for layer_index, layer in enumerate(layers):
            for pos in range(clean.shape[1]):

                def put_back(module, args, kwargs, layer_index=layer_index, pos=pos):
                    states = (args[0] if args else kwargs["hidden_states"]).clone()
                    states[:, pos] = hidden[layer_index][:, pos]
                    if args:
                        return (states, *args[1:]), kwargs
                    return args, {**kwargs, "hidden_states": states}

                handle = layer.register_forward_pre_hook(put_back, with_kwargs=True)
                try:
                    scores[layer_index, pos] = float(metric(hf(input_ids=ids).logits))
                finally:
                    handle.remove()
    return scores


def hf_loop_path_patching(hf, clean: np.ndarray, corrupted: np.ndarray, metric) -> np.ndarray:
    """Path patching to the logits the plain way, one transformers forward per head: every
    layer's ``o_proj`` input (the heads' outputs side by side) replaced by the corrupted
    run's, the sender's slice by the clean run's, with forward pre-hooks."""
    clean_ids = torch.as_tensor(clean, dtype=torch.long)
    ids = torch.as_tensor(corrupted, dtype=torch.long)
    projections = [layer.self_attn.o_proj for layer in hf.model.layers]
    heads, width = hf.config.num_attention_heads, hf.config.head_dim

    def inputs_of(run_ids):
        seen = {}
        handles = [
            p.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0].clone()))
            for i, p in enumerate(projections)
        ]
        try:
            hf(input_ids=run_ids)
        finally:
            for handle in handles:
                handle.remove()
        return [seen[i] for i in range(len(projections))]

    scores = np.zeros((len(projections), heads), np.float32)
    with torch.inference_mode():
        clean_z, held_z = inputs_of(clean_ids), inputs_of(ids)
        for layer in range(len(projections)):
            for head in range(heads):
                swapped = held_z[layer].clone()
                part = slice(head * width, (head + 1) * width)
                swapped[..., part] = clean_z[layer][..., part]
                replace = [swapped if i == layer else held_z[i] for i in range(len(projections))]
                handles = [
                    p.register_forward_pre_hook(lambda m, a, new=new: (new, *a[1:]))
                    for p, new in zip(projections, replace)
                ]
                try:
                    scores[layer, head] = float(metric(hf(input_ids=ids).logits))
                finally:
                    for handle in handles:
                        handle.remove()
    return scores


def load_transformer_lens(directory: Path):
    """The TransformerBridge booted from the local checkpoint, or the reason it cannot be."""
    try:
        from transformer_lens import patching as tl_patching
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError as error:
        return None, None, f"TransformerLens is not installed ({error})"
    bridge = TransformerBridge.boot_transformers(str(directory), device="cpu", dtype=torch.float32)
    bridge.eval()
    return bridge, tl_patching, None


def measure(setup: dict, directory: Path, args: argparse.Namespace) -> dict:
    repeats, tl_repeats = setup["repeats"], setup["tl_repeats"]
    layers, seq = setup["config"]["num_hidden_layers"], setup["seq"]
    model = gl.load(directory)
    clean, corrupted = prompts(setup, setup["diff_at"])
    early_clean, early_corrupted = prompts(setup, 1)
    metric = choose_metric(model, clean, corrupted)
    results: dict = dict(sites=layers * seq, diff_at=setup["diff_at"], seq=seq)

    # gemmalens: first calls in fresh processes, then steady state here.
    ours_first = first_call_in_subprocess(directory, args, metric, setup["diff_at"])
    early_first = first_call_in_subprocess(directory, args, metric, 1)
    results["ours_first_s"], results["ours_early_first_s"] = (
        ours_first["seconds"],
        early_first["seconds"],
    )
    ours_scores = np.asarray(ours_first["scores"])
    results["ours_steady_s"] = timed(
        lambda: block(patching.sweep(model, clean, corrupted, metric)), repeats
    )
    results["ours_early_steady_s"] = timed(
        lambda: block(patching.sweep(model, early_clean, early_corrupted, metric)), repeats
    )
    for site in setup["other_sites"]:
        results[f"ours_{site}_s"] = timed(
            lambda site=site: block(patching.sweep(model, clean, corrupted, metric, site=site)),
            repeats,
        )
    plain = timed(lambda: block(model(clean)), 5 * repeats)
    cached = timed(lambda: block(model.run_with_cache(clean)), 5 * repeats)
    results.update(ours_forward_s=plain, ours_cache_s=cached, hook_count=len(model.hook_names))

    # transformers eager: the plain forward and the loop of patched forwards.
    hf = transformers.Gemma3ForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ids = torch.as_tensor(clean, dtype=torch.long)
    with torch.inference_mode():
        results["hf_forward_s"] = timed(lambda: hf(input_ids=ids).logits, 5 * repeats)
    start = time.perf_counter()
    loop_scores = hf_loop_sweep(hf, clean, corrupted, metric)
    results["hf_loop_s"] = time.perf_counter() - start
    results["max_diff_vs_hf_loop"] = float(np.abs(loop_scores - ours_scores).max())
    # Path patching to the logits: every head at once against one forward per head.
    paths = np.asarray(patching.path_patching(model, clean, corrupted, metric))
    results["ours_paths_s"] = timed(
        lambda: block(patching.path_patching(model, clean, corrupted, metric)), repeats
    )
    start = time.perf_counter()
    loop_paths = hf_loop_path_patching(hf, clean, corrupted, metric)
    results["hf_loop_paths_s"] = time.perf_counter() - start
    results["path_senders"] = int(paths.size)
    results["max_diff_paths_vs_hf_loop"] = float(np.abs(loop_paths - paths).max())

    # TransformerLens, through its TransformerBridge.
    bridge, tl_patching, missing = load_transformer_lens(directory)
    results["transformer_lens"] = missing or "transformer-lens " + _version("transformer-lens")
    if bridge is not None:
        clean_t, corrupted_t = (torch.as_tensor(t, dtype=torch.long) for t in (clean, corrupted))
        with torch.inference_mode():
            _, clean_cache = bridge.run_with_cache(clean_t)
            start = time.perf_counter()
            tl_scores = tl_patching.get_act_patch_resid_pre(
                bridge, corrupted_t, clean_cache, metric
            )
            results["tl_first_s"] = time.perf_counter() - start
            results["max_diff_vs_tl"] = float(np.abs(tl_scores.numpy() - ours_scores).max())
            results["tl_steady_s"] = timed(
                lambda: tl_patching.get_act_patch_resid_pre(
                    bridge, corrupted_t, clean_cache, metric
                ),
                tl_repeats,
            )
            for site in setup["other_sites"]:
                sweep_fn = getattr(tl_patching, TL_SITES[site])
                start = time.perf_counter()
                sweep_fn(bridge, corrupted_t, clean_cache, metric)
                results[f"tl_{site}_s"] = time.perf_counter() - start
            results["tl_forward_s"] = timed(lambda: bridge(clean_t), 5 * repeats)
            results["tl_cache_s"] = timed(lambda: bridge.run_with_cache(clean_t), 5 * repeats)
            results["tl_hook_count"] = len(clean_cache)
    return results


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def versions() -> dict:
    return dict(
        date=time.strftime("%Y-%m-%d"),
        device=platform.processor() or platform.machine(),
        cpus=os.cpu_count(),
        jax=jax.__version__,
        torch=torch.__version__,
        transformers=transformers.__version__,
        gemmalens=gl.__version__,
    )


def _tl_name(r: dict) -> str:
    """``TransformerLens 3.9.0`` (the version measured), or ``TransformerLens``."""
    version = str(r.get("transformer_lens", ""))
    prefix = "transformer-lens "
    return (
        "TransformerLens " + version[len(prefix) :]
        if version.startswith(prefix)
        else "TransformerLens"
    )


def table(r: dict) -> str:
    tl = "tl_steady_s" in r
    sites, diff = r["sites"], r["diff_at"]
    rows = [
        f"| measurement | gemmalens | {_tl_name(r)} | ratio (TL / gemmalens) |",
        "|---|---|---|---|",
    ]

    def row(what, ours, theirs=None, unit="s"):
        scale, fmt = (1e3, "{:.1f} ms") if unit == "ms" else (1, "{:.3f} s")
        ours_text = fmt.format(ours * scale)
        if theirs is None:
            rows.append(f"| {what} | {ours_text} | {'n/a' if not tl else ''} | |")
        else:
            ratio = f"{theirs / ours:.1f}x"
            rows.append(f"| {what} | {ours_text} | {fmt.format(theirs * scale)} | {ratio} |")

    row(
        f"resid_pre sweep, {sites} sites, first call (gemmalens: fresh process, compile included)",
        r["ours_first_s"],
        r.get("tl_first_s"),
    )
    row(f"resid_pre sweep, {sites} sites, steady state", r["ours_steady_s"], r.get("tl_steady_s"))
    row(
        "resid_pre sweep, prompts differing from position 1 (least sharing), first call",
        r["ours_early_first_s"],
        r.get("tl_first_s"),
    )
    row(
        "resid_pre sweep, prompts differing from position 1, steady state",
        r["ours_early_steady_s"],
        r.get("tl_steady_s"),
    )
    for site in ("attn_out", "mlp_out", "z"):
        if f"ours_{site}_s" in r:
            what = "head outputs (z)" if site == "z" else site
            row(f"{what} sweep (TL: one call)", r[f"ours_{site}_s"], r.get(f"tl_{site}_s"))
    for when, ours in (("steady state", r["ours_steady_s"]), ("first call", r["ours_first_s"])):
        rows.append(
            f"| resid_pre sweep ({when}) vs a loop of {sites} patched transformers eager "
            f"forwards (no TransformerLens) | {ours:.3f} s | {r['hf_loop_s']:.3f} s "
            f"(transformers) | {r['hf_loop_s'] / ours:.1f}x |"
        )
    if "ours_paths_s" in r:
        ours = r["ours_paths_s"]
        rows.append(
            f"| path patching to the logits, {r['path_senders']} heads (steady state) vs a loop "
            f"of as many held transformers eager forwards | {ours:.3f} s | "
            f"{r['hf_loop_paths_s']:.3f} s (transformers) | {r['hf_loop_paths_s'] / ours:.1f}x |"
        )
    ours_cost = r["ours_cache_s"] / r["ours_forward_s"]
    if tl:
        theirs_cost = f"{r['tl_cache_s'] / r['tl_forward_s']:.2f}x ({r['tl_hook_count']} hooks)"
    else:
        theirs_cost = "n/a"
    rows.append(
        f"| run_with_cache of every hook, time over a plain forward | {ours_cost:.2f}x "
        f"({r['hook_count']} hooks) | {theirs_cost} | |"
    )
    row("run_with_cache of every hook", r["ours_cache_s"], r.get("tl_cache_s"), unit="ms")
    row("plain forward (TL: the bridge)", r["ours_forward_s"], r.get("tl_forward_s"), unit="ms")
    rows.append(
        f"| plain forward, gemmalens vs transformers eager | {r['ours_forward_s'] * 1e3:.1f} ms | "
        f"{r['hf_forward_s'] * 1e3:.1f} ms (transformers eager) | "
        f"{r['hf_forward_s'] / r['ours_forward_s']:.2f}x |"
    )
    notes = [
        f"Prompts of {r['seq']} tokens differing from position {diff} unless the row says "
        "otherwise; ratio > 1 means gemmalens is faster.",
        f"Largest difference between the sweeps: {r.get('max_diff_vs_tl', float('nan')):.2e} "
        f"against TransformerLens, {r['max_diff_vs_hf_loop']:.2e} against the transformers loop.",
    ]
    if "max_diff_paths_vs_hf_loop" in r:
        notes.append(
            "Largest difference between path patching and its transformers loop: "
            f"{r['max_diff_paths_vs_hf_loop']:.2e}."
        )
    if not tl:
        notes.append(
            f"{r['transformer_lens']}: its columns are empty; the loop of transformers "
            "forwards is the comparison."
        )
    return "\n".join(rows) + "\n\n" + "\n".join(notes)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny config (smoke run)")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    parser.add_argument("--first-call", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--diff-at", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    jax.config.update("jax_platforms", "cpu")
    setup = settings(args.tiny)
    if args.first_call:
        print(json.dumps(first_call(args.first_call, setup, args.diff_at)))
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        make_checkpoint(directory, setup["config"])
        results = measure(setup, directory, args)
    results["versions"] = versions()
    results["command"] = "python benchmarks/patching_speed.py" + (" --tiny" if args.tiny else "")
    print(json.dumps(results["versions"]))
    print(table(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
