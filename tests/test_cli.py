"""The `gemmalens` command line: `gemmalens demo` and `python -m gemmalens`."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gemmalens.cli import main


def test_demo_writes_its_files_and_explains_itself(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out

    png = tmp_path / "attention.png"
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert png.stat().st_size > 20_000  # a real figure, not an empty canvas
    page = (tmp_path / "model.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert "blocks.0" in page
    assert "blocks.0.attn.hook_pattern" in page  # hook points are named in the rendering
    assert "<script src" not in page and "http://" not in page and "https://" not in page
    assert (tmp_path / "tokenizer.model").is_file()

    # The real architectures, with thousands separators.
    assert "gemma3_1b" in out and "999,885,952" in out
    assert "27,009,002,240" in out
    # The tiny model and its hook points.
    assert "gemmalens.Model(gemma3, 7 layers, d_model=64" in out
    assert "blocks.0.attn.hook_pattern" in out
    # Logits and cache shapes for the 17-token prompt.
    assert "(1, 17, 640)" in out
    assert "blocks.0.attn.hook_pattern   (1, 4, 17, 17)   4 keys  (local, window 4)" in out
    assert "blocks.5.attn.hook_pattern   (1, 4, 17, 17)  17 keys  (GLOBAL)" in out
    # The intervention and the honesty about random weights.
    assert "logits change: max |delta|" in out
    assert "The ablated logits are exactly zero" in out
    assert "The weights are random" in out
    assert "Next steps" in out and "gl.load(" in out


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
    assert "--out DIR" in result.stdout
