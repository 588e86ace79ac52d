"""The Python examples of the README and the documentation run, on the teaching models.

Each ```python block runs as written, after the names it takes as given (``m``, ``tokens``,
``clean``, ``metric``, ``path``, ...) are defined on a teaching model, with a checkpoint
path replaced by that model's folder. Blocks that need what the suite does not have (a mesh
of eight devices, several hosts, a Kaggle checkpoint, a real multimodal checkpoint and its
image or clip) are listed in `NOT_RUN` with the tests that run their calls instead, and a block that is neither run nor listed fails the check.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import gemmalens as gl
from gemmalens import patching

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)

NOT_RUN = {
    ("docs/sharding.md", 0): "a mesh of 8 devices: tests/test_sharding.py (sharding_check)",
    ("docs/sharding.md", 1): "a mesh of 8 devices: tests/test_sharding.py",
    ("docs/sharding.md", 2): "a mesh of 8 devices: tests/test_sharding.py (split sites)",
    ("docs/sharding.md", 3): "a mesh of 8 devices: tests/test_sharding.py (sequence)",
    ("docs/sharding.md", 4): "two hosts: tests/test_sharding.py::test_two_processes_as_two_hosts",
    ("docs/stacking.md", 1): "a mesh of 8 devices: tests/test_sharding.py (stacked)",
    ("docs/checkpoint-formats.md", 0): "a gemma-library checkpoint: tests/test_gemma_library.py",
    # A real multimodal checkpoint and the reader's cat.png / speech.wav; the tests build
    # tiny multimodal checkpoints and make their own images and clips.
    (
        "docs/architectures/gemma3.md",
        0,
    ): "tests/test_gemma3_multimodal.py, test_vision_preprocess.py",
    ("docs/architectures/gemma3n.md", 0): "tests/test_gemma3n_multimodal.py",
    (
        "docs/architectures/gemma3n.md",
        1,
    ): "tests/test_gemma3n_audio_model.py, test_audio_features.py",
    ("docs/architectures/gemma4.md", 0): "tests/test_vision_gemma4.py",
    ("docs/architectures/gemma4.md", 1): "tests/test_audio_gemma4.py, test_audio_features.py",
    ("docs/architectures/t5gemma2.md", 0): "tests/test_t5gemma2_multimodal.py",
}

TEACHING = 'gl.teaching_model_path("gemma3")'
# Where an example names a checkpoint on the reader's disk, or a length only a real run needs.
REPLACE = {
    "README.md": {'"checkpoints/gemma-3-1b-it"': TEACHING},
    "docs/index.md": {'"checkpoints/gemma-3-1b-it"': TEACHING},
    "docs/stacking.md": {'"path/to/gemma-3-27b"': TEACHING},
    "docs/checkpoint-formats.md": {"steps=100": "steps=2", '"peft-adapter/"': '"adapter/"'},
}


def examples() -> list[tuple[str, int, str]]:
    found = []
    for page in PAGES:
        name = page.relative_to(ROOT).as_posix()
        if name.startswith("docs/_build/"):
            continue
        for index, code in enumerate(BLOCK.findall(page.read_text())):
            found.append((name, index, code))
    return found


EXAMPLES = examples()
RUN = [example for example in EXAMPLES if example[:2] not in NOT_RUN]


def given(page: str, index: int) -> dict:
    """The names an example takes as given: a teaching model and its inputs (T5Gemma 2 for
    the encoder-decoder's sites, Gemma 3 elsewhere)."""
    encoder_decoder = (page, index) == ("docs/api/patching.md", 1)
    name = "t5gemma2" if encoder_decoder else "gemma3"
    clean = np.random.RandomState(0).randint(3, 400, (1, 6))
    corrupted = clean.copy()
    corrupted[0, 2] += 1
    names = dict(
        gl=gl,
        patching=patching,
        m=gl.teaching_model(name),
        path=gl.teaching_model_path(name),
        tokens=clean,
        clean=clean,
        corrupted=corrupted,
        metric=lambda logits: logits[0, -1, 5] - logits[0, -1, 6],
        rng=np.random.default_rng(0),
    )
    if encoder_decoder:
        decoder = np.array([[2, 10, 11]])
        names.update(decoder=decoder, other=decoder + np.array([[0, 0, 1]]))
    return names


@pytest.mark.parametrize("page, index, code", RUN, ids=[f"{p}[{i}]" for p, i, _ in RUN])
def test_example_runs(page, index, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # what an example writes (an adapter folder) lands here
    for old, new in REPLACE.get(page, {}).items():
        assert old in code, f"{page}: {old!r} is no longer in the example; update REPLACE"
        code = code.replace(old, new)
    exec(compile(code, f"{page}[{index}]", "exec"), given(page, index))


def test_every_example_is_run_or_says_why():
    assert len(RUN) >= 10
    listed = {example[:2] for example in EXAMPLES}
    stale = set(NOT_RUN) - listed
    assert not stale, f"NOT_RUN names blocks that are gone: {sorted(stale)}"
