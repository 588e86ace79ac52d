"""Generation's prefill with the last position's logits only, against every position's.

    python benchmarks/prefill_logits.py                    # Gemma 3 4B and 1B, 1 x 4096, GPU
    python benchmarks/prefill_logits.py --tiny             # smoke run, CPU

`Model.generate` reads the prompt's last logits only, so its prefill runs the final norm
and the unembedding on that position (the ``logit_window`` side input of `DecoderLM`). A
capture of ``ln_final.hook_normalized`` makes it run them on every position again (a hook
there must see every position), which is the form before that change: each row times
``generate(prompt, 1)`` (prefill and one sampled token) both ways, random bfloat16 weights
(`gl.build`), first call and the median of three steady calls, and whether both forms
chose the same (greedy) token. An encoder-decoder's prompt is its encoder input; the
decoder's prefill is its start token. Prints a Markdown table; writes JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import median_seconds  # noqa: E402


def forms(m: Any) -> dict[str, Any]:
    """The two forms as ``capture=`` arguments: nothing, or the (decoder's) final norm."""
    final_norm = [n for n in m.hook_names if n.endswith("ln_final.hook_normalized")][-1]
    return {"last_only": (), "every_position": final_norm}


def measure(m: Any, length: int, repeats: int) -> dict[str, Any]:
    """Both forms of ``m.generate`` on one random prompt of ``length`` tokens."""
    import jax
    import numpy as np

    vocab = min(m.config.vocab_size, 4000)
    prompt = [list(np.random.RandomState(0).randint(3, vocab, length))]
    row: dict[str, Any] = {}
    chosen = {}
    for label, capture in forms(m).items():

        def run(capture=capture, label=label):
            tokens = m.generate(prompt, 1, stop_at_eos=False, capture=capture).tokens
            chosen[label] = np.asarray(jax.block_until_ready(tokens)).tolist()

        start = time.perf_counter()
        run()
        first = time.perf_counter() - start
        row[label] = {"first_s": first, "steady_s": median_seconds(run, repeats, warmup=False)}
    row["ratio"] = row["every_position"]["steady_s"] / row["last_only"]["steady_s"]
    # Greedy, so both forms pick the same token unless the top two logits tie in bfloat16.
    row["same_token"] = chosen["last_only"] == chosen["every_position"]
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["gemma3_4b_text", "gemma3_1b"])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="the teaching model, 1 x 64, CPU")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp

    import gemmalens as gl

    out: dict[str, Any] = {"device": jax.devices()[0].device_kind}
    if args.tiny:
        out["gemma3 (teaching)"] = measure(gl.teaching_model("gemma3"), 64, 2)
    else:
        for preset in args.presets:
            m = gl.build(preset, seed=0, dtype=jnp.bfloat16)
            out[preset] = measure(m, args.length, args.repeats)
            del m
    length = 64 if args.tiny else args.length
    print(f"{out['device']}, generate(prompt of 1 x {length}, 1 new token)\n")
    print(
        "| model | last position only: first / steady | every position | every / last "
        "| same token |"
    )
    print("|---|---|---|---|---|")
    for name, row in out.items():
        if name == "device":
            continue
        last, every = row["last_only"], row["every_position"]
        print(
            f"| {name} | {last['first_s']:.2f} s / {last['steady_s'] * 1e3:.1f} ms | "
            f"{every['first_s']:.2f} s / {every['steady_s'] * 1e3:.1f} ms | {row['ratio']:.2f}x "
            f"| {'yes' if row['same_token'] else 'no'} |"
        )
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
