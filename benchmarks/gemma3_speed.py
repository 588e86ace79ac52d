"""Gemma 3 speed, gemmalens beside transformers: same config, same weights, same machine.

    python benchmarks/gemma3_speed.py            # Gemma 3 1B dimensions, bfloat16, on a GPU
    python benchmarks/gemma3_speed.py --tiny     # a smoke run on CPU (what the tests run)

Measures, each as a ratio gemmalens / transformers:

* forward (prefill) throughput at batch x length 8 x 1024 and 2 x 8192: tokens/s and model
  FLOP utilisation (MFU) against the GPU's dense bf16 peak;
* greedy decoding tokens/s at batch 1 and 8 (`Model.generate` vs `generate`);
* the cost of capture: every ``hook_resid_post`` (time over a plain forward), and every
  attention pattern (time and peak memory, against transformers eager with
  ``output_attentions=True``). Peak memory is read in a fresh process per measurement.

Prints a Markdown table and writes the figures as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with torch

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gemmalens as gl  # noqa: E402

GEMMA3_1B = dict(
    vocab_size=262_144,
    hidden_size=1152,
    intermediate_size=6912,
    num_hidden_layers=26,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=256,
    query_pre_attn_scalar=256,
    sliding_window=512,
    max_position_embeddings=32_768,
)
TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=7,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=16,
    query_pre_attn_scalar=16,
    sliding_window=8,
    max_position_embeddings=512,
)
H100_BF16_PEAK = 989.4e12  # dense, SXM
# How decode steps are compiled, by (DECODE_ATTENTION_KERNEL, DECODE_MLP_KERNEL).
DECODE_VARIANTS = {
    "default (auto)": ("auto", "auto"),
    "both decode kernels on": ("on", "on"),
    "attention kernel only": ("on", "off"),
    "no decode kernels (XLA only)": ("off", "off"),
}


def settings(tiny: bool) -> dict:
    if tiny:
        return dict(
            config=TINY,
            dtype="float32",
            forward_shapes=[(2, 32)],
            decode=dict(cases=[(2, 16)], new=8),
            capture_shape=(1, 64),
            repeats=2,
        )
    return dict(
        config=GEMMA3_1B,
        dtype="bfloat16",
        forward_shapes=[(8, 1024), (2, 8192)],
        # (batch, prompt length); 256 new tokens each.
        decode=dict(cases=[(1, 128), (8, 128), (1, 2048), (8, 2048)], new=256),
        capture_shape=(2, 8192),
        repeats=5,
    )


def forward_flops(config: dict, batch: int, length: int) -> float:
    """Matmul FLOPs of one forward with full logits: projections, MLP, unembedding, and the
    attention pairs each layer actually computes (causal; sliding layers see W keys)."""
    h, heads, kv, hd = (
        config[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim")
    )
    per_layer = h * heads * hd * 2 + 2 * h * kv * hd + 3 * h * config["intermediate_size"]
    tokens = batch * length
    linear = 2 * tokens * (per_layer * config["num_hidden_layers"] + h * config["vocab_size"])
    q = np.arange(length)
    full_pairs = int(np.sum(q + 1))
    window_pairs = int(np.sum(np.minimum(q + 1, config["sliding_window"])))
    layer_types = gl.Gemma3Config.default_layer_types(config["num_hidden_layers"])
    pairs = sum(full_pairs if t == "full_attention" else window_pairs for t in layer_types)
    attention = 2 * 2 * batch * heads * hd * pairs
    return float(linear + attention)


def timed(fn, repeats: int, sync) -> float:
    """Median seconds of ``repeats`` calls after one warm-up (which compiles)."""
    sync(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def jax_sync(value):
    # An ActivationCache is a Mapping, not a pytree: wait on its arrays explicitly.
    leaves = value if isinstance(value, tuple) else (value,)
    jax.block_until_ready([dict(v) if isinstance(v, gl.ActivationCache) else v for v in leaves])


def torch_sync(_value):
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_checkpoint(directory: Path, config: dict, dtype: str) -> None:
    """Random weights saved in the Hugging Face layout, made on the CPU so that the GPU is
    untouched before the measurements."""
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**config))
    model.to(getattr(torch, dtype)).save_pretrained(directory)


def load_transformers(directory: Path, dtype: str, attn: str) -> torch.nn.Module:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = transformers.Gemma3ForCausalLM.from_pretrained(
        directory, dtype=getattr(torch, dtype), attn_implementation=attn
    )
    return model.to(device).eval()


def tokens_for(batch: int, length: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(3, vocab, (batch, length)).astype(np.int32)


def measure_speed(
    setup: dict, directory: Path, decode_only: bool = False, forward_only: bool = False
) -> dict:
    config, repeats = setup["config"], setup["repeats"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = load_transformers(directory, setup["dtype"], "sdpa")
    model = gl.load(directory, dtype=setup["dtype"])
    results: dict = {"forward": [], "decode": [], "capture": {}}

    for batch, length in [] if decode_only else setup["forward_shapes"]:
        tokens = tokens_for(batch, length, config["vocab_size"])
        ids = torch.as_tensor(tokens, dtype=torch.long, device=device)
        ours = timed(lambda t=tokens: model(t), repeats, jax_sync)
        with torch.inference_mode():
            theirs = timed(lambda i=ids: hf(input_ids=i).logits, repeats, torch_sync)
        flops = forward_flops(config, batch, length)
        results["forward"].append(
            dict(batch=batch, length=length, gemmalens_s=ours, transformers_s=theirs,
                 gemmalens_tok_s=batch * length / ours, transformers_tok_s=batch * length / theirs,
                 gemmalens_mfu=flops / ours / H100_BF16_PEAK, transformers_mfu=flops / theirs / H100_BF16_PEAK)
        )  # fmt: skip
        print("forward", json.dumps(results["forward"][-1]), flush=True)
        del ids
    if forward_only:
        return results

    decode = setup["decode"]
    # On a GPU, decode steps can run attention and the feed-forward block as kernels of
    # their own (`DECODE_ATTENTION_KERNEL`, `DECODE_MLP_KERNEL`): each way is measured. The
    # first, the default, is the headline figure.
    variants = (
        DECODE_VARIANTS if jax.default_backend() == "gpu" else {"default (auto)": ("auto", "auto")}
    )
    for batch, prompt_length in decode["cases"]:
        prompt = tokens_for(batch, prompt_length, config["vocab_size"], seed=1)
        ids = torch.as_tensor(prompt, dtype=torch.long, device=device)

        def ours_generate(prompt=prompt):
            return model.generate(prompt, max_new_tokens=decode["new"], stop_at_eos=False).tokens

        def theirs_generate(ids=ids):
            return hf.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=decode["new"],
                min_new_tokens=decode["new"],
                do_sample=False,
                pad_token_id=0,
            )

        new_tokens = batch * decode["new"]
        ours = {}
        for name, (attention, mlp) in variants.items():
            gl.sampling.DECODE_ATTENTION_KERNEL, gl.sampling.DECODE_MLP_KERNEL = attention, mlp
            ours[name] = new_tokens / timed(ours_generate, repeats, jax_sync)
        gl.sampling.DECODE_ATTENTION_KERNEL = gl.sampling.DECODE_MLP_KERNEL = "auto"
        with torch.inference_mode():
            theirs = timed(theirs_generate, repeats, torch_sync)
        results["decode"].append(
            dict(
                batch=batch,
                prompt=prompt_length,
                gemmalens_tok_s=next(iter(ours.values())),
                gemmalens_variants_tok_s=ours,
                transformers_tok_s=new_tokens / theirs,
            )
        )
        print("decode", json.dumps(results["decode"][-1]), flush=True)

    if decode_only:
        return results
    batch, length = setup["capture_shape"]
    tokens = tokens_for(batch, length, config["vocab_size"])
    plain = timed(lambda: model(tokens), repeats, jax_sync)
    resid = timed(
        lambda: model.run_with_cache(tokens, names="blocks.*.hook_resid_post"), repeats, jax_sync
    )
    patterns = timed(
        lambda: model.run_with_cache(tokens, names="blocks.*.attn.hook_pattern"), repeats, jax_sync
    )
    results["capture"] = dict(
        batch=batch, length=length, plain_s=plain, resid_post_s=resid, patterns_s=patterns
    )
    return results


def peak_memory(which: str, setup: dict, directory: Path) -> dict:
    """Runs in a fresh process: peak device memory of one capture of every pattern."""
    batch, length = setup["capture_shape"]
    tokens = tokens_for(batch, length, setup["config"]["vocab_size"])
    if which == "gemmalens":
        model = gl.load(directory, dtype=setup["dtype"])
        start = time.perf_counter()
        _, cache = model.run_with_cache(tokens, names="blocks.*.attn.hook_pattern")
        jax_sync(cache)
        seconds = time.perf_counter() - start
        stats = jax.local_devices()[0].memory_stats() or {}
        return dict(peak_bytes=stats.get("peak_bytes_in_use"), first_call_s=seconds)
    hf = load_transformers(directory, setup["dtype"], "eager")
    ids = torch.as_tensor(tokens, dtype=torch.long, device=hf.device)
    with torch.inference_mode():
        start = time.perf_counter()
        out = hf(input_ids=ids, output_attentions=True)
        torch_sync(out)
        seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return dict(peak_bytes=peak, first_call_s=seconds)


def versions() -> dict:
    gpu = (
        torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    )
    return dict(
        date=time.strftime("%Y-%m-%d"),
        device=gpu,
        jax=jax.__version__,
        torch=torch.__version__,
        transformers=transformers.__version__,
        gemmalens=gl.__version__,
    )


def decode_table(results: dict) -> str:
    rows = ["| measurement | gemmalens | transformers | ratio |", "|---|---|---|---|"]
    for r in results["decode"]:
        case = f"batch {r['batch']}, prompt {r['prompt']}"
        theirs = r["transformers_tok_s"]
        (first, ours), *others = r["gemmalens_variants_tok_s"].items()
        rows.append(
            f"| greedy decode, {case}, new tokens/s, {first} | "
            f"{ours:,.0f} | {theirs:,.0f} | {ours / theirs:.1f}x |"
        )
        rows += [
            f"| same, {name} | {tok_s:,.0f} | | {tok_s / theirs:.1f}x |" for name, tok_s in others
        ]
    return "\n".join(rows)


def table(results: dict) -> str:
    rows = ["| measurement | gemmalens | transformers | ratio |", "|---|---|---|---|"]
    for r in results["forward"]:
        shape = f"{r['batch']} x {r['length']}"
        rows.append(
            f"| forward {shape}, tokens/s | {r['gemmalens_tok_s']:,.0f} | {r['transformers_tok_s']:,.0f} (sdpa) | "
            f"{r['gemmalens_tok_s'] / r['transformers_tok_s']:.2f}x |"
        )
        rows.append(
            f"| forward {shape}, MFU | {r['gemmalens_mfu']:.1%} | {r['transformers_mfu']:.1%} | |"
        )
    rows += decode_table(results).splitlines()[2:]
    c = results["capture"]
    shape = f"{c['batch']} x {c['length']}"
    rows.append(
        f"| capture every resid_post, {shape}, time over plain forward | {c['resid_post_s'] / c['plain_s']:.2f}x | | |"
    )
    rows.append(
        f"| capture every attention pattern, {shape}, time over plain forward | {c['patterns_s'] / c['plain_s']:.2f}x | | |"
    )
    if "memory" in results:
        ours, theirs = results["memory"]["gemmalens"], results["memory"]["transformers"]
        if ours.get("peak_bytes") and theirs.get("peak_bytes"):
            rows.append(
                f"| every attention pattern, {shape}, peak memory | {ours['peak_bytes'] / 2**30:.1f} GiB | "
                f"{theirs['peak_bytes'] / 2**30:.1f} GiB (eager, output_attentions) | "
                f"{ours['peak_bytes'] / theirs['peak_bytes']:.2f}x |"
            )
    return "\n".join(rows)  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny config on CPU (smoke run)")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--decode-only", action="store_true", help="measure decoding only")
    only.add_argument(
        "--forward-only", action="store_true", help="measure the forward (throughput, MFU) only"
    )
    parser.add_argument(
        "--cases",
        help="decode cases as BATCHxPROMPT,... (default: all; e.g. 8x128,8x2048)",
    )
    parser.add_argument(
        "--decode-unroll", type=int, default=None, help="decode steps per loop iteration"
    )
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--memory-only", choices=["gemmalens", "transformers"], help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    setup = settings(args.tiny)
    if args.cases:
        setup["decode"]["cases"] = [
            tuple(int(n) for n in case.split("x")) for case in args.cases.split(",")
        ]
    if args.decode_unroll:
        gl.sampling.DECODE_UNROLL = args.decode_unroll
    if args.memory_only:
        print(json.dumps(peak_memory(args.memory_only, setup, args.checkpoint)))
        return {}

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        make_checkpoint(directory, setup["config"], setup["dtype"])
        if args.forward_only or args.decode_only:  # one part of the measurements
            results = measure_speed(
                setup, directory, decode_only=args.decode_only, forward_only=args.forward_only
            )
            results["versions"] = versions()
            results["command"] = (
                "python benchmarks/gemma3_speed.py"
                + (" --forward-only" if args.forward_only else " --decode-only")
                + (" --tiny" if args.tiny else "")
                + (f" --cases {args.cases}" if args.cases and args.decode_only else "")
            )
            print(json.dumps(results["versions"]))
            if args.forward_only:
                print(json.dumps(results["forward"]))
            else:
                print(json.dumps(results["decode"]))
                print(decode_table(results))
            if args.out:
                args.out.write_text(json.dumps(results, indent=2))
            return results
        # Peak memory first, in fresh processes, while this one holds no device memory.
        memory = {}
        for which in ("gemmalens", "transformers"):
            command = [
                sys.executable,
                __file__,
                "--memory-only",
                which,
                "--checkpoint",
                str(directory),
            ]
            command += ["--tiny"] if args.tiny else []
            run = subprocess.run(command, capture_output=True, text=True)
            if run.returncode:
                memory[which] = dict(peak_bytes=None, error=run.stderr[-3000:])
                print(f"peak memory of {which} failed:\n{run.stderr[-3000:]}", file=sys.stderr)
            else:
                memory[which] = json.loads(run.stdout.strip().splitlines()[-1])
            print("memory", which, memory[which], flush=True)
        results = measure_speed(setup, directory)
        results["memory"] = memory
    results["versions"] = versions()
    results["command"] = "python benchmarks/gemma3_speed.py" + (" --tiny" if args.tiny else "")
    print(json.dumps(results["versions"]))
    print(table(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
