"""The ``gemmalens`` command line.

``gemmalens demo`` loads the Gemma 3 style teaching model that ships inside the package
(or ``--checkpoint DIR``, a real Gemma checkpoint), runs a prompt, prints what it finds
and writes ``report.html``: the top next-token predictions, the strongest induction head's
attention, a logit lens over the layers and every head's induction score, all inline. It
runs offline on a laptop CPU in well under a minute.
"""

from __future__ import annotations

import argparse
import html
import pathlib
import time
from collections.abc import Sequence

DEFAULT_DEMO_DIR = "gemmalens-demo"
_RULE = "-" * 78


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gemmalens`` console script; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "demo":
        return run_demo(pathlib.Path(args.out), args.checkpoint, args.prompt)
    parser.error(f"unknown command {args.command!r}")  # argparse rejects it before this
    return 2


def _parser() -> argparse.ArgumentParser:
    from gemmalens import __version__
    from gemmalens.report import DEFAULT_PROMPT

    parser = argparse.ArgumentParser(
        prog="gemmalens",
        description="The Gemma family as named, inspectable Penzai models, with hooks.",
    )
    parser.add_argument("--version", action="version", version=f"gemmalens {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="run a prompt through the shipped teaching model and write an HTML report",
        description=(
            "Loads the Gemma 3 style teaching model shipped with gemmalens (or --checkpoint), "
            "runs --prompt, prints the top predictions, the strongest induction head and the "
            "logit lens, and writes report.html (self-contained) and model.html (the model "
            "in Treescope) into --out."
        ),
    )
    demo.add_argument(
        "--checkpoint",
        metavar="DIR",
        default=None,
        help="a local Hugging Face Gemma checkpoint folder (config.json, *.safetensors, "
        "tokenizer.model); default: the shipped teaching model",
    )
    demo.add_argument("--prompt", default=DEFAULT_PROMPT, help="the text to run")
    demo.add_argument(
        "--out",
        default=DEFAULT_DEMO_DIR,
        metavar="DIR",
        help=f"folder for the report (default: ./{DEFAULT_DEMO_DIR})",
    )
    return parser


# --------------------------------------------------------------------------------- demo


def _section(title: str) -> None:
    print()
    print(_RULE)
    print(title)
    print(_RULE)


def run_demo(out: pathlib.Path, checkpoint: str | None = None, prompt: str | None = None) -> int:
    """Runs the demo, printing to stdout and writing its files into ``out``."""
    start = time.perf_counter()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    import jax

    import gemmalens as gl
    from gemmalens.report import DEFAULT_PROMPT, write_report

    prompt = DEFAULT_PROMPT if prompt is None else prompt
    if checkpoint is None:
        m = gl.teaching_model("gemma3")
        source = f"the Gemma 3 style teaching model shipped with gemmalens ({m.config.num_params():,} parameters)"
        title = "gemmalens demo: the Gemma 3 teaching model"
    else:
        try:
            m = gl.load(checkpoint)
        except (gl.CheckpointError, FileNotFoundError, ValueError) as error:
            print(f"gemmalens demo: cannot load {checkpoint}:\n  {error}")
            return 1
        source = f"{checkpoint} ({m.config.num_params():,} parameters)"
        title = f"gemmalens demo: {pathlib.Path(checkpoint).name}"
    print(f"gemmalens demo on {jax.devices()[0].platform.upper()}, offline")
    print(f"Model: {source}")
    print(f"  {m!r}")

    _section("The prompt, as tokens")
    tokens, _ = m.to_tokens(prompt)
    pieces = [m.tokenizer.id_to_piece(int(t)) for t in tokens[0]]
    print(f"  {prompt!r}")
    print(f"  {len(pieces)} tokens: " + " ".join(pieces))

    report_path = out / "report.html"
    try:
        findings = write_report(m, prompt, report_path, title)
    except ValueError as error:
        print(f"gemmalens demo: {error}")
        return 1

    _section("What comes next (m(prompt)[0, -1], softmax)")
    for text, probability in findings.top_predictions[:5]:
        print(f"  {text!r:<16} {probability:6.3f}")

    _section("The strongest induction head (gl.circuits.induction_scores)")
    layer, head, score = findings.induction_head
    print(f"  head {layer}.{head}: induction score {score:.2f} on repeated random tokens")
    print(
        f"  (uniform attention over the keys layer {layer} can see: {findings.induction_chance:.3f})"
    )
    if findings.prompt_example is not None:
        query, key, weight = findings.prompt_example
        piece = m.tokenizer.id_to_piece
        print(
            f"  on the prompt: {piece(int(tokens[0, query]))!r} at {query} gives {weight:.2f} of "
            f"its attention to {piece(int(tokens[0, key]))!r} at {key}, which followed it before"
        )

    _section("The logit lens (cache.logit_lens)")
    if findings.lens_first_layer is None:
        print("  the final prediction tops the lens only at the very end")
    else:
        print(
            f"  the final prediction first tops the lens after block {findings.lens_first_layer}"
            f" of {m.config.num_hidden_layers}"
        )

    _write_treescope_page(out / "model.html", m.model, title)
    _section("Files")
    print(f"  report: {report_path}")
    print(f"  model:  {out / 'model.html'} (the model in Treescope)")
    print(f"\nDone in {time.perf_counter() - start:.1f} s.")
    return 0


def _write_treescope_page(path: pathlib.Path, model, title: str) -> None:
    """Writes Treescope's rendering of ``model`` as a standalone HTML page.

    Treescope's HTML carries its own scripts and styles inline and loads nothing from the
    network. It is written uncompressed so that the page works in any browser and its
    text (layer and hook names) can be searched.
    """
    import treescope

    body = treescope.render_to_html(model, compressed=False)
    path.write_text(
        "<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
        f"<title>{html.escape(title)}</title>\n</head>\n<body>\n"
        f"<h2 style='font-family: sans-serif'>{html.escape(title)}</h2>\n"
        "<p style='font-family: sans-serif'>Click the triangles to unfold a layer. Hook points "
        "are the named HookPoint layers.</p>\n"
        f"{body}\n</body>\n</html>\n",
        encoding="utf-8",
    )
