"""Gemma 4 text decoder against transformers (eager, float32) on tiny perturbed checkpoints,
plus the routing hooks, routing interventions and presets."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import gemmalens as gl
from gemmalens.families import gemma4
from gemmalens.layers.moe import grouped_experts
from tests import hf_reference as ref

TOLERANCE = 1e-4
SEQ = 12  # longer than every sliding window of the tiny configs
VOCAB = 512

# Embedding mode on top of every feature: bidirectional everywhere (sliding layers
# |q - k| <= 8 // 2 + 1), with PLE, KV sharing, double-wide MLP, experts, and a K=V full
# layer that is also a KV-sharing producer.
BIDIRECTIONAL_ALL_FEATURES = dict(
    moe=False,
    use_bidirectional_attention="all",
    sliding_window=8,
    attention_k_eq_v=True,
    num_global_key_value_heads=1,
    enable_moe_block=True,
    num_experts=6,
    top_k_experts=3,
    moe_intermediate_size=12,
)
# The routing tests capture this one selection, so their clean runs share one compilation.
MOE_HOOKS = ["blocks.*.moe.*", "blocks.*.hook_dense_mlp_out"]


def _tokens(batch: int = 2, seq: int = SEQ, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(3, VOCAB - 16, (batch, seq))


def _checkpoint(tmp_path_factory, name: str, **options):
    directory = tmp_path_factory.mktemp(name)
    hf_model = ref.gemma4_text(directory, **options)
    return directory, hf_model, gl.load(directory)


@pytest.fixture(scope="module")
def e2b(tmp_path_factory):
    """E2B-like: PLE, KV sharing, double-wide MLP, global head dim, partial RoPE."""
    return _checkpoint(tmp_path_factory, "e2b", moe=False)


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """26B-like: experts beside the dense MLP, K=V full layers with 1 KV head, no PLE."""
    return _checkpoint(tmp_path_factory, "moe", moe=True)


@pytest.fixture(scope="module")
def bidirectional(tmp_path_factory):
    return _checkpoint(tmp_path_factory, "bidirectional", **BIDIRECTIONAL_ALL_FEATURES)


@pytest.mark.parametrize("name", ["e2b", "moe", "bidirectional"])
def test_logits_match_transformers(name, request):
    _, hf_model, model = request.getfixturevalue(name)
    tokens = _tokens()
    expected = ref.logits(hf_model, tokens)
    fused = np.asarray(model(tokens))
    assert np.abs(fused - expected).max() <= TOLERANCE, name
    assert np.abs(expected).max() > 100 * TOLERANCE  # the comparison can fail
    if name == "bidirectional":  # every feature at once: check the explicit path too
        explicit, _ = model.run_with_cache(tokens, names="blocks.*.attn.hook_pattern")
        assert np.abs(np.asarray(explicit) - expected).max() <= TOLERANCE, name


def test_structure_follows_config(moe):
    _, _, model = moe
    config = model.config
    assert config.layer_head_dim(0) == 16 and config.layer_head_dim(2) == 32
    assert config.layer_kv_heads(0) == 2 and config.layer_kv_heads(5) == 1
    for name in [
        "blocks.5.moe.hook_router_logits",
        "blocks.5.moe.hook_expert_indices",
        "blocks.5.moe.hook_expert_weights",
        "blocks.5.moe.hook_out",
        "blocks.5.hook_dense_mlp_out",
        "blocks.5.hook_mlp_out",
    ]:
        assert name in model.hook_names
    # K=V: the full layer's value path starts from the very key projection.
    attention = model.model.blocks.sublayers[2].sublayers[1].delta.sublayers[1]
    assert attention.value.sublayers[0] is attention.key.sublayers[0]


def test_padded_batch_matches_transformers(moe):
    _, hf_model, model = moe
    tokens = _tokens(3)
    mask = np.ones_like(tokens)
    mask[1, :5] = 0  # left padding
    mask[2, 8:] = 0  # right padding
    tokens = np.where(mask == 1, tokens, 0)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    expected = ref.logits(hf_model, tokens, attention_mask=mask, position_ids=positions)
    got = np.asarray(model(tokens, attention_mask=mask))
    real = mask.astype(bool)
    assert np.abs(got[real] - expected[real]).max() <= TOLERANCE


def _hf_moe_values(hf_model, tokens) -> dict[int, dict[str, np.ndarray]]:
    """Router logits, weights, indices and the two feed-forward summands of every layer,
    read with forward hooks on transformers' modules."""
    values: dict[int, dict[str, np.ndarray]] = {}
    handles = []
    for i, layer in enumerate(hf_model.model.layers):
        store = values.setdefault(i, {})

        def on_proj(module, args, out, store=store):
            store["logits"] = out.detach().numpy()

        def on_router(module, args, out, store=store):
            _, weights, indices = out
            store["weights"] = weights.detach().numpy()
            store["indices"] = indices.detach().numpy()

        def on_norm(name, store=store):
            def hook(module, args, out):
                store[name] = out.detach().numpy()

            return hook

        handles += [
            layer.router.proj.register_forward_hook(on_proj),
            layer.router.register_forward_hook(on_router),
            layer.post_feedforward_layernorm_1.register_forward_hook(on_norm("dense")),
            layer.post_feedforward_layernorm_2.register_forward_hook(on_norm("experts")),
        ]
    try:
        ref.logits(hf_model, tokens)
    finally:
        for handle in handles:
            handle.remove()
    return values


def test_routing_matches_transformers_router(moe):
    _, hf_model, model = moe
    tokens = _tokens()
    batch, seq = tokens.shape
    hf = _hf_moe_values(hf_model, tokens)
    _, cache = model.run_with_cache(tokens, names=MOE_HOOKS)
    for i in range(model.config.num_hidden_layers):
        logits = np.asarray(cache[f"blocks.{i}.moe.hook_router_logits"])
        indices = np.asarray(cache[f"blocks.{i}.moe.hook_expert_indices"])
        weights = np.asarray(cache[f"blocks.{i}.moe.hook_expert_weights"])
        assert logits.shape == (batch, seq, 8) and weights.shape == (batch, seq, 8)
        assert indices.shape == (batch, seq, 2) and indices.dtype == np.int32
        assert np.abs(logits.reshape(-1, 8) - hf[i]["logits"]).max() <= 1e-5
        np.testing.assert_array_equal(indices.reshape(-1, 2), hf[i]["indices"])
        picked = np.take_along_axis(weights.reshape(-1, 8), indices.reshape(-1, 2), axis=-1)
        assert np.abs(picked - hf[i]["weights"]).max() <= 1e-6
        assert (np.count_nonzero(weights, axis=-1) == 2).all()
        for ours, theirs in (("hook_dense_mlp_out", "dense"), ("moe.hook_out", "experts")):
            value = np.asarray(cache[f"blocks.{i}.{ours}"])
            assert np.abs(value - hf[i][theirs]).max() <= TOLERANCE


def test_indices_and_weights_are_the_top_k_of_the_logits(moe):
    """Recomputed in numpy from ``hook_router_logits`` and the router's per-expert scale."""
    _, hf_model, model = moe
    _, cache = model.run_with_cache(_tokens(seed=3), names=MOE_HOOKS)
    for i, layer in enumerate(hf_model.model.layers):
        logits = np.asarray(cache[f"blocks.{i}.moe.hook_router_logits"], np.float64)
        probabilities = np.exp(logits - logits.max(-1, keepdims=True))
        probabilities /= probabilities.sum(-1, keepdims=True)
        top = np.argsort(-probabilities, axis=-1, kind="stable")[..., :2]
        picked = np.take_along_axis(probabilities, top, axis=-1)
        scale = layer.router.per_expert_scale.detach().numpy()
        expected = np.zeros_like(probabilities)
        np.put_along_axis(expected, top, picked / picked.sum(-1, keepdims=True) * scale[top], -1)
        np.testing.assert_array_equal(cache[f"blocks.{i}.moe.hook_expert_indices"], top)
        weights = np.asarray(cache[f"blocks.{i}.moe.hook_expert_weights"])
        assert np.abs(weights - expected).max() <= 1e-6


def test_forcing_an_expert_changes_exactly_the_chosen_tokens(moe):
    _, _, model = moe
    tokens = _tokens()
    layer, position = 2, 6
    indices_name, out_name = (
        f"blocks.{layer}.moe.hook_expert_indices",
        f"blocks.{layer}.moe.hook_out",
    )
    clean_logits, clean = model.run_with_cache(tokens, names=MOE_HOOKS)
    routed = np.asarray(clean[indices_name])
    expert = next(e for e in range(8) if e not in routed[0, position])
    where = np.zeros(tokens.shape, bool)
    where[0, position] = True
    with model.hooks(gemma4.force_expert(model, layer, expert, where)):
        forced_logits, forced = model.run_with_cache(tokens, names=MOE_HOOKS)
    indices = np.asarray(forced[indices_name])
    assert indices[0, position, 0] == expert  # forced in, and visible in the cache
    assert gemma4.routing_table(forced, layer)[position][0][0] == expert
    unchanged = ~where
    np.testing.assert_array_equal(indices[unchanged], routed[unchanged])
    moe_out = np.abs(np.asarray(forced[out_name]) - np.asarray(clean[out_name])).max(-1)
    assert moe_out[0, position] > 1e-3 and moe_out[unchanged].max() == 0.0
    change = np.abs(np.asarray(forced_logits) - np.asarray(clean_logits)).max(-1)
    assert change[0, :position].max() == 0.0 and change[1].max() == 0.0  # causal, per row
    assert change[0, position] > 1e-3


def test_ablating_and_forbidding_experts(moe):
    """One run: ablate the busiest expert of layer 1, forbid the busiest of layer 4."""
    _, _, model = moe
    tokens = _tokens()
    _, clean = model.run_with_cache(tokens, names=MOE_HOOKS)

    def busiest(layer):
        routed = np.asarray(clean[f"blocks.{layer}.moe.hook_expert_indices"])
        return int(np.bincount(routed.reshape(-1), minlength=8).argmax())

    ablated, forbidden = busiest(1), busiest(4)
    hooks = gemma4.merge_hooks(
        gemma4.ablate_expert(model, 1, ablated), gemma4.forbid_expert(model, 4, forbidden)
    )
    with model.hooks(hooks):
        _, hooked = model.run_with_cache(tokens, names=MOE_HOOKS)
    # Ablation: routing untouched, the output changes exactly where the expert was used.
    routed = np.asarray(clean["blocks.1.moe.hook_expert_indices"])
    np.testing.assert_array_equal(hooked["blocks.1.moe.hook_expert_indices"], routed)
    weights = np.asarray(hooked["blocks.1.moe.hook_expert_weights"])
    assert (weights[..., ablated] == 0).all()
    diff = np.abs(
        np.asarray(hooked["blocks.1.moe.hook_out"]) - np.asarray(clean["blocks.1.moe.hook_out"])
    )
    np.testing.assert_array_equal(diff.max(-1) > 0, (routed == ablated).any(-1))
    # Forbidding: the router never picks it, and renormalises over what it picks instead.
    assert not (np.asarray(hooked["blocks.4.moe.hook_expert_indices"]) == forbidden).any()
    with pytest.raises(ValueError, match="Expert 8 does not exist"):
        gemma4.ablate_expert(model, 1, 8)


def test_grouped_experts_equal_a_loop_over_experts():
    rng = np.random.RandomState(0)
    tokens, width, d_expert, experts, top_k = 9, 8, 5, 4, 2
    x = rng.randn(3, tokens // 3, width).astype(np.float32)
    indices = np.stack([rng.choice([0, 1, 3], top_k, replace=False) for _ in range(tokens)])
    indices = indices.reshape(3, tokens // 3, top_k).astype(np.int32)  # expert 2 unused
    weights = rng.rand(3, tokens // 3, experts).astype(np.float32)
    gate_up = rng.randn(experts, 2 * d_expert, width).astype(np.float32)
    down = rng.randn(experts, width, d_expert).astype(np.float32)
    got = np.asarray(grouped_experts(x, indices, weights, gate_up, down))
    expected = np.zeros_like(x)
    for b, s in np.ndindex(*x.shape[:2]):
        for e in indices[b, s]:
            fused = gate_up[e] @ x[b, s]
            gate, up = fused[:d_expert], fused[d_expert:]
            gelu = 0.5 * gate * (1 + np.tanh(np.sqrt(2 / np.pi) * (gate + 0.044715 * gate**3)))
            expected[b, s] += weights[b, s, e] * (down[e] @ (gelu * up))
    assert np.abs(got - expected).max() <= 1e-4


def test_sentence_embeddings_mean_pool_the_final_norm(bidirectional):
    _, hf_model, model = bidirectional
    assert model.config.use_bidirectional_attention == "all"
    tokens = _tokens()
    mask = np.ones_like(tokens)
    mask[1, 9:] = 0
    tokens = np.where(mask == 1, tokens, 0)
    with torch.no_grad():
        hidden = hf_model.model(
            input_ids=torch.as_tensor(tokens), attention_mask=torch.as_tensor(mask)
        ).last_hidden_state.numpy()
    expected = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    pooled = np.asarray(gemma4.sentence_embeddings(model, tokens, mask, normalize=False))
    assert np.abs(pooled - expected).max() <= TOLERANCE
    unit = np.asarray(gemma4.sentence_embeddings(model, tokens, mask))
    np.testing.assert_allclose(np.linalg.norm(unit, axis=-1), 1.0, rtol=1e-5)


def test_hub_config_spelling(moe, tmp_path):
    """Hub configs carry global_head_dim / num_global_key_value_heads, not per_layer_config."""
    directory, hf_model, model = moe
    for name in ("config.json", "model.safetensors"):
        shutil.copy(directory / name, tmp_path / name)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config.pop("per_layer_config") == {
        "2": {"head_dim": 32, "num_key_value_heads": 1},
        "5": {"head_dim": 32, "num_key_value_heads": 1},
    }
    config.update(global_head_dim=32, num_global_key_value_heads=1)
    (tmp_path / "config.json").write_text(json.dumps(config))
    reloaded = gl.load(tmp_path)
    assert reloaded.config == model.config


def test_multimodal_checkpoint_text_part(tmp_path):
    """Gemma4ForConditionalGeneration files: model.language_model.* beside the vision tower."""
    hf_model = ref.gemma4_multimodal(tmp_path)
    model = gl.load(tmp_path)
    assert model.config.enable_moe_block and model.config.vocab_size == VOCAB
    tokens = _tokens()
    expected = ref.logits(hf_model, tokens)
    assert np.abs(np.asarray(model(tokens)) - expected).max() <= TOLERANCE


@pytest.mark.parametrize(
    "name, count",
    [
        ("gemma4_e2b", 4_628_569_344),
        ("gemma4_e4b", 7_463_013_376),
        ("gemma4_26b_a4b", 25_233_141_760),
        ("gemma4_31b", 30_697_345_280),
    ],
)
def test_preset_parameter_counts(name, count):
    assert gl.preset(name).num_params() == count


def test_unsupported_per_layer_config_is_explained():
    hf = dict(
        num_hidden_layers=2,
        layer_types=["sliding_attention", "full_attention"],
        per_layer_config={"0": {"head_dim": 64}},
    )
    with pytest.raises(ValueError, match="per_layer_config"):
        gl.Gemma4Config.from_hf(hf)
