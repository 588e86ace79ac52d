"""The teaching dictionaries: the trainer's pieces, and the shipped evidence recomputed."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemmalens as gl
from gemmalens.teaching import saes


def test_straight_through_threshold_gradient_is_the_rectangle_kernel():
    fires = saes._straight_through(bandwidth=0.1)
    pre = jnp.array([[0.00, 0.26, 0.34, 0.5], [0.31, 0.9, 0.2, 0.28]])
    threshold = jnp.array([0.3, 0.3, 0.3, 0.3])
    assert np.array_equal(np.asarray(fires(pre, threshold)), np.asarray(pre > threshold))
    d_pre, d_threshold = jax.grad(lambda p, t: fires(p, t).sum(), argnums=(0, 1))(pre, threshold)
    # Within half a bandwidth of the threshold: 0.26, 0.34 (column 1, 2 of row 0), 0.31,
    # 0.28 (row 1, columns 0 and 3); each contributes -1 / bandwidth.
    assert np.allclose(np.asarray(d_threshold), [-10.0, -10.0, -10.0, -10.0])
    assert not np.asarray(d_pre).any()


def test_training_recovers_a_planted_sparse_dictionary():
    rng = np.random.default_rng(0)
    d, width, tokens = 16, 32, 8192
    directions = rng.normal(size=(width, d))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    codes = rng.exponential(1.0, size=(tokens, width)) * (rng.random((tokens, width)) < 0.08)
    x = (codes @ directions).astype(np.float32)
    settings = saes.SAESettings(width=width, steps=600, batch_size=512, target_l0=3.0)
    weights, history = saes.train_dictionary(x, x, settings, skip=False, progress=False)
    sae = gl.sae.SAE(
        **weights, hook_in="blocks.0.hook_resid_post", hook_out="blocks.0.hook_resid_post"
    )
    f = np.asarray(sae.encode(x))
    x_hat = np.asarray(sae.decode(f))
    explained = 1 - np.sum((x - x_hat) ** 2) / np.sum((x - x.mean(0)) ** 2)
    # The planted code has L0 = 0.08 * 32 = 2.6 per token.
    assert explained > 0.8, explained
    assert 1.0 < (f > 0).sum(1).mean() < 6.0, (f > 0).sum(1).mean()
    assert history["l0"][-1] < history["l0"][0]


@pytest.fixture(scope="module")
def teaching():
    return gl.teaching_model("gemma3")


@pytest.mark.parametrize("kind", saes.KINDS)
def test_shipped_evidence_is_what_the_shipped_files_give(teaching, kind):
    folder = saes.dictionary_path(kind)
    sae = gl.sae.load(folder, teaching)
    shipped = json.loads((folder / "evidence.json").read_text())
    tokens = np.load(folder / "evaluation_tokens.npy")
    found = saes.measure(teaching, sae, tokens)
    # Trained and measured on a GPU, recomputed here on a CPU: a few activations sit at a
    # threshold and may flip, so L0 and F1 may move in their last digits.
    assert found["site"] == shipped["site"] and found["tokens"] == shipped["tokens"]
    assert found["variance_explained"] == pytest.approx(shipped["variance_explained"], abs=2e-3)
    assert found["l0"] == pytest.approx(shipped["l0"], rel=1e-2)
    assert found["dead_fraction"] == pytest.approx(shipped["dead_fraction"], abs=3 / sae.d_sae)
    for key in ("model", "spliced_without_error", "delta"):
        assert found["loss"][key] == pytest.approx(shipped["loss"][key], abs=2e-3)
    assert set(found["features"]) == set(shipped["features"])
    for category, entry in shipped["features"].items():
        again = found["features"][category]
        assert again["f1"] == pytest.approx(entry["f1"], abs=0.02), category
    # What the docs claim for them (the transcoder has about a fifth of its features dead).
    assert shipped["variance_explained"] > 0.7
    assert shipped["dead_fraction"] < 0.25
    assert shipped["l0"] < 64


def test_teaching_saes_load_and_splice_without_changing_logits(teaching):
    dictionaries = gl.teaching_saes(teaching)
    assert set(dictionaries) == {"resid_post", "transcoder"}
    assert (
        dictionaries["transcoder"].is_transcoder and dictionaries["transcoder"].w_skip is not None
    )
    spliced = gl.sae.splice(teaching, list(dictionaries.values()))
    tokens, mask = teaching.to_tokens(["The capital of France is", "def f(x): return x + 1"])
    base = np.asarray(teaching(tokens, mask))
    assert np.abs(np.asarray(spliced(tokens, mask)) - base).max() <= 1e-5 * np.abs(base).max()


def test_unknown_dictionary_kind_names_the_kinds():
    with pytest.raises(KeyError, match="resid_post"):
        saes.dictionary_path("attn_out")


def test_docs_show_the_shipped_evidence():
    docs = (pathlib.Path(__file__).parents[1] / "docs" / "teaching-models.md").read_text()
    assert saes.evidence_table() in docs, (
        "docs/teaching-models.md is out of date: paste gemmalens.teaching.saes.evidence_table()"
    )


def test_loading_the_teaching_dictionaries_does_not_need_optax():
    # optax is a training dependency (the test extra); users loading the shipped
    # dictionaries (notebook 10) may not have it.
    code = (
        "import sys; sys.modules['optax'] = None\n"
        "import gemmalens as gl\n"
        "d = gl.teaching_saes(gl.teaching_model('gemma3'))\n"
        "print(sorted(d))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "['resid_post', 'transcoder']" in done.stdout
