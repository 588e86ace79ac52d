"""KerasHub presets: `gl.load` against KerasHub's own computation, and the errors.

Each backbone is built tiny with keras-hub (float32), every weight is perturbed away from
its initial value (constant-initialised norms would hide a wrong ``1 + w``), saved with
``save_to_preset`` and loaded with `gl.load`; the logits are compared with KerasHub's
task model on the same tokens (its causal LM / seq2seq LM: the backbone output through
the tied embedding's reverse projection and the final soft-cap, where KerasHub puts it).
"""

from __future__ import annotations

import json
import os
import shutil
import sys

os.environ["KERAS_BACKEND"] = "jax"  # before keras is imported

import numpy as np
import pytest

import gemmalens as gl
from gemmalens.checkpoints import keras_hub as reader

keras = pytest.importorskip("keras")
keras_hub = pytest.importorskip("keras_hub")
h5py = pytest.importorskip("h5py")

# Keras' JAX backend converts arrays the NumPy 1 way.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

TOLERANCE = 1e-4
S, F = "sliding_attention", "full_attention"
RS = np.random.RandomState(0)
TOKENS = RS.randint(3, 256, (2, 9)).astype(np.int32)
TOKENS[1, 2:5] = [245, 250, 255]  # Gemma 3n: beyond its per-layer vocabulary (240)
DECODER_TOKENS = RS.randint(3, 256, (2, 6)).astype(np.int32)
DECODER_TOKENS[:, 0] = 2


def _seed_keras() -> None:
    """Keras initialises randomly too: seeded, every run compares the same weights
    (unseeded, the Gemma 4 dense diff ranged from 6e-6 to 1.6e-4 across runs)."""
    keras.utils.set_random_seed(0)


def _perturb(backbone, seed: int, scale: float = 0.1) -> None:
    rs = np.random.RandomState(seed)
    for variable in backbone.weights:
        value = keras.ops.convert_to_numpy(variable)
        noise = np.asarray(rs.randn(*value.shape), value.dtype)
        variable.assign(value + scale * noise)


def _ones(tokens):
    return np.ones(tokens.shape, np.int32)


def _save(backbone, directory):
    backbone.save_to_preset(str(directory))
    return directory


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    _seed_keras()
    backbone = keras_hub.models.Gemma3Backbone(
        vocabulary_size=256,
        image_size=16,
        num_layers=7,  # layer 5 global, 6 local again
        num_query_heads=4,
        num_key_value_heads=2,
        hidden_dim=64,
        intermediate_dim=128,
        head_dim=16,
        use_post_ffw_norm=True,
        use_post_attention_norm=True,
        final_logit_soft_cap=5.0,
        use_sliding_window_attention=True,
        sliding_window_size=4,
        global_rope_scaling_factor=8.0,
        dtype="float32",
    )
    _perturb(backbone, 1)
    lm = keras_hub.models.Gemma3CausalLM(backbone=backbone, preprocessor=None)
    expected = np.asarray(lm({"token_ids": TOKENS, "padding_mask": _ones(TOKENS)}))
    directory = _save(backbone, tmp_path_factory.mktemp("gemma3"))
    sharded = tmp_path_factory.mktemp("gemma3_sharded")
    backbone.save_to_preset(str(sharded), max_shard_size=0.0002)
    return directory, sharded, expected


@pytest.fixture(scope="module")
def gemma3n(tmp_path_factory):
    _seed_keras()
    backbone = keras_hub.models.Gemma3nBackbone(
        text_vocab_size=256,
        text_hidden_size=64,
        num_hidden_layers=5,
        pad_token_id=0,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=[96, 128, 64, 128, 80],
        hidden_activation="gelu_approximate",
        layer_types=[S, F, S, S, F],
        sliding_window=4,
        rope_theta=1_000_000.0,
        rope_scaling=2.0,
        max_position_embeddings=256,
        vocab_size_per_layer_input=240,
        hidden_size_per_layer_input=8,
        altup_num_inputs=4,
        altup_active_idx=1,
        laurel_rank=8,
        activation_sparsity_pattern=[0.95, 0.0, 0.8, 0.6, 0.0],
        num_kv_shared_layers=2,  # 3 reuses layer 2 (sliding), 4 reuses layer 1 (full)
        final_logit_soft_cap=30.0,
        dtype="float32",
    )
    _perturb(backbone, 2)
    lm = keras_hub.models.Gemma3nCausalLM(backbone=backbone, preprocessor=None)
    expected = np.asarray(lm({"token_ids": TOKENS, "padding_mask": _ones(TOKENS).astype(bool)}))
    return _save(backbone, tmp_path_factory.mktemp("gemma3n")), expected


GEMMA4_COMMON = dict(
    vocabulary_size=256,
    image_size=16,
    num_layers=6,
    num_query_heads=4,
    num_key_value_heads=2,
    hidden_dim=64,
    intermediate_dim=96,
    head_dim=16,
    global_head_dim=32,
    final_logit_soft_cap=30.0,
    sliding_window_size=4,
    dtype="float32",
)
GEMMA4_VARIANTS = {
    # E2B-like: per-layer inputs, KV sharing (4 and 5 reuse 2 and 3), double-wide MLPs on
    # the sharing layers, partial RoPE on the global layers.
    "dense": dict(
        layer_types=[S, F, S, F, S, F],
        num_kv_shared_layers=2,
        use_double_wide_mlp=True,
        hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=256,
        global_rope_partial_rotary_factor=0.5,
    ),
    # 26B-like: experts beside the dense MLP, K=V global layers with one KV head.
    "moe": dict(
        layer_types=[S, S, F, S, S, F],
        num_global_key_value_heads=1,
        global_rope_partial_rotary_factor=0.25,
        enable_moe_block=True,
        num_experts=4,
        expert_intermediate_dim=32,
        num_experts_per_token=2,
    ),
}


@pytest.fixture(scope="module", params=sorted(GEMMA4_VARIANTS))
def gemma4(request, tmp_path_factory):
    _seed_keras()
    backbone = keras_hub.models.Gemma4Backbone(**GEMMA4_COMMON, **GEMMA4_VARIANTS[request.param])
    _perturb(backbone, 3)
    lm = keras_hub.models.Gemma4CausalLM(backbone=backbone, preprocessor=None)
    positions = np.broadcast_to(np.arange(TOKENS.shape[1], dtype=np.int32), TOKENS.shape)
    inputs = {"token_ids": TOKENS, "padding_mask": _ones(TOKENS), "position_ids": positions}
    expected = np.asarray(lm(inputs))
    return _save(backbone, tmp_path_factory.mktemp(f"gemma4_{request.param}")), expected


@pytest.fixture(scope="module")
def t5gemma2(tmp_path_factory):
    _seed_keras()
    backbone = keras_hub.models.T5Gemma2Backbone(
        vocabulary_size=256,
        encoder_hidden_dim=64,
        encoder_intermediate_dim=128,
        encoder_num_layers=3,
        encoder_num_attention_heads=4,
        encoder_num_key_value_heads=2,
        encoder_head_dim=16,
        encoder_layer_types=[S, F, S],
        decoder_hidden_dim=64,
        decoder_intermediate_dim=96,
        decoder_num_layers=2,
        decoder_num_attention_heads=4,
        decoder_num_key_value_heads=2,
        decoder_head_dim=16,
        decoder_layer_types=[S, F],
        sliding_window=4,
        query_pre_attn_scalar=24,  # != head_dim
        final_logit_softcapping=5.0,
        global_rope_scaling_factor=2.0,
        dtype="float32",
    )
    _perturb(backbone, 4)
    # Released T5Gemma 2 checkpoints tie the encoder and decoder tables; gemmalens has one.
    backbone.decoder_token_embedding.embeddings.assign(backbone.token_embedding.embeddings)
    lm = keras_hub.models.T5Gemma2Seq2SeqLM(backbone=backbone, preprocessor=None)
    inputs = {
        "encoder_token_ids": TOKENS,
        "encoder_padding_mask": _ones(TOKENS),
        "decoder_token_ids": DECODER_TOKENS,
        "decoder_padding_mask": _ones(DECODER_TOKENS),
    }
    expected = np.asarray(lm(inputs))
    return _save(backbone, tmp_path_factory.mktemp("t5gemma2")), expected


def _assert_close(actual, expected):
    actual = np.asarray(actual)
    assert actual.shape == expected.shape
    diff = np.abs(actual - expected).max()
    assert diff <= TOLERANCE, diff
    assert np.abs(expected).max() > 100 * TOLERANCE  # a wrong model would fail
    return diff


# ------------------------------------------------------------------------------ logits


def test_gemma3_logits_match_keras_hub(gemma3):
    directory, sharded, expected = gemma3
    m = gl.load(directory)
    assert m.checkpoint_format == "KerasHub preset"
    assert m.config.query_pre_attn_scalar == m.config.head_dim
    assert m.config.layer_types[5] == F and m.config.layer_types[6] == S
    _assert_close(m(TOKENS), expected)
    # Sharded weights (model.weights.json + model_NNNNN.weights.h5) read the same.
    assert len(list(sharded.glob("model_*.weights.h5"))) > 1
    _assert_close(gl.load(sharded)(TOKENS), expected)


def test_gemma3n_logits_match_keras_hub(gemma3n):
    directory, expected = gemma3n
    m = gl.load(directory)
    assert m.checkpoint_format == "KerasHub preset"
    assert m.config.kv_sources == (None, None, None, 2, 1)
    _assert_close(m(TOKENS), expected)


def test_gemma4_logits_match_keras_hub(gemma4):
    directory, expected = gemma4
    m = gl.load(directory)
    assert m.checkpoint_format == "KerasHub preset"
    _assert_close(m(TOKENS), expected)


def test_t5gemma2_logits_match_keras_hub(t5gemma2):
    directory, expected = t5gemma2
    m = gl.load(directory)
    assert m.checkpoint_format == "KerasHub preset"
    assert m.config.eoi_token_index == -1  # text-only: no end-of-image row
    _assert_close(m(TOKENS, decoder_tokens=DECODER_TOKENS), expected)


def _loads_stacked(directory, expected, **extra):
    """``gl.load(preset, stack_layers=True)`` reads a KerasHub preset into stacked layers,
    off a mesh and placed on a (one-device) one, and gives KerasHub's logits as the
    per-layer load does (8 simulated devices: tests/sharding_check.py, safetensors)."""
    mesh = gl.sharding.make_mesh()
    for on in (None, mesh):
        m = gl.load(directory, mesh=on, stack_layers=True)
        assert m.checkpoint_format == "KerasHub preset"
        assert m.is_stacked and m.mesh is on, directory
        _assert_close(m(TOKENS, **extra), expected)


def test_gemma3_gemma3n_t5gemma2_load_stacked(gemma3, gemma3n, t5gemma2):
    _loads_stacked(gemma3[0], gemma3[2])
    _loads_stacked(*gemma3n)
    _loads_stacked(*t5gemma2, decoder_tokens=DECODER_TOKENS)


def test_gemma4_loads_stacked(gemma4):
    _loads_stacked(*gemma4)


# ------------------------------------------------------------------------------ inputs


@pytest.fixture
def preset(gemma3, tmp_path):
    copy = tmp_path / "preset"
    shutil.copytree(gemma3[0], copy)
    return copy


def _edit_config(directory, **changes):
    path = directory / "config.json"
    saved = json.loads(path.read_text())
    saved["config"].update(changes)
    path.write_text(json.dumps(saved))


def test_tokenizer_asset_is_read(preset):
    asset = preset / "assets" / "tokenizer" / "vocabulary.spm"
    asset.parent.mkdir(parents=True)
    shutil.copy(gl.teaching_model_path("gemma3") / "tokenizer.model", asset)
    m = gl.load(preset)
    assert m.tokenizer is not None
    assert m.tokenizer.decode(m.tokenizer.encode("hello")) == "hello"


def test_bfloat16_weights_are_read(preset):
    """Keras stores bfloat16 as 2-byte opaque data tagged ``dtype="bfloat16"``."""
    import ml_dtypes

    path = preset / "model.weights.h5"
    key = "layers/reversible_embedding/vars/0"
    with h5py.File(path, "a") as f:
        original = f[key][()]
        del f[key]
        dataset = f.create_dataset(key, data=original.astype(ml_dtypes.bfloat16))
        dataset.attrs["dtype"] = "bfloat16"
    ckpt = reader.open_preset(preset)
    table = ckpt.array("model.embed_tokens.weight")
    assert table.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(table, original.astype(ml_dtypes.bfloat16))
    assert gl.load(preset)(TOKENS).shape == (2, 9, 256)


def test_vision_tower_weights_are_left_unread(gemma3, preset):
    """A preset with a vision encoder loads as its text model; without one in config.json,
    the same weights are weights nobody accounts for."""
    with h5py.File(preset / "model.weights.h5", "a") as f:
        f["layers/gemma3_vision_encoder/layers/dense/vars/0"] = np.ones((3, 2), np.float32)
    with pytest.raises(
        gl.CheckpointError,
        match=r"does not account for: layers/gemma3_vision_encoder/layers/dense/vars/0",
    ):
        gl.load(preset)
    _edit_config(preset, vision_encoder={"class_name": "Gemma3VisionEncoder", "config": {}})
    _assert_close(gl.load(preset)(TOKENS), gemma3[2])


# ------------------------------------------------------------------------------ errors


def test_truncated_weights(preset):
    path = preset / "model.weights.h5"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(gl.CheckpointError, match=r"model\.weights\.h5.*truncated or corrupt"):
        gl.load(preset)


def test_missing_weights(preset):
    (preset / "model.weights.h5").unlink()
    with pytest.raises(gl.CheckpointError, match=r"has no weights: neither model\.weights\.h5"):
        gl.load(preset)


def test_unknown_backbone(preset):
    saved = json.loads((preset / "config.json").read_text())
    saved["class_name"] = "GemmaBackbone"
    (preset / "config.json").write_text(json.dumps(saved))
    with pytest.raises(
        gl.CheckpointError,
        match=r"'GemmaBackbone'.*Gemma3Backbone, Gemma3nBackbone, Gemma4Backbone, T5Gemma2Backbone",
    ):
        gl.load(preset)


def test_config_dims_not_matching_the_weights(preset):
    _edit_config(preset, intermediate_dim=96)
    with pytest.raises(
        gl.CheckpointError,
        match=r"(?s)wrong shape.*model\.layers\.0\.mlp\.down_proj\.weight: expected \(64, 96\), "
        r"found \(64, 128\)",
    ):
        gl.load(preset)


def test_config_with_fewer_layers_than_the_weights(preset):
    _edit_config(preset, num_layers=6)
    with pytest.raises(
        gl.CheckpointError, match=r"does not account for: layers/gemma3_decoder_block_6/"
    ):
        gl.load(preset)


def test_config_with_more_layers_than_the_weights(preset):
    _edit_config(preset, num_layers=8)
    with pytest.raises(gl.CheckpointError, match=r"lack \d+ variable\(s\).*gemma3_decoder_block_7"):
        gl.load(preset)


def test_h5py_missing(preset, monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)  # `import h5py` now fails
    with pytest.raises(gl.CheckpointError, match=r"needs h5py.*pip install h5py"):
        gl.load(preset)


def test_behaviour_gemmalens_cannot_compute_is_refused(preset):
    _edit_config(preset, attention_logit_soft_cap=50.0)
    with pytest.raises(gl.CheckpointError, match=r"soft-caps attention logits"):
        gl.load(preset)


def test_a_second_soft_cap_from_the_task_is_refused(preset):
    task = {"class_name": "Gemma4CausalLM", "config": {"final_logit_cap": 10.0}}
    (preset / "task.json").write_text(json.dumps(task))
    with pytest.raises(gl.CheckpointError, match=r"soft-caps the logits a second time"):
        gl.load(preset)


def test_preset_argument_is_refused(preset):
    with pytest.raises(gl.CheckpointError, match="leave preset='gemma3_1b' out"):
        gl.load(preset, preset="gemma3_1b")


def test_untied_t5gemma2_embeddings_are_refused(t5gemma2, tmp_path):
    copy = tmp_path / "t5"
    shutil.copytree(t5gemma2[0], copy)
    with h5py.File(copy / "model.weights.h5", "a") as f:
        f["layers/reversible_embedding/vars/0"][3] += 1.0
    with pytest.raises(gl.CheckpointError, match="different encoder and decoder embedding"):
        gl.load(copy)


def test_directory_of_no_known_format(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(gl.CheckpointError) as error:
        gl.load(tmp_path)
    message = str(error.value)
    assert "notes.txt" in message
    assert "a KerasHub preset: config.json (with class_name)" in message
    assert "model.weights.h5" in message
    assert "a Hugging Face checkpoint: config.json with a model_type" in message
