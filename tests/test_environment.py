"""environment.yml (conda) pins what pyproject.toml pins: the two must not drift."""

from __future__ import annotations

import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _pyproject_requirements() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return set(project["dependencies"]) | set(project["optional-dependencies"]["test"])


def _environment_requirements() -> set[str]:
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = lines.index("  - pip:") + 1
    entries = [line.strip()[2:].strip().strip('"') for line in lines[start:] if line.strip()]
    return {entry for entry in entries if entry != "-e ."}


def test_environment_yml_pins_what_pyproject_pins():
    assert _environment_requirements() == _pyproject_requirements()


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = readme.split("```bash\n")[1:3]
    demo, tests = (block.split("\n```")[0].strip() for block in blocks)
    assert demo.endswith("gemmalens demo")
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == tests


def test_torch_is_the_cpu_build():
    """torch is only a numerical reference: the test command must keep the CPU build (an
    unpinned torch, or torchvision from PyPI, brings a CUDA build of several GB)."""
    import torch

    assert torch.version.cuda is None, f"torch {torch.__version__} is a CUDA build"
    assert torch.__version__.endswith("+cpu"), torch.__version__
