"""Gemma 3n text decoder against transformers (eager, float32) on tiny perturbed checkpoints:
logits, intermediate values at the hook points, patching, checkpoint layouts, presets."""

from __future__ import annotations

import collections
import contextlib
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
import treescope
from penzai import pz

import gemmalens as gl
from gemmalens.families.gemma3n import matformer_config, matformer_submodel
from gemmalens.layers.kv_sharing import KVSharingScope, kv_sharing_sources
from gemmalens.layers.params import ShapeOnly
from tests import hf_reference as ref

TOLERANCE = 1e-4  # logits
ACTIVATION_TOLERANCE = 1e-5  # relative to each value's scale
SEQ = 12  # longer than the sliding windows (4 and 3)
A = ref.TINY_GEMMA3N["altup_active_idx"]

CASES = {
    # 4 streams, active stream 1, per-layer MLP widths, Gaussian top-k on layers 0, 2, 3
    # (3 is a KV consumer), KV sharing with consumers of both layer types, vocab rows
    # beyond the per-layer-embedding table.
    "four_streams_shared_kv": {},
    # 3 streams, active stream 2, no output scale on the per-layer input, no KV sharing,
    # one MLP width, no sparsity, other RoPE bases, window 3.
    "three_streams_no_sharing": dict(
        num_hidden_layers=4,
        layer_types=[
            "sliding_attention",
            "full_attention",
            "sliding_attention",
            "sliding_attention",
        ],
        intermediate_size=80,
        num_kv_shared_layers=0,
        activation_sparsity_pattern=None,
        altup_num_inputs=3,
        altup_active_idx=2,
        altup_correct_scale=False,
        sliding_window=3,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            "full_attention": {"rope_type": "default", "rope_theta": 5_000.0},
        },
    ),
}


def _tokens(batch: int = 2, seq: int = SEQ, seed: int = 0) -> np.ndarray:
    tokens = np.random.RandomState(seed).randint(3, 512, (batch, seq))
    tokens[:, 3] = [490, 511][:batch]  # beyond vocab_size_per_layer_input (480)
    return tokens


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    hf_model = ref.gemma3n_text(directory, **CASES[request.param])
    return request.param, directory, hf_model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The main tiny model (transformers and gemmalens, same weights) and the values at
    every hook point for `_tokens()`: compiled once, shared by the tests below."""
    directory = tmp_path_factory.mktemp("gemma3n")
    hf_model = ref.gemma3n_text(directory)
    model = gl.load(directory)
    logits, cache = model.run_with_cache(_tokens())
    return directory, hf_model, model, (np.asarray(logits), cache)


def test_logits_match_transformers(case):
    name, directory, hf_model = case
    model = gl.load(directory)
    assert model.config.num_params() == sum(p.numel() for p in hf_model.parameters())
    tokens = _tokens()
    expected = ref.logits(hf_model, tokens)
    fused = np.asarray(model(tokens))
    print(f"{name}: max abs logit diff {np.abs(fused - expected).max():.2e}")
    assert np.abs(fused - expected).max() <= TOLERANCE, name
    # A wrong model is not within tolerance: the check can fail.
    assert np.abs(expected).max() > 100 * TOLERANCE


def test_explicit_attention_logits_match_transformers(pair):
    """With every hook captured, attention runs with explicit weights (not the fused kernel)."""
    _, hf_model, _, (logits, _) = pair
    expected = ref.logits(hf_model, _tokens())
    print(f"explicit attention: max abs logit diff {np.abs(logits - expected).max():.2e}")
    assert np.abs(logits - expected).max() <= TOLERANCE


def test_padded_batch_matches_transformers(pair):
    _, hf_model, model, _ = pair
    tokens, mask = _tokens(), np.ones((2, SEQ), np.int64)
    mask[0, :5] = 0  # left padding
    mask[1, 7:] = 0  # right padding
    tokens[mask == 0] = 0
    batched = np.asarray(model(tokens, attention_mask=mask))
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    expected = ref.logits(hf_model, tokens, attention_mask=mask, position_ids=positions)
    real = mask.astype(bool)
    assert np.abs(batched[real] - expected[real]).max() <= TOLERANCE


# ------------------------------------------------------------------ intermediate values


@contextlib.contextmanager
def _recording(hf_model, edits=None):
    """Records transformers' intermediate values by forward hooks (and by wrapping AltUp's
    ``predict`` / ``correct`` methods). ``edits`` maps a recorded key to a function that
    replaces the value, for patching. Yields ``{key: [values per call]}``."""
    edits = edits or {}
    values = collections.defaultdict(list)
    handles, wrapped = [], []

    def keep(key, value):
        value = edits[key](value) if key in edits else value
        values[key].append(value.detach().clone())
        return value

    def output_hook(key, index=None):
        def hook(module, args, output):
            if index is None:
                return keep(key, output)
            keep(key, output[index])

        return hook

    def input_hook(key, position=0):
        def hook(module, args):
            args = list(args)
            args[position] = keep(key, args[position])
            return tuple(args)

        return hook

    model = hf_model.model
    handles.append(model.embed_tokens.register_forward_hook(output_hook("hook_embed")))
    handles.append(model.layers[0].register_forward_pre_hook(input_hook("hook_altup_expanded")))
    handles.append(model.norm.register_forward_pre_hook(input_hook("hook_altup_collapsed")))
    handles.append(model.norm.register_forward_hook(output_hook("ln_final.hook_normalized")))
    for i, layer in enumerate(model.layers):
        p = f"blocks.{i}."
        altup = layer.altup
        for method in ("predict", "correct"):
            original = getattr(altup, method)
            key = p + ("altup.hook_predictions" if method == "predict" else "altup.hook_corrected")

            def wrapper(*args, _original=original, _key=key):
                return keep(_key, _original(*args))

            setattr(altup, method, wrapper)
            wrapped.append((altup, method))
        hooks = [
            (altup.modality_router, output_hook(p + "router_logits")),
            (altup.prediction_coefs, output_hook(p + "altup.hook_prediction_coefs")),
            (altup.correction_coefs, output_hook(p + "correction_coefs_minus_one")),
            (layer.laurel, output_hook(p + "laurel.hook_out")),
            (layer.post_attention_layernorm, output_hook(p + "hook_attn_out")),
            (layer.post_feedforward_layernorm, output_hook(p + "hook_mlp_out")),
            (layer.mlp.gate_proj, output_hook(p + "mlp.hook_pre")),
            (layer.self_attn, output_hook(p + "attn.hook_pattern", index=1)),
            (layer, output_hook(p + "hook_streams_post")),
        ]
        for module, hook in hooks:
            handles.append(module.register_forward_hook(hook))
        handles.append(
            layer.input_layernorm.register_forward_pre_hook(input_hook(p + "hook_resid_pre"))
        )
        handles.append(
            layer.mlp.act_fn.register_forward_pre_hook(input_hook(p + "mlp.hook_pre_sparse"))
        )
        handles.append(layer.register_forward_pre_hook(input_hook(p + "hook_per_layer_input", 2)))
        if layer.self_attn.is_kv_shared_layer:
            continue
        # RoPE is linear, so scaling k_norm's output scales the keys the layer stores.
        handles.append(layer.self_attn.k_norm.register_forward_hook(output_hook(p + "k_norm")))
    try:
        yield values
    finally:
        for handle in handles:
            handle.remove()
        for altup, method in wrapped:
            delattr(altup, method)


def _to_gemmalens_layout(key: str, value: torch.Tensor, num_streams: int) -> np.ndarray:
    """transformers' value as gemmalens shows it at hook ``key``."""
    value = value.float().numpy()
    if key.endswith(("altup.hook_predictions", "altup.hook_corrected", "hook_streams_post")):
        return value.transpose(1, 2, 0, 3)  # [stream, batch, pos, d] -> [batch, pos, stream, d]
    if key == "hook_altup_expanded":
        return value.transpose(1, 2, 0, 3)
    if key.endswith("hook_prediction_coefs"):  # [batch, pos, K*K], row-major [stream, from]
        return value.reshape(*value.shape[:2], num_streams, num_streams)
    return value


def test_hooks_match_transformers_intermediate_values(pair):
    _, hf_model, model, (_, cache) = pair
    config = model.config
    with _recording(hf_model) as recorded, torch.no_grad():
        hf_model(input_ids=torch.as_tensor(_tokens()))
    expected = {}
    for key, calls in recorded.items():
        if key.endswith("router_logits"):  # the router runs twice: predict, then correct
            block = key[: -len("router_logits")]
            expected[block + "altup.hook_prediction_modalities"] = np.tanh(calls[0].numpy())
            expected[block + "altup.hook_correction_modalities"] = np.tanh(calls[1].numpy())
        elif key.endswith("correction_coefs_minus_one"):
            block = key[: -len("correction_coefs_minus_one")]
            expected[block + "altup.hook_correction_coefs"] = calls[0].numpy() + 1.0
        elif key in cache:
            assert len(calls) == 1, key
            expected[key] = _to_gemmalens_layout(key, calls[0], config.altup_num_inputs)
    sparse_layers = [i for i, s in enumerate(config.activation_sparsity_pattern) if s > 0]
    assert {f"blocks.{i}.mlp.hook_pre_sparse" for i in sparse_layers} <= set(expected)
    assert len(expected) >= 15 * config.num_hidden_layers
    for key, value in expected.items():
        got = np.asarray(cache[key])
        assert got.shape == value.shape, key
        scale = max(1.0, np.abs(value).max())
        assert np.abs(got - value).max() <= ACTIVATION_TOLERANCE * scale, key
    # Sparse layers really zero most of the gate (0.95 -> about 95% of a Gaussian).
    assert (np.asarray(cache["blocks.0.mlp.hook_pre_sparse"]) == 0).mean() > 0.8


def test_altup_correction_is_prediction_plus_coefficient_times_innovation(pair):
    _, _, model, (_, cache) = pair
    for i in range(model.config.num_hidden_layers):
        p = f"blocks.{i}."
        inputs = cache["hook_altup_expanded" if i == 0 else f"blocks.{i - 1}.hook_streams_post"]
        predictions = np.asarray(cache[p + "altup.hook_predictions"])
        coefs = np.asarray(cache[p + "altup.hook_prediction_coefs"])
        mixed = np.einsum("bsrc,bscd->bsrd", coefs, inputs)
        np.testing.assert_allclose(predictions, inputs + mixed, atol=1e-4, rtol=1e-5)
        # hook_resid_pre is the active prediction; resid_post the layer's output.
        np.testing.assert_array_equal(cache[p + "hook_resid_pre"], predictions[:, :, A])
        innovation = np.asarray(cache[p + "hook_resid_post"]) - predictions[:, :, A]
        np.testing.assert_allclose(cache[p + "altup.hook_innovation"], innovation, atol=1e-6)
        coef = np.asarray(cache[p + "altup.hook_correction_coefs"])[..., None]
        np.testing.assert_allclose(
            cache[p + "altup.hook_corrected"],
            predictions + coef * innovation[:, :, None],
            atol=1e-5,
        )


def test_kv_consumers_attend_with_their_producers_keys(pair):
    _, _, model, (_, cache) = pair
    assert model.config.kv_sources == (None, None, None, 2, 1)
    for consumer, producer in ((3, 2), (4, 1)):
        for kind in "kv":
            np.testing.assert_array_equal(
                cache[f"blocks.{consumer}.attn.hook_{kind}"],
                cache[f"blocks.{producer}.attn.hook_{kind}"],
            )
    # Consumers carry no key/value projections, producers publish theirs.
    text = treescope.render_to_text(model.model.blocks)
    assert text.count("SharedKVAttention(") == 2
    assert "KVProducer(share_as='blocks.2'" in text and "KVProducer(share_as='blocks.1'" in text
    for name in ("AltUpBlock(", "AltUpPredict(", "AltUpCorrect(", "Laurel(", "GaussianTopK("):
        assert name in text


def test_patching_matches_transformers(pair):
    """The same interventions in both libraries give the same logits."""
    _, hf_model, model, _ = pair
    tokens = _tokens()

    def halve_stream_3(value):
        return value * torch.tensor([1.0, 1.0, 1.0, 0.5])[:, None, None, None]

    def silence_first_neurons(value):
        value = value.clone()
        value[..., :16] = 0
        return value

    hf_edits = {
        "blocks.2.altup.hook_predictions": halve_stream_3,
        "blocks.0.mlp.hook_pre_sparse": silence_first_neurons,
        "blocks.3.hook_per_layer_input": lambda v: 3.0 * v,
        "blocks.2.k_norm": lambda v: 2.0 * v,  # the producer's keys: consumer 3 too
    }
    ours = {
        "blocks.2.altup.hook_predictions": lambda v, name: v.at[:, :, 3].multiply(0.5),
        "blocks.0.mlp.hook_pre_sparse": lambda v, name: v.at[..., :16].set(0.0),
        "blocks.3.hook_per_layer_input": lambda v, name: 3.0 * v,
        "blocks.2.attn.hook_k": lambda v, name: 2.0 * v,
    }
    with _recording(hf_model, hf_edits), torch.no_grad():
        expected = hf_model(input_ids=torch.as_tensor(tokens)).logits.numpy()
    patched = np.asarray(model.run_with_hooks(tokens, ours))
    clean = np.asarray(model(tokens))
    assert np.abs(patched - expected).max() <= TOLERANCE
    assert np.abs(patched - clean).max() > 100 * TOLERANCE


# ------------------------------------------------------------------ checkpoints, presets


def test_multimodal_checkpoint_text_part(pair, tmp_path):
    """The released layout: model.language_model.* beside vision/audio tensors, unused K/V
    of the KV-sharing layers present, config.json of model_type gemma3n."""
    directory, hf_model, _, _ = pair
    tensors = ref.gemma3n_multimodal_layout(directory, tmp_path)
    assert "model.language_model.layers.3.self_attn.k_proj.weight" in tensors
    assert "model.language_model.embed_tokens.weight" in tensors
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gemma3n"
    model = gl.load(tmp_path)
    assert model.config.vocab_size == 512 and model.config.vocab_size_per_layer_input == 480
    tokens = _tokens()
    assert np.abs(np.asarray(model(tokens)) - ref.logits(hf_model, tokens)).max() <= TOLERANCE


def test_checkpoint_with_a_wrong_tensor_names_it(pair, tmp_path):
    directory, _, _, _ = pair
    ref.gemma3n_multimodal_layout(directory, tmp_path)
    from safetensors.numpy import load_file, save_file

    tensors = load_file(tmp_path / "model.safetensors")
    tensors.pop("model.language_model.layers.1.altup.correct_output_scale")
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(gl.CheckpointError, match=r"layers\.1\.altup\.correct_output_scale"):
        gl.load(tmp_path)


def _cut_in_transformers(hf_model, layers, widths):
    """The MatFormer cut done independently on the transformers side: a model with the
    smaller config, loaded with sliced tensors."""
    old = hf_model.config
    config = transformers.Gemma3nTextConfig(
        **{
            **ref.TINY_GEMMA3N,
            "num_hidden_layers": len(layers),
            "layer_types": [old.layer_types[i] for i in layers],
            "intermediate_size": widths,
            "activation_sparsity_pattern": [old.activation_sparsity_pattern[i] for i in layers],
            "num_kv_shared_layers": sum(old.kv_sharing_modes[i] == "reuse" for i in layers),
        }
    )
    config._attn_implementation = "eager"
    small = transformers.Gemma3nForCausalLM(config).eval()
    big = hf_model.state_dict()
    vocab, per_layer = old.vocab_size_per_layer_input, old.hidden_size_per_layer_input
    state = {}
    for name in small.state_dict():
        match = re.fullmatch(r"model\.layers\.(\d+)\.(.*)", name)
        if match:
            source, rest = layers[int(match.group(1))], match.group(2)
            tensor = big[f"model.layers.{source}.{rest}"]
            width = widths[int(match.group(1))]
            if rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
                tensor = tensor[:width]
            elif rest == "mlp.down_proj.weight":
                tensor = tensor[:, :width]
        elif name == "model.embed_tokens_per_layer.weight":
            tensor = big[name].view(vocab, -1, per_layer)[:, layers].reshape(vocab, -1)
        elif name == "model.per_layer_model_projection.weight":
            tensor = big[name].view(-1, per_layer, old.hidden_size)[layers]
            tensor = tensor.reshape(-1, old.hidden_size)
        else:
            tensor = big[name]
        state[name] = tensor
    small.load_state_dict(state, strict=True)
    return small


def test_matformer_submodel_matches_the_same_cut_in_transformers(pair):
    _, hf_model, model, _ = pair
    layers, widths = [0, 1, 2, 4], [64, 100, 32, 60]  # drops KV consumer 3
    small = matformer_submodel(model, layers, widths)
    assert small.config.kv_sources == (None, None, None, 1)
    assert small.config.intermediate_size == tuple(widths)
    hf_small = _cut_in_transformers(hf_model, layers, widths)
    assert small.config.num_params() == sum(p.numel() for p in hf_small.parameters())
    tokens = _tokens()
    expected = ref.logits(hf_small, tokens)
    assert np.abs(np.asarray(small(tokens)) - expected).max() <= TOLERANCE
    assert np.abs(expected - ref.logits(hf_model, tokens)).max() > 100 * TOLERANCE
    with pytest.raises(ValueError, match="layer 3 would reuse .* layer 0, .* those of layer 2"):
        matformer_submodel(model, [0, 1, 3, 4], 32)  # drops the producer 2


def test_matformer_cut_of_e4b_is_e2b():
    e2b = matformer_config(gl.preset("gemma3n_e4b"), [*range(20), *range(25, 35)], 8192)
    assert e2b == gl.preset("gemma3n_e2b")


@pytest.mark.parametrize(
    "name, count", [("gemma3n_e2b", 4_435_182_688), ("gemma3n_e4b", 6_835_235_568)]
)
def test_preset_parameter_counts(name, count):
    config = gl.preset(name)
    assert config.num_params() == count
    first_consumer = config.num_hidden_layers - config.num_kv_shared_layers
    assert config.kv_sources[first_consumer:] == tuple(
        first_consumer - 2 if t == "sliding_attention" else first_consumer - 1
        for t in config.layer_types[first_consumer:]
    )


def test_layer_types_without_a_producer_are_refused():
    types = ["sliding_attention"] * 4 + ["full_attention"]
    with pytest.raises(ValueError, match="Layer 4 .*full_attention.* no layer before"):
        kv_sharing_sources(types, num_kv_shared_layers=2)


def test_shared_kv_outside_its_scope_says_how_to_fix_it():
    config = gl.Gemma3nConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        sliding_window=4,
        layer_types=["sliding_attention"] * 2,
        activation_sparsity_pattern=0.0,
        num_kv_shared_layers=1,
        vocab_size_per_layer_input=64,
        hidden_size_per_layer_input=4,
        laurel_rank=2,
    )
    model = config.build(ShapeOnly())  # shapes only: tracing is enough to meet the error
    unscoped = pz.select(model).at_instances_of(KVSharingScope).apply(lambda scope: scope.body)
    tokens = pz.nx.wrap(jnp.zeros((1, 3), jnp.int32)).tag("batch", "seq")
    with pytest.raises(ValueError, match="blocks.0.*KVSharingScope"):
        jax.eval_shape(lambda m, t: m(t), unscoped, tokens)
