"""The ``gemmalens`` command line.

``gemmalens demo [--out DIR]`` builds a tiny, randomly initialised Gemma 3 and walks
through what gemmalens does with it: hook names, caching, interventions, an attention
plot and a Treescope rendering. It runs offline on a laptop CPU in about 15 seconds.
"""

from __future__ import annotations

import argparse
import html
import pathlib
import time
from collections.abc import Sequence

DEFAULT_DEMO_DIR = "gemmalens-demo"
DEMO_PROMPT = "The quiet river runs past the old mill."
_RULE = "-" * 78


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gemmalens`` console script; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "demo":
        run_demo(pathlib.Path(args.out))
        return 0
    parser.error(f"unknown command {args.command!r}")  # argparse rejects it before this
    return 2


def _parser() -> argparse.ArgumentParser:
    from gemmalens import __version__

    parser = argparse.ArgumentParser(
        prog="gemmalens",
        description="The Gemma family as named, inspectable Penzai models, with hooks.",
    )
    parser.add_argument("--version", action="version", version=f"gemmalens {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="a tour on a tiny random Gemma 3 (offline, CPU, about 15 s)",
        description=(
            "Builds a tiny, randomly initialised Gemma 3 with a tiny tokenizer, prints hook "
            "names, cached activations and an intervention, and writes attention.png and "
            "model.html into the output folder."
        ),
    )
    demo.add_argument(
        "--out",
        default=DEFAULT_DEMO_DIR,
        metavar="DIR",
        help=f"folder for the demo's files (default: ./{DEFAULT_DEMO_DIR})",
    )
    return parser


# --------------------------------------------------------------------------------- demo


def _section(number: int, total: int, title: str) -> None:
    print()
    print(_RULE)
    print(f"[{number}/{total}] {title}")
    print(_RULE)


def run_demo(out: pathlib.Path) -> None:
    """Runs the demo, printing to stdout and writing its files into ``out``."""
    start = time.perf_counter()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    import jax
    import jax.numpy as jnp
    import numpy as np

    import gemmalens as gl
    from gemmalens.testing import make_tiny_sentencepiece

    print("gemmalens demo: a tour of gemmalens on a tiny Gemma 3")
    print(f"Runs offline on {jax.devices()[0].platform.upper()}; files go to {out}")
    sections = 6

    # 1 ------------------------------------------------------------------ presets
    _section(1, sections, "The real architectures: gl.presets()")
    print("Each released architecture is a preset config. Parameters are counted from the")
    print("config alone (cfg.num_params()); nothing is allocated or downloaded.")
    print()
    print(
        f"  {'preset':<20}{'family':<10}{'parameters':>16}  {'layers':>6}  {'d_model':>7}  "
        f"{'window':>6}"
    )

    def field(cfg, name):  # families may lack a field (encoder-decoders, say)
        value = getattr(cfg, name, None)
        return "-" if value is None else value

    configs = {name: gl.preset(name) for name in gl.presets()}
    counts = {name: cfg.num_params() for name, cfg in configs.items()}
    for name in sorted(configs, key=lambda n: (field(configs[n], "family"), counts[n])):
        cfg = configs[name]
        print(
            f"  {name:<20}{field(cfg, 'family'):<10}{counts[name]:>16,}  "
            f"{field(cfg, 'num_hidden_layers'):>6}  {field(cfg, 'hidden_size'):>7}  "
            f"{field(cfg, 'sliding_window'):>6}"
        )

    # 2 ------------------------------------------------------------------ tiny model
    _section(2, sections, "A tiny tokenizer and a tiny Gemma 3")
    tokenizer_path = make_tiny_sentencepiece(out)
    tok = gl.Tokenizer.from_file(tokenizer_path)
    print("tok = gl.Tokenizer.from_file(make_tiny_sentencepiece(out))")
    print(f"  {tok.vocab_size} pieces, trained in well under a second on a few paragraphs")
    print(f"  -> {tokenizer_path}")
    num_layers = 7
    config = gl.Gemma3Config(
        vocab_size=tok.vocab_size,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=4,
        layer_types=gl.Gemma3Config.default_layer_types(num_layers),
    )
    m = gl.build(config, seed=0, tokenizer=tok)
    print("m = gl.build(gl.Gemma3Config(hidden_size=64, num_hidden_layers=7, sliding_window=4,")
    print("                             ...), seed=0, tokenizer=tok)")
    print(f"  {m!r}")
    print(f"  {config.num_params():,} parameters")
    kinds = {"sliding_attention": "local", "full_attention": "GLOBAL"}
    print("  layers: " + "  ".join(f"{i}:{kinds[t]}" for i, t in enumerate(config.layer_types)))
    print("  As in every Gemma 3, five local layers alternate with one global layer. A local")
    print(
        f"  layer's queries see the last {config.sliding_window} tokens, themselves included (512 or 1024"
    )
    print("  in the real models); a global layer's queries see every earlier token.")
    print()
    print("  The weights are random (normal(0, 0.02), seed 0): this model has learned")
    print("  nothing, and its predictions are noise. Everything below shows the machinery")
    print("  and the structure of the architecture, not learned behaviour. Trained teaching")
    print("  models come in a later release; gl.load() runs real Gemma 3 checkpoints.")

    # 3 ------------------------------------------------------------------ hook names
    _section(3, sections, "Hook points: m.hook_names")
    names = m.hook_names
    shown = 20
    print(f"{len(names)} named hook points, in forward order. The first {shown}:")
    for name in names[:shown]:
        print(f"  {name}")
    print(f"  ... up to {names[-1]}")
    print("Names follow TransformerLens, so its tutorials and habits carry over.")

    # 4 ------------------------------------------------------------------ running
    _section(4, sections, "Running it: m(text) and m.run_with_cache(...)")
    tokens, _ = m.to_tokens(DEMO_PROMPT)
    pieces = [tok.id_to_piece(int(i)) for i in np.asarray(tokens[0])]
    print(f"prompt: {DEMO_PROMPT!r}")
    print(f"tokens, mask = m.to_tokens(prompt) -> shape {tuple(tokens.shape)}")
    print(f"  {' | '.join(pieces)}")
    logits = m(DEMO_PROMPT)
    print(f"logits = m(prompt)  -> shape {tuple(logits.shape)}  [batch, seq, vocab]")
    print()
    print('logits, cache = m.run_with_cache(prompt, names="blocks.*.attn.hook_pattern")')
    _, cache = m.run_with_cache(DEMO_PROMPT, names="blocks.*.attn.hook_pattern")
    print(f"  {len(cache)} arrays, [batch, head, query, key]; the most keys any query attends to:")
    for i, (name, pattern) in enumerate(cache.items()):
        widest = int((np.asarray(pattern) > 0).sum(-1).max())
        local = config.layer_types[i] == "sliding_attention"
        kind = f"local, window {config.sliding_window}" if local else "GLOBAL"
        print(f"  {name:<28} {tuple(pattern.shape)}  {widest:>2} keys  ({kind})")

    # 5 ------------------------------------------------------------------ interventions
    _section(5, sections, "Intervening: m.run_with_hooks(tokens, hooks={name: fn})")
    print("A hook function gets (value, name) and returns a replacement (or None).")
    print()
    print('ablated = m.run_with_hooks(tokens, hooks={"blocks.0.hook_resid_post":')
    print("                                          lambda v, name: v * 0})")
    clean = m(tokens)
    ablated = m.run_with_hooks(tokens, hooks={"blocks.0.hook_resid_post": lambda v, name: v * 0})
    change = jnp.abs(ablated - clean)
    print(
        f"  logits change: max |delta| = {float(change.max()):.4f}, "
        f"mean |delta| = {float(change.mean()):.4f}"
    )
    if bool(jnp.all(ablated == 0)):
        print("  The ablated logits are exactly zero: Gemma has no bias terms, so once the")
        print("  residual stream is zero every later layer adds zero to it.")
    print()
    head_name = "blocks.5.attn.hook_z"
    print("A finer cut: silence head 0 of the global layer (hook_z: [batch, pos, head, d_head]).")
    print(f'head_off = m.run_with_hooks(tokens, hooks={{"{head_name}":')
    print("                                           lambda z, name: z.at[:, :, 0].set(0)})")
    head_off = m.run_with_hooks(tokens, hooks={head_name: lambda z, name: z.at[:, :, 0].set(0)})
    head_change = jnp.abs(head_off - clean)
    print(
        f"  logits change: max |delta| = {float(head_change.max()):.4f}, "
        f"mean |delta| = {float(head_change.mean()):.4f}"
    )
    print("  A smaller change than wiping the residual stream. Hooked runs are compiled")
    print("  with jax.jit too: calling again with the same hook functions and shapes reuses")
    print("  the compiled code (a freshly written lambda is a new function: it recompiles).")

    # 6 ------------------------------------------------------------------ pictures
    _section(6, sections, "Pictures")
    local_layer = config.layer_types.index("sliding_attention")
    global_layer = config.layer_types.index("full_attention")
    png = out / "attention.png"
    _plot_attention(
        png,
        pieces,
        {
            f"blocks.{local_layer}: local (sliding window of {config.sliding_window})": np.asarray(
                cache[f"blocks.{local_layer}.attn.hook_pattern"][0, 0]
            ),
            f"blocks.{global_layer}: global (every earlier token)": np.asarray(
                cache[f"blocks.{global_layer}.attn.hook_pattern"][0, 0]
            ),
        },
    )
    print(f"attention.png: head 0 of blocks.{local_layer} (local) beside blocks.{global_layer}")
    print(f"  (global) on the prompt -> {png}")
    print(
        "  The meaningful part is where attention can be non-zero: a band of "
        f"{config.sliding_window} keys"
    )
    print("  for the local layer, the whole causal triangle for the global one. The")
    print("  weights inside are random (QK-norm keeps even random scores of order one).")
    page = out / "model.html"
    _write_treescope_page(page, m.model)
    print("model.html: the whole Penzai model in Treescope, every layer and hook point")
    print(f"  named; open it in a browser (it needs no network) -> {page}")
    print("  In Jupyter, treescope.display(m.model) shows the same, live.")

    print()
    print(_RULE)
    print("Next steps")
    print(_RULE)
    print('  m = gl.load("path/to/gemma-3-1b")   # a local Hugging Face checkpoint directory:')
    print("                                      # config.json, *.safetensors, tokenizer.model")
    print('  logits, cache = m.run_with_cache("The capital of France is")')
    print('  cache["blocks.5.attn.hook_pattern"]  # a real sliding-vs-global comparison')
    print("  gemmalens never downloads weights: put the checkpoint on disk first.")
    print(f"\nDone in {time.perf_counter() - start:.1f} s.")


def _plot_attention(path: pathlib.Path, pieces: list[str], patterns: dict) -> None:
    """Saves the attention patterns side by side, masked cells in grey, one colour scale."""
    import matplotlib
    import numpy as np
    from matplotlib.figure import Figure

    labels = pieces  # SentencePiece writes a leading space as ▁, as printed above
    n = len(labels)
    fig = Figure(figsize=(6.0 * len(patterns) + 1.0, 7.0), layout="constrained")
    axes = fig.subplots(1, len(patterns))
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#d9d9d9")
    image = None
    for ax, (title, pattern) in zip(axes, patterns.items()):
        shown = np.ma.masked_where(pattern <= 0, pattern)
        image = ax.imshow(shown, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(title, fontsize=11)
        ax.set_xticks(range(n), labels, rotation=90, fontsize=8)
        ax.set_yticks(range(n), labels, fontsize=8)
        ax.set_xlabel("key: the token attended to")
        ax.set_ylabel("query: the token attending")
    fig.colorbar(image, ax=axes[-1], shrink=0.8, label="attention weight (grey: masked out)")
    fig.suptitle(
        "Attention patterns (head 0) of a tiny, randomly initialised Gemma 3\n"
        "The structure comes from the masks, not from training",
        fontsize=12,
    )
    fig.savefig(path, dpi=110)


def _write_treescope_page(path: pathlib.Path, model) -> None:
    """Writes Treescope's rendering of ``model`` as a standalone HTML page.

    Treescope's HTML carries its own scripts and styles inline and loads nothing from the
    network. It is written uncompressed so that the page works in any browser and its
    text (layer and hook names) can be searched.
    """
    import treescope

    body = treescope.render_to_html(model, compressed=False)
    title = "gemmalens demo: a tiny Gemma 3 in Treescope"
    path.write_text(
        "<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
        f"<title>{html.escape(title)}</title>\n</head>\n<body>\n"
        f"<h2 style='font-family: sans-serif'>{html.escape(title)}</h2>\n"
        "<p style='font-family: sans-serif'>Click the triangles to unfold a layer. Hook points "
        "are the named yellow HookPoint layers; the weights are random.</p>\n"
        f"{body}\n</body>\n</html>\n",
        encoding="utf-8",
    )
