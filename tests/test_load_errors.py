"""Bad checkpoints give errors that name the problem and the fix."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import gemmalens as gl
from tests import hf_reference as ref


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("good")
    ref.gemma3_text(directory)
    return directory


@pytest.fixture
def checkpoint(good_checkpoint, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(good_checkpoint, copy)
    return copy


def _edit_tensors(directory, edit):
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def _edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_missing_directory(tmp_path):
    with pytest.raises(gl.CheckpointError, match="never downloads"):
        gl.load(tmp_path / "no-such-dir")


def test_missing_tensor(checkpoint):
    _edit_tensors(checkpoint, lambda t: t.pop("model.layers.3.mlp.up_proj.weight"))
    with pytest.raises(
        gl.CheckpointError, match=r"(?s)1 missing tensor.*model\.layers\.3\.mlp\.up_proj"
    ):
        gl.load(checkpoint)


def test_extra_tensor(checkpoint):
    _edit_tensors(
        checkpoint, lambda t: t.update({"model.layers.0.mystery.weight": np.ones(3, np.float32)})
    )
    with pytest.raises(
        gl.CheckpointError, match=r"(?s)unexpected tensor.*model\.layers\.0\.mystery\.weight"
    ):
        gl.load(checkpoint)


def test_misshaped_tensor(checkpoint):
    def shrink(tensors):
        key = "model.layers.2.self_attn.q_proj.weight"
        tensors[key] = tensors[key][:32]

    _edit_tensors(checkpoint, shrink)
    with pytest.raises(
        gl.CheckpointError,
        match=r"(?s)wrong shape.*q_proj\.weight: expected \(64, 64\), found \(32, 64\)",
    ):
        gl.load(checkpoint)


def test_config_that_does_not_match_the_weights(checkpoint):
    _edit_config(checkpoint, intermediate_size=96)
    with pytest.raises(
        gl.CheckpointError, match=r"(?s)wrong shape.*expected \(96, 64\), found \(128, 64\)"
    ):
        gl.load(checkpoint)


def test_truncated_file(checkpoint):
    path = checkpoint / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(gl.CheckpointError, match="truncated"):
        gl.load(checkpoint)


def test_unsupported_architecture(checkpoint):
    _edit_config(checkpoint, model_type="llama", architectures=["LlamaForCausalLM"])
    with pytest.raises(gl.CheckpointError, match="model_type 'llama'.*'gemma3_text'"):
        gl.load(checkpoint)


def test_family_not_implemented_yet(checkpoint):
    """A model_type gemmalens does not know yet: the error names it and lists what loads."""
    _edit_config(checkpoint, model_type="gemma5", architectures=["Gemma5ForCausalLM"])
    with pytest.raises(
        gl.CheckpointError,
        match=r"model_type 'gemma5' \(architectures \['Gemma5ForCausalLM'\]\).*'t5gemma2'",
    ):
        gl.load(checkpoint)


def test_pickle_checkpoints_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3_text"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(gl.CheckpointError, match="safetensors"):
        gl.load(tmp_path)


def test_unknown_dtype(checkpoint):
    with pytest.raises(ValueError, match="dtype must be one of"):
        gl.load(checkpoint, dtype="float16")


def test_unsupported_config_feature(checkpoint):
    _edit_config(checkpoint, attention_bias=True)
    with pytest.raises(ValueError, match="attention_bias"):
        gl.load(checkpoint)


def test_progress_bar_on_request(good_checkpoint, capsys):
    gl.load(good_checkpoint, show_progress=True)
    assert "Loading weights" in capsys.readouterr().err
    gl.load(good_checkpoint)  # small checkpoints load silently by default
    assert "Loading weights" not in capsys.readouterr().err
