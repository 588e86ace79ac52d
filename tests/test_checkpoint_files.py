"""Tests for gemmalens.checkpoints: safetensors parsing, memory mapping and error messages."""

from __future__ import annotations

import json
import mmap
import pathlib
import pickle
import struct

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from gemmalens.checkpoints import (
    CheckpointDir,
    CheckpointError,
    MissingTensorError,
    check_tensor_set,
)

CONFIG = {"model_type": "gemma", "hidden_size": 4}


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "model.embed_tokens.weight": rng.standard_normal((6, 4)).astype(np.float32),
        "model.layers.0.mlp.up_proj.weight": rng.standard_normal((8, 4)).astype(np.float32),
        "model.layers.0.input_layernorm.weight": rng.standard_normal(4).astype(np.float32),
        "model.norm.weight": rng.standard_normal(4).astype(ml_dtypes.bfloat16),
    }


def _make_dir(tmp_path: pathlib.Path, name: str = "ckpt", config: object = CONFIG) -> pathlib.Path:
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    return d


def _single(tmp_path: pathlib.Path, tensors: dict[str, np.ndarray] | None = None) -> pathlib.Path:
    d = _make_dir(tmp_path)
    save_file(tensors if tensors is not None else _tensors(), str(d / "model.safetensors"))
    return d


def _sharded(tmp_path: pathlib.Path, weight_map_extra: dict[str, str] | None = None):
    d = _make_dir(tmp_path)
    t = _tensors()
    names = sorted(t)
    shards = {
        "model-00001-of-00002.safetensors": names[:2],
        "model-00002-of-00002.safetensors": names[2:],
    }
    weight_map = {}
    for fname, keys in shards.items():
        save_file({k: t[k] for k in keys}, str(d / fname))
        weight_map.update({k: fname for k in keys})
    weight_map.update(weight_map_extra or {})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return d, t


def _write_raw(path: pathlib.Path, header: object, data: bytes = b"") -> None:
    """Write a safetensors-shaped file with an arbitrary (possibly broken) header."""
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


# -- reading ------------------------------------------------------------------------------


def test_single_file_round_trip(tmp_path):
    d = _single(tmp_path)
    (d / "tokenizer.model").write_bytes(b"\x00")
    t = _tensors()
    ckpt = CheckpointDir(d)
    assert ckpt.path == d
    assert ckpt.config == CONFIG
    assert ckpt.tokenizer_path == d / "tokenizer.model"
    assert ckpt.files == [d / "model.safetensors"]
    assert ckpt.keys() == sorted(t)
    assert len(ckpt) == len(t)
    assert "model.norm.weight" in ckpt
    assert "nope" not in ckpt and 3 not in ckpt
    for k, v in t.items():
        assert ckpt.shape(k) == v.shape
        assert ckpt.dtype(k) == v.dtype
        a = ckpt.array(k)
        assert a.dtype == v.dtype and a.shape == v.shape
        np.testing.assert_array_equal(a.view(np.uint8), v.view(np.uint8))
    assert ckpt.nbytes() == sum(v.nbytes for v in t.values())
    assert "4 tensors in 1 file(s)" in repr(ckpt)


def test_array_is_a_read_only_view_not_a_copy(tmp_path):
    ckpt = CheckpointDir(_single(tmp_path))
    a = ckpt.array("model.embed_tokens.weight")
    assert not a.flags.owndata
    assert not a.flags.writeable
    with pytest.raises(ValueError):
        a[0, 0] = 1.0
    # The chain of bases must end at the memory map, not at a private buffer.
    base = a
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    assert isinstance(base, mmap.mmap)


def test_bf16_bits_exact(tmp_path):
    bits = np.array([0x0000, 0x8000, 0x3F80, 0x7F80, 0xFF80, 0x7FC1, 0x0001, 0x4049], np.uint16)
    v = bits.view(ml_dtypes.bfloat16).reshape(2, 4)
    d = _single(tmp_path, {"w": v})
    ckpt = CheckpointDir(d)
    assert ckpt.dtype("w") == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(ckpt.array("w").view(np.uint16).ravel(), bits)


@pytest.mark.parametrize(
    "dtype",
    [np.float64, np.float32, np.float16, ml_dtypes.bfloat16, np.int64, np.int32, np.int16, np.int8]
    + [np.uint8, np.bool_],
)
def test_all_supported_dtypes(tmp_path, dtype):
    v = (np.arange(12) % 3 - 1).astype(dtype).reshape(3, 4)
    ckpt = CheckpointDir(_single(tmp_path, {"x": v, "scalar": np.array(7, np.int32)}))
    assert ckpt.dtype("x") == np.dtype(dtype)
    np.testing.assert_array_equal(ckpt.array("x"), v)
    assert ckpt.array("scalar").shape == () and ckpt.array("scalar") == 7


def test_zero_size_tensor(tmp_path):
    ckpt = CheckpointDir(_single(tmp_path, {"empty": np.zeros((0, 3), np.float32)}))
    assert ckpt.shape("empty") == (0, 3)
    assert ckpt.array("empty").shape == (0, 3)


def test_sharded_with_index(tmp_path):
    d, t = _sharded(tmp_path)
    ckpt = CheckpointDir(d)
    assert [f.name for f in ckpt.files] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert ckpt.keys() == sorted(t)
    assert ckpt.tokenizer_path is None
    for k, v in t.items():
        np.testing.assert_array_equal(ckpt.array(k).view(np.uint8), v.view(np.uint8))
    assert ckpt.nbytes() == sum(v.nbytes for v in t.values())


def test_shards_without_index_are_all_read(tmp_path):
    d, t = _sharded(tmp_path)
    (d / "model.safetensors.index.json").unlink()
    assert CheckpointDir(d).keys() == sorted(t)


def test_close_and_context_manager(tmp_path):
    d = _single(tmp_path)
    with CheckpointDir(d) as ckpt:
        a = ckpt.array("model.norm.weight")
        expected = a.copy()
    # Arrays handed out earlier keep their map alive.
    np.testing.assert_array_equal(a, expected)
    with pytest.raises(CheckpointError, match="has been closed"):
        ckpt.array("model.norm.weight")
    ckpt.close()  # idempotent
    assert ckpt.shape("model.norm.weight") == (4,)  # headers stay available


def test_tilde_is_expanded(tmp_path, monkeypatch):
    _single(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert CheckpointDir("~/ckpt").path == tmp_path / "ckpt"


def test_git_files_and_non_weights_are_ignored(tmp_path):
    d = _single(tmp_path)
    (d / "gemma-2b.gguf").write_bytes(b"GGUF")  # real Gemma repositories ship one
    (d / "training_args.bin").write_bytes(b"x")
    assert len(CheckpointDir(d).keys()) == 4


# -- directory-level errors ---------------------------------------------------------------


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match=r"does not exist(.|\n)*never downloads"):
        CheckpointDir(tmp_path / "nowhere")


def test_hub_id_hint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="looks like a Hugging Face Hub model id"):
        CheckpointDir("google/gemma-2b")


def test_path_is_a_file(tmp_path):
    d = _single(tmp_path)
    with pytest.raises(CheckpointError, match=r"is a file, not a directory(.|\n)*ckpt"):
        CheckpointDir(d / "model.safetensors")


def test_config_missing(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    with pytest.raises(CheckpointError, match=r"has no config.json(.|\n)*never downloads"):
        CheckpointDir(d)


def test_config_missing_suggests_hf_cache_snapshot(tmp_path):
    root = tmp_path / "models--google--gemma-2b"
    snap = root / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"Did you mean .*snapshots.abc123"):
        CheckpointDir(root)


def test_config_invalid_json(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "config.json").write_text('{\n  "a": 1,\n  "b": \n}')
    with pytest.raises(CheckpointError, match=r"config.json.*not valid JSON.*line 4, column 1"):
        CheckpointDir(d)


def test_config_not_an_object(tmp_path):
    d = _make_dir(tmp_path, config=[1, 2])
    with pytest.raises(CheckpointError, match="should hold a JSON object, found list"):
        CheckpointDir(d)


def test_no_safetensors(tmp_path):
    d = _make_dir(tmp_path)
    (d / "README.md").write_text("hi")
    with pytest.raises(CheckpointError, match=r"no \*.safetensors weight files.*README.md"):
        CheckpointDir(d)


@pytest.mark.parametrize(
    "fname", ["pytorch_model.bin", "pytorch_model-00001-of-00002.bin", "w.pt", "w.ckpt", "w.pth"]
)
def test_pickle_only_checkpoint_is_refused(tmp_path, fname):
    d = _make_dir(tmp_path)
    # Contents that would do harm if unpickled; they must never be opened.
    (d / fname).write_bytes(b"cos\nsystem\n(S'exit 1'\ntR.")
    with pytest.raises(
        CheckpointError,
        match=r"PyTorch pickle weights(.|\n)*reads only safetensors(.|\n)*safe_serialization=True",
    ):
        CheckpointDir(d)


def test_gguf_only_checkpoint_is_refused(tmp_path):
    d = _make_dir(tmp_path)
    (d / "gemma-2b.gguf").write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match=r"GGUF weights.*reads only safetensors"):
        CheckpointDir(d)


def test_flax_only_checkpoint_is_refused(tmp_path):
    d = _make_dir(tmp_path)
    (d / "flax_model.msgpack").write_bytes(b"\x80")
    with pytest.raises(CheckpointError, match=r"Flax msgpack weights(.|\n)*safe_serialization"):
        CheckpointDir(d)


# -- file-level errors --------------------------------------------------------------------


def test_header_length_beyond_file(tmp_path):
    d = _single(tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:20])
    with pytest.raises(
        CheckpointError,
        match=r"model.safetensors is truncated or not a safetensors file: its header claims",
    ):
        CheckpointDir(d)


def test_file_shorter_than_length_prefix(tmp_path):
    d = _make_dir(tmp_path)
    (d / "model.safetensors").write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="truncated or not a safetensors file: it has only 3"):
        CheckpointDir(d)


def test_invalid_header_json(tmp_path):
    d = _make_dir(tmp_path)
    _write_raw(d / "model.safetensors", b'{"w": {"dtype": "F32",', b"\x00" * 16)
    with pytest.raises(
        CheckpointError, match="truncated or not a safetensors file: its header is not valid JSON"
    ):
        CheckpointDir(d)


def test_not_a_safetensors_file_at_all(tmp_path):
    d = _make_dir(tmp_path)
    (d / "model.safetensors").write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    with pytest.raises(CheckpointError, match="truncated or not a safetensors file"):
        CheckpointDir(d)


def test_git_lfs_pointer(tmp_path):
    d = _make_dir(tmp_path)
    (d / "model.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:abcd\nsize 123\n"
    )
    with pytest.raises(CheckpointError, match=r"Git LFS pointer(.|\n)*git lfs pull"):
        CheckpointDir(d)


def test_duplicate_key_inside_one_header(tmp_path):
    d = _make_dir(tmp_path)
    entry = '{"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}'
    _write_raw(d / "model.safetensors", f'{{"w": {entry}, "w": {entry}}}'.encode(), b"\x00")
    with pytest.raises(CheckpointError, match="tensor 'w' is described twice"):
        CheckpointDir(d)


def _last_tensor(raw: bytes) -> str:
    header = json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])
    header.pop("__metadata__", None)
    return max(header, key=lambda k: header[k]["data_offsets"][1])


def test_truncated_data(tmp_path):
    d = _single(tmp_path)
    f = d / "model.safetensors"
    full = f.read_bytes()
    f.write_bytes(full[:-2])
    with pytest.raises(
        CheckpointError,
        match=(
            rf"model.safetensors is truncated: tensor '{_last_tensor(full)}' needs the file to be "
            rf"at least {len(full)} bytes long \(the complete file has {len(full)} bytes\), but "
            rf"it has only {len(full) - 2} bytes(.|\n)*re-download or re-copy this file"
        ),
    ):
        CheckpointDir(d)


def test_truncated_data_several_tensors(tmp_path):
    d = _single(tmp_path)
    f = d / "model.safetensors"
    full = f.read_bytes()
    data_start = 8 + struct.unpack("<Q", full[:8])[0]
    f.write_bytes(full[: data_start + 10])
    with pytest.raises(
        CheckpointError, match=r"is truncated: tensor '.*' \(and \d+ more after it\)"
    ):
        CheckpointDir(d)


def test_offsets_inconsistent_with_shape(tmp_path):
    d = _make_dir(tmp_path)
    header = {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}
    _write_raw(d / "model.safetensors", header, b"\x00" * 24)
    with pytest.raises(
        CheckpointError,
        match=r"tensor 'w' is F32 with shape \(2, 3\), which takes 24 bytes, but its "
        r"data_offsets \[0, 20\] span 20 bytes",
    ):
        CheckpointDir(d)


@pytest.mark.parametrize(
    "entry, why",
    [
        ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, "'shape' should be"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}, "'data_offsets' should be"),
        ({"dtype": "F32", "shape": [1]}, "'data_offsets' should be"),
        ([1, 2], "expected an object"),
    ],
)
def test_malformed_header_entry(tmp_path, entry, why):
    d = _make_dir(tmp_path)
    _write_raw(d / "model.safetensors", {"w": entry}, b"\x00" * 4)
    with pytest.raises(CheckpointError, match=rf"entry for tensor 'w' is malformed: {why}"):
        CheckpointDir(d)


def test_unknown_dtype(tmp_path):
    d = _make_dir(tmp_path)
    header = {"w": {"dtype": "Q4_K", "shape": [4], "data_offsets": [0, 4]}}
    _write_raw(d / "model.safetensors", header, b"\x00" * 4)
    with pytest.raises(
        CheckpointError, match=r"tensor 'w' has dtype 'Q4_K'.*not support.*supported: F64, F32"
    ):
        CheckpointDir(d)


def test_metadata_is_not_a_tensor(tmp_path):
    d = _make_dir(tmp_path)
    header = {
        "__metadata__": {"format": "pt"},
        "w": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
    }
    _write_raw(d / "model.safetensors", header, b"\x01\x02")
    ckpt = CheckpointDir(d)
    assert ckpt.keys() == ["w"]
    np.testing.assert_array_equal(ckpt.array("w"), [1, 2])


# -- sharding errors ----------------------------------------------------------------------


def test_index_points_to_missing_shard(tmp_path):
    d, _ = _sharded(tmp_path)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(
        CheckpointError,
        match=r"lists shard file\(s\) that are not in(.|\n)*model-00002-of-00002.safetensors "
        r"\(holds 2 tensors\)",
    ):
        CheckpointDir(d)


def test_index_invalid_json(tmp_path):
    d, _ = _sharded(tmp_path)
    (d / "model.safetensors.index.json").write_text('{"weight_map": {')
    with pytest.raises(CheckpointError, match=r"index.json \(the shard index\) is not valid JSON"):
        CheckpointDir(d)


def test_index_without_weight_map(tmp_path):
    d, _ = _sharded(tmp_path)
    (d / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match="has no valid 'weight_map'"):
        CheckpointDir(d)


def test_index_key_absent_from_its_shard(tmp_path):
    d, _ = _sharded(tmp_path, {"lm_head.weight": "model-00001-of-00002.safetensors"})
    with pytest.raises(
        CheckpointError,
        match=r"lists tensors that are not in the shard(.|\n)*'lm_head.weight' "
        r"\(expected in model-00001-of-00002.safetensors\)",
    ):
        CheckpointDir(d)


def test_same_tensor_in_two_shards(tmp_path):
    d, t = _sharded(tmp_path)
    names = sorted(t)
    dup = names[0]
    save_file({k: t[k] for k in [dup, *names[2:]]}, str(d / "model-00002-of-00002.safetensors"))
    with pytest.raises(
        CheckpointError,
        match=rf"'{dup}' is stored in two files: model-00001-of-00002.safetensors and "
        r"model-00002-of-00002.safetensors",
    ):
        CheckpointDir(d)


def test_same_tensor_in_two_files_without_index(tmp_path):
    d = _make_dir(tmp_path)
    save_file({"w": np.zeros(2, np.float32)}, str(d / "a.safetensors"))
    save_file({"w": np.zeros(2, np.float32)}, str(d / "b.safetensors"))
    with pytest.raises(CheckpointError, match=r"'w' is stored in two files: a.safetensors and b"):
        CheckpointDir(d)


def test_missing_shard_without_index(tmp_path):
    d, _ = _sharded(tmp_path)
    (d / "model.safetensors.index.json").unlink()
    (d / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(
        CheckpointError, match=r"is missing shard file\(s\): model-00001-of-00002.safetensors"
    ):
        CheckpointDir(d)


# -- lookups ------------------------------------------------------------------------------


def test_missing_tensor_error(tmp_path):
    ckpt = CheckpointDir(_single(tmp_path))
    with pytest.raises(
        MissingTensorError,
        match=r"'model.layers.0.mlp.up_proj.weigth' is not in checkpoint(.|\n)*"
        r"Closest names: 'model.layers.0.mlp.up_proj.weight'",
    ) as info:
        ckpt.array("model.layers.0.mlp.up_proj.weigth")
    err = info.value
    assert isinstance(err, KeyError) and isinstance(err, CheckpointError)
    assert err.key == "model.layers.0.mlp.up_proj.weigth"
    assert err.suggestions[0] == "model.layers.0.mlp.up_proj.weight"
    assert len(err.suggestions) <= 5
    with pytest.raises(KeyError):
        ckpt.shape("nope")
    again = pickle.loads(pickle.dumps(err))
    assert isinstance(again, MissingTensorError) and str(again) == str(err)
    with pytest.raises(CheckpointError, match=r"'zzz' is not in checkpoint.*Use .keys\(\)"):
        ckpt.dtype("zzz")


# -- check_tensor_set ---------------------------------------------------------------------


def test_check_tensor_set_ok(tmp_path):
    ckpt = CheckpointDir(_single(tmp_path))
    names = ckpt.keys()
    check_tensor_set(ckpt, {k: ckpt.shape(k) for k in names})
    expected = {k: list(ckpt.shape(k)) for k in names if k != "model.norm.weight"}
    check_tensor_set(ckpt, expected, ignore=lambda k: k.endswith("norm.weight"))


def test_check_tensor_set_reports_everything_at_once(tmp_path):
    ckpt = CheckpointDir(_single(tmp_path))
    expected = {
        "model.embed_tokens.weight": (6, 4),
        "model.layers.0.mlp.up_proj.weight": (4, 8),  # transposed
        "model.layers.0.mlp.up_proj.weight_scale": (8,),
        "model.final_norm.weight": (4,),
    }
    with pytest.raises(CheckpointError) as info:
        check_tensor_set(ckpt, expected, ignore=lambda k: k == "model.norm.weight")
    msg = str(info.value)
    assert "2 missing tensor(s):" in msg
    assert "model.final_norm.weight  (closest in checkpoint: " in msg
    assert "model.layers.0.mlp.up_proj.weight_scale" in msg
    assert "1 unexpected tensor(s):\n    model.layers.0.input_layernorm.weight" in msg
    assert "model.norm.weight" not in msg.replace("final_norm", "")
    assert (
        "1 tensor(s) with the wrong shape:\n"
        "    model.layers.0.mlp.up_proj.weight: expected (4, 8), found (8, 4)"
    ) in msg


def test_check_tensor_set_caps_long_lists(tmp_path):
    ckpt = CheckpointDir(_single(tmp_path, {f"w{i:02d}": np.zeros(1, np.uint8) for i in range(25)}))
    expected = {f"v{i:02d}": (1,) for i in range(13)}
    with pytest.raises(
        CheckpointError,
        match=r"13 missing tensor(.|\n)*\.\.\. and 3 more(.|\n)*25 unexpected(.|\n)*\.\.\. and 15 more",
    ):
        check_tensor_set(ckpt, expected)
