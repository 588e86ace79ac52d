"""Gemma 3 logits against transformers (eager, float32) on tiny perturbed checkpoints."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import transformers

import gemmalens as gl
from tests import hf_reference as ref

TOLERANCE = 1e-4
SEQ = 12  # longer than the sliding window (4) of the tiny configs

CASES = {
    # GQA 4:2, qpas != head_dim, final soft-cap, linear-8 RoPE on global layers, 7 layers.
    "gqa_softcap_linear_rope": {},
    "mqa": dict(num_key_value_heads=1),
    "mha_no_softcap_default_rope": dict(
        num_key_value_heads=4,
        final_logit_softcapping=None,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
        },
    ),
    "thirteen_layers_window_5": dict(num_hidden_layers=13, sliding_window=5),
    "bidirectional_embedding_style": dict(use_bidirectional_attention=True, sliding_window=6),
}


def _tokens(batch: int = 2, seq: int = SEQ, seed: int = 0, vocab: int = 256) -> np.ndarray:
    return np.random.RandomState(seed).randint(3, vocab, (batch, seq))


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    hf_model = ref.gemma3_text(directory, **CASES[request.param])
    return request.param, directory, hf_model


def test_logits_match_transformers(case):
    name, directory, hf_model = case
    model = gl.load(directory)
    tokens = _tokens()
    expected = ref.logits(hf_model, tokens)
    fused = np.asarray(model(tokens))
    explicit, _ = model.run_with_cache(tokens, names="blocks.*.attn.hook_pattern")
    assert np.abs(fused - expected).max() <= TOLERANCE, name
    assert np.abs(np.asarray(explicit) - expected).max() <= TOLERANCE, name
    # A wrong model is not within tolerance: the check can fail.
    assert np.abs(expected).max() > 100 * TOLERANCE


def test_legacy_config_keys(tmp_path):
    """Hub configs written before transformers 5 spell RoPE and the layer pattern differently."""
    hf_model = ref.gemma3_text(tmp_path)
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    rope = config.pop("rope_parameters")
    config.pop("layer_types")
    config.pop("_sliding_window_pattern", None)
    config["sliding_window_pattern"] = 6
    config["rope_theta"] = rope["full_attention"]["rope_theta"]
    config["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
    config["rope_scaling"] = {"rope_type": "linear", "factor": rope["full_attention"]["factor"]}
    config_path.write_text(json.dumps(config))
    model = gl.load(tmp_path)
    assert model.config.rope_global.factor == 8.0
    assert model.config.layer_types == tuple(hf_model.config.layer_types)
    tokens = _tokens()
    assert np.abs(np.asarray(model(tokens)) - ref.logits(hf_model, tokens)).max() <= TOLERANCE


def test_padded_batch_matches_each_sequence_alone(tmp_path):
    hf_model = ref.gemma3_text(tmp_path)
    model = gl.load(tmp_path)
    lengths = [SEQ, 7, 9]
    rows = [_tokens(1, n, seed=i)[0] for i, n in enumerate(lengths)]
    tokens = np.zeros((3, SEQ), np.int64)
    mask = np.zeros((3, SEQ), np.int64)
    tokens[0], mask[0] = rows[0], 1
    tokens[1, SEQ - 7 :], mask[1, SEQ - 7 :] = rows[1], 1  # left padding
    tokens[2, :9], mask[2, :9] = rows[2], 1  # right padding
    batched = np.asarray(model(tokens, attention_mask=mask))
    inferred = np.asarray(model(tokens))  # pad id 0 marks padding by default
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    expected = ref.logits(hf_model, tokens, attention_mask=mask, position_ids=positions)
    real = mask.astype(bool)
    assert np.abs(batched[real] - expected[real]).max() <= TOLERANCE
    assert np.abs(inferred[real] - batched[real]).max() == 0.0
    for i, row in enumerate(rows):
        alone = np.asarray(model(row[None]))[0]
        assert np.abs(batched[i][real[i]] - alone).max() <= TOLERANCE


def test_multimodal_checkpoint_text_tower(tmp_path):
    """Gemma3ForConditionalGeneration files: language_model.model.* prefix, vision tensors
    present but unused, no final soft-cap."""
    hf_model = ref.gemma3_multimodal(tmp_path)
    model = gl.load(tmp_path)
    assert model.config.vocab_size == 300
    tokens = _tokens(vocab=250)
    assert np.abs(np.asarray(model(tokens)) - ref.logits(hf_model, tokens)).max() <= TOLERANCE


def test_sharded_checkpoint(tmp_path):
    hf_model = ref.gemma3_text(tmp_path / "one")
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    model = gl.load(tmp_path / "sharded")
    tokens = _tokens()
    assert np.abs(np.asarray(model(tokens)) - ref.logits(hf_model, tokens)).max() <= TOLERANCE


def test_bfloat16_load_error_against_float32(tmp_path):
    ref.gemma3_text(tmp_path)
    full = gl.load(tmp_path, dtype="float32")
    half = gl.load(tmp_path, dtype="bfloat16")
    tokens = _tokens()
    half_logits = half(tokens)
    assert half_logits.dtype == jnp.bfloat16
    table = half.model.embed.sublayers[0].table.value
    assert table.dtype == jnp.bfloat16
    error = np.abs(np.asarray(half_logits, np.float32) - np.asarray(full(tokens))).max()
    scale = np.abs(np.asarray(full(tokens))).max()
    print(f"bfloat16 vs float32: max abs logit error {error:.4f} (logit scale {scale:.2f})")
    # bfloat16 keeps 8 bits of mantissa: expect percent-level error, never garbage.
    assert 0 < error < 0.05 * scale


def test_sparse_hub_text_config_takes_transformers_defaults():
    """The Hub's Gemma 3 4B config lists only what differs from Gemma3TextConfig's defaults."""
    hub = {
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "model_type": "gemma3_text",
        "num_hidden_layers": 34,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "sliding_window": 1024,
    }
    complete = transformers.Gemma3TextConfig(**hub).to_dict()
    assert gl.Gemma3Config.from_hf(hub) == gl.Gemma3Config.from_hf(complete)
