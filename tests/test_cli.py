"""The `gemmalens` command line: `gemmalens demo` and `python -m gemmalens`."""

from __future__ import annotations

import base64
import html
import re
import subprocess
import sys
import time

import pytest

import gemmalens as gl
from gemmalens.cli import main


def _report_images(page: str) -> list[bytes]:
    return [
        base64.b64decode(data)
        for data in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    ]


def test_demo_on_the_shipped_model_writes_a_report_with_its_figures(tmp_path, capsys):
    start = time.perf_counter()
    assert main(["demo", "--out", str(tmp_path)]) == 0
    seconds = time.perf_counter() - start
    out = capsys.readouterr().out
    assert seconds < 60, f"the demo took {seconds:.0f} s"

    # What it prints: the model, the answer, the induction head, the lens, the files.
    assert "teaching model shipped with gemmalens (4,398,080 parameters)" in out
    assert out.split("What comes next")[1].splitlines()[2].startswith("  ' Paris'")
    head = re.search(r"head (\d+)\.(\d+): induction score ([\d.]+)", out)
    assert head and float(head.group(3)) > 0.5
    assert "the final prediction first tops the lens after block" in out
    report = tmp_path / "report.html"
    assert f"report: {report}" in out

    page = report.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    # Four figures (predictions, the head's pattern, the lens, all induction scores), each
    # a real PNG with something drawn in it.
    images = _report_images(page)
    assert len(images) == 4
    assert all(png.startswith(b"\x89PNG") and len(png) > 15_000 for png in images)
    # The two interactive viewers, inline, with the head and tokens the demo printed.
    assert 'data-gemmalens-view="attention"' in page and 'data-gemmalens-view="logit-lens"' in page
    assert f"Head <b>{head.group(1)}.{head.group(2)}</b>" in page
    assert "Paris" in page and "Tokyo" in page
    # Self-contained: nothing loads from anywhere else.
    assert "http://" not in page and "https://" not in page and "<script src" not in page
    assert "blocks.0.attn.hook_pattern" in (tmp_path / "model.html").read_text(encoding="utf-8")


def test_demo_takes_a_checkpoint_and_a_prompt(tmp_path, capsys):
    from gemmalens.checkpoints.save import save_checkpoint
    from gemmalens.teaching import configs

    checkpoint = tmp_path / "my-gemma"
    m = gl.teaching_model("gemma3")
    save_checkpoint(
        m,
        checkpoint,
        configs.hf_config("gemma3"),
        dtype="float32",
        tokenizer=gl.teaching_model_path("gemma3") / "tokenizer.model",
    )
    prompt = "When Mary and John went to the store, John gave a drink to"
    code = main(
        [
            "demo",
            "--checkpoint",
            str(checkpoint),
            "--prompt",
            prompt,
            "--out",
            str(tmp_path / "out"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert f"Model: {checkpoint}" in out and "' Mary'" in out
    assert html.escape(prompt) in (tmp_path / "out" / "report.html").read_text(encoding="utf-8")


def test_demo_explains_a_checkpoint_it_cannot_load(tmp_path, capsys):
    assert main(["demo", "--checkpoint", str(tmp_path / "missing")]) == 1
    out = capsys.readouterr().out
    assert "cannot load" in out and "never downloads" in out


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["nonsense"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_python_dash_m_runs_the_cli():
    result = subprocess.run(
        [sys.executable, "-m", "gemmalens", "demo", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "--out DIR" in result.stdout and "--checkpoint DIR" in result.stdout
