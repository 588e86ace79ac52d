"""Gemma 3's SigLIP vision tower and multimodal projector against transformers (eager,
float32), on tiny random towers with every weight, bias and norm perturbed."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from penzai import pz

from gemmalens.checkpoints import CheckpointDir, CheckpointError
from gemmalens.layers.hooks import capture, hook_points, intervene
from gemmalens.layers.params import RandomInit
from gemmalens.vision import siglip
from tests import hf_reference as ref

TOLERANCE = 1e-5
VISION = ref.TINY_SIGLIP
MM_TOKENS = ref.TINY_SIGLIP_TOKENS_PER_IMAGE
TEXT_WIDTH = 48  # != the vision width
LAYERS = VISION["num_hidden_layers"]


def _hf_config() -> transformers.Gemma3Config:
    config = transformers.Gemma3Config(
        text_config={"hidden_size": TEXT_WIDTH, "vocab_size": 300},
        vision_config={**VISION, "vision_use_head": False},
        mm_tokens_per_image=MM_TOKENS,
        boi_token_index=255,
        eoi_token_index=256,
        image_token_index=257,
    )
    config.vision_config._attn_implementation = "eager"
    return config


@pytest.fixture(scope="module")
def reference():
    """transformers' tower and projector, perturbed; their state dicts under Hub names;
    pixel values; and every reference value."""
    torch.manual_seed(0)
    config = _hf_config()
    tower = transformers.SiglipVisionModel(config.vision_config).eval()
    projector = transformers.models.gemma3.modeling_gemma3.Gemma3MultiModalProjector(config).eval()
    ref.perturb_(tower, seed=1)
    ref.perturb_(projector, seed=2)
    arrays = {
        **{siglip.HUB_VISION_PREFIX + k: v.numpy() for k, v in tower.state_dict().items()},
        **{siglip.HUB_PROJECTOR_PREFIX + k: v.numpy() for k, v in projector.state_dict().items()},
    }
    pixels = np.random.RandomState(0).uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)

    seen = {}

    def keep(name):
        def hook(module, args, output):
            seen[name] = output.detach().numpy()

        return hook

    projector.avg_pool.register_forward_hook(keep("pooled"))
    projector.mm_soft_emb_norm.register_forward_hook(keep("soft_emb_norm"))
    with torch.no_grad():
        x = torch.as_tensor(pixels)
        out = tower(pixel_values=x, output_hidden_states=True, output_attentions=True)
        soft = projector(out.last_hidden_state)
        patch = tower.embeddings.patch_embedding(x)
    values = {
        "vision.hook_patch_embed": patch.flatten(2).transpose(1, 2).numpy(),
        "vision.hook_pos_embed": np.broadcast_to(
            tower.embeddings.position_embedding.weight.detach().numpy(), (2, 16, 32)
        ),
        "vision.hook_post_layernorm": out.last_hidden_state.numpy(),
        # AvgPool2d gives [batch, C, 2, 2]: row-major tokens, as the projector flattens them.
        "vision.hook_pooled": seen["pooled"].reshape(2, 32, MM_TOKENS).transpose(0, 2, 1),
        "vision.hook_soft_emb_norm": seen["soft_emb_norm"],
        "vision.hook_projected": soft.numpy(),
    }
    assert len(out.hidden_states) == LAYERS + 1  # the embeddings, then every layer's output
    for i in range(LAYERS):
        values[f"vision.blocks.{i}.hook_resid_pre"] = out.hidden_states[i].numpy()
        values[f"vision.blocks.{i}.hook_resid_post"] = out.hidden_states[i + 1].numpy()
        values[f"vision.blocks.{i}.attn.hook_pattern"] = out.attentions[i].numpy()
    return arrays, pixels, values


@pytest.fixture(scope="module")
def config():
    return siglip.Gemma3VisionConfig.from_hf(_hf_config().to_dict())


@pytest.fixture(scope="module")
def tower(reference, config):
    arrays, _, _ = reference
    return siglip.from_state_dict(config, arrays)


def run_capturing(model, pixels, names):
    """The output and ``{name: value}`` of one run capturing ``names`` (as gemmalens.lens
    does: capture hooks, unbind their state, stateless call)."""
    unbound, state = pz.unbind_state_vars(capture(model, set(names), "cache/"))
    out, new_state = unbound.stateless_call([v.freeze() for v in state], pixels)
    return out, {v.label.removeprefix("cache/"): np.asarray(v.value) for v in new_state}


def test_config_from_hf(config):
    assert config.vision == siglip.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        layer_norm_eps=1e-5,
    )
    assert config.projector == siglip.Gemma3ProjectorConfig(MM_TOKENS, TEXT_WIDTH, 1e-5)
    assert (config.vision.num_patches, config.projector.tokens_per_side) == (16, 2)


def test_soft_tokens_and_intermediates_match_transformers(reference, tower):
    arrays, pixels, expected = reference
    out, values = run_capturing(tower, pixels, [hp.name for hp in hook_points(tower)])
    soft = np.asarray(out.unwrap("batch", "image_token", "embedding"))
    assert soft.shape == (2, MM_TOKENS, TEXT_WIDTH)
    diffs = {"soft tokens": np.abs(soft - expected["vision.hook_projected"]).max()}
    for name, value in expected.items():
        assert values[name].shape == value.shape, name
        diffs[name] = np.abs(values[name] - value).max()
    print("\nmax |diff| vs transformers:")
    for name, diff in diffs.items():
        print(f"  {name}: {diff:.2e}")
    assert max(diffs.values()) <= TOLERANCE, diffs
    # A wrong tower is not within tolerance: the checks can fail.
    assert np.abs(expected["vision.hook_projected"]).max() > 1000 * TOLERANCE
    # The fused attention path (no pattern hook) gives the same tokens.
    fused = np.asarray(tower(pixels).unwrap("batch", "image_token", "embedding"))
    assert np.abs(fused - expected["vision.hook_projected"]).max() <= TOLERANCE


def test_hook_names_and_axes(reference, tower):
    _, pixels, _ = reference
    names = [hp.name for hp in hook_points(tower)]
    per_block = [
        "hook_resid_pre",
        "attn.hook_q",
        "attn.hook_k",
        "attn.hook_v",
        "attn.hook_attn_scores",
        "attn.hook_pattern",
        "attn.hook_z",
        "hook_attn_out",
        "hook_resid_mid",
        "mlp.hook_pre",
        "mlp.hook_post",
        "hook_mlp_out",
        "hook_resid_post",
    ]
    assert names == [
        "vision.hook_patch_embed",
        "vision.hook_pos_embed",
        *[f"vision.blocks.{i}.{n}" for i in range(LAYERS) for n in per_block],
        "vision.hook_post_layernorm",
        "vision.hook_pooled",
        "vision.hook_soft_emb_norm",
        "vision.hook_projected",
    ]
    _, values = run_capturing(tower, pixels, names)
    shapes = {name: values[name].shape for name in names}
    assert shapes["vision.blocks.0.attn.hook_q"] == (2, 16, 4, 8)  # batch, seq, heads, head_dim
    assert shapes["vision.blocks.0.attn.hook_k"] == (2, 16, 4, 8)  # kv_heads = heads
    assert shapes["vision.blocks.1.attn.hook_attn_scores"] == (2, 4, 16, 16)
    assert shapes["vision.blocks.1.mlp.hook_post"] == (2, 16, 64)
    assert shapes["vision.blocks.1.hook_resid_mid"] == (2, 16, 32)
    assert shapes["vision.hook_pooled"] == (2, MM_TOKENS, 32)
    # Within a block the hooks add up as the residual stream does.
    block = "vision.blocks.0."
    np.testing.assert_allclose(
        values[block + "hook_resid_mid"],
        values[block + "hook_resid_pre"] + values[block + "hook_attn_out"],
        atol=1e-6,
    )
    np.testing.assert_allclose(
        values["vision.blocks.0.hook_resid_pre"],
        values["vision.hook_patch_embed"] + values["vision.hook_pos_embed"],
        atol=1e-6,
    )


def test_interventions(reference, tower):
    _, pixels, _ = reference
    clean = np.asarray(tower(pixels).unwrap("batch", "image_token", "embedding"))
    identity = intervene(tower, {"vision.blocks.0.hook_resid_post": lambda v, name: v})
    same = np.asarray(identity(pixels).unwrap("batch", "image_token", "embedding"))
    assert np.array_equal(same, clean)
    zeroed = intervene(tower, {"vision.blocks.0.hook_resid_post": lambda v, name: v * 0})
    changed = np.asarray(zeroed(pixels).unwrap("batch", "image_token", "embedding"))
    assert np.abs(changed - clean).max() > 0.1
    # Patching a pattern hook runs the explicit path and still reaches the output.
    uniform = intervene(
        tower, {"vision.blocks.1.attn.hook_pattern": lambda v, name: v * 0 + 1 / 16}
    )
    assert (
        np.abs(
            np.asarray(uniform(pixels).unwrap("batch", "image_token", "embedding")) - clean
        ).max()
        > 1e-3
    )


@pytest.mark.parametrize(
    "shape, words",
    [
        ((2, 3, 32, 48), ["non-square", "32x32"]),
        ((2, 3, 64, 64), ["wrong-size", "64x64", "image_size 32"]),
        ((2, 1, 32, 32), ["1 channel", "[batch, 3, 32, 32]"]),
        ((3, 32, 32), ["[batch, 3, 32, 32]", "(3, 32, 32)"]),
    ],
)
def test_wrong_images_are_clear_errors(tower, shape, words):
    with pytest.raises(ValueError) as error:
        tower(np.zeros(shape, np.float32))
    for word in words:
        assert word in str(error.value)


def test_named_pixels_must_have_the_pixel_axes(tower):
    wrong = pz.nx.wrap(np.zeros((2, 3, 32, 32), np.float32)).tag("batch", "rgb", "height", "width")
    with pytest.raises(ValueError, match="named axes"):
        tower(wrong)


def test_saved_gemma3_checkpoint(tmp_path):
    """A Gemma3ForConditionalGeneration saved by transformers 5.23 (``vision_tower.`` without
    ``vision_model.``, the unused SigLIP head present): config and tensors read from the
    files, soft tokens equal to ``get_image_features``."""
    hf_model = ref.gemma3_multimodal(tmp_path)
    config = siglip.Gemma3VisionConfig.from_hf(json.loads((tmp_path / "config.json").read_text()))
    with CheckpointDir(tmp_path) as ckpt:
        tower = siglip.from_checkpoint(ckpt, config)
    pixels = np.random.RandomState(1).uniform(-1, 1, (1, 3, 56, 56)).astype(np.float32)
    with torch.no_grad():
        expected = hf_model.model.get_image_features(torch.as_tensor(pixels)).pooler_output
    soft = np.asarray(tower(pixels).unwrap("batch", "image_token", "embedding"))
    diff = np.abs(soft - expected.numpy()).max()
    print(f"\nsaved checkpoint: max |diff| {diff:.2e}")
    assert diff <= TOLERANCE


def test_state_dict_mismatch_lists_every_tensor(reference, config):
    arrays, _, _ = reference
    broken = dict(arrays)
    del broken["vision_tower.vision_model.encoder.layers.1.mlp.fc2.bias"]
    broken["multi_modal_projector.mm_soft_emb_norm.weight"] = np.zeros(7, np.float32)
    with pytest.raises(CheckpointError) as error:
        siglip.from_state_dict(config, broken)
    message = str(error.value)
    assert "encoder.layers.1.mlp.fc2.bias" in message and "mm_soft_emb_norm.weight" in message


def test_labels_map_to_transformers_names(config):
    assert siglip.hf_name("vision.blocks.3.attn.q_proj.weights") == (
        "vision_tower.vision_model.encoder.layers.3.self_attn.q_proj.weight"
    )
    assert siglip.hf_name("vision.embeddings.position_embedding.embeddings") == (
        "vision_tower.vision_model.embeddings.position_embedding.weight"
    )
    assert siglip.hf_name("vision.post_layernorm.scale") == (
        "vision_tower.vision_model.post_layernorm.weight"
    )
    assert siglip.hf_name("vision.mm_input_projection.weights") == (
        "multi_modal_projector.mm_input_projection_weight"
    )


def test_parameter_counts(config):
    tower = transformers.SiglipVisionModel(_hf_config().vision_config)
    projector = transformers.models.gemma3.modeling_gemma3.Gemma3MultiModalProjector(_hf_config())
    hf_count = sum(p.numel() for m in (tower, projector) for p in m.parameters())
    assert config.num_params() == hf_count
    # SigLIP-So400m/14 @ 896 of Gemma 3 4B (ARCHITECTURES.md: 416 866 032) and its projector.
    gemma3_4b = siglip.Gemma3VisionConfig(
        siglip.SiglipVisionConfig(1152, 4304, 27, 16, image_size=896, patch_size=14),
        siglip.Gemma3ProjectorConfig(256, 2560),
    )
    assert gemma3_4b.num_params() == 416_866_032 + 1152 * 2560 + 1152


def test_random_tower_runs(config):
    model = config.build(RandomInit(seed=0))
    out = model(np.zeros((2, 3, 32, 32), np.float32))
    assert out.named_shape == {"batch": 2, "image_token": MM_TOKENS, "embedding": TEXT_WIDTH}


@pytest.mark.parametrize(
    "changes, words",
    [
        (dict(mm_tokens_per_image=5), "square number"),
        (dict(mm_tokens_per_image=9), "not a multiple of 3"),
        (dict(vision_config={**VISION, "image_size": [32, 48]}), "not square"),
        (dict(vision_config={**VISION, "hidden_act": "relu"}), "hidden_act"),
    ],
)
def test_config_errors(changes, words):
    hf = {"vision_config": VISION, "text_config": {"hidden_size": 48}, "mm_tokens_per_image": 4}
    with pytest.raises(ValueError, match=words):
        siglip.Gemma3VisionConfig.from_hf({**hf, **changes})


def test_bfloat16_tower(reference, config):
    """Pixels are cast to the parameters' dtype, as transformers does: a bfloat16 tower gives
    bfloat16 tokens within bfloat16's precision of the float32 ones."""
    arrays, pixels, expected = reference
    half = siglip.from_state_dict(config, arrays, dtype=jnp.bfloat16)
    soft = jax.jit(lambda m, x: m(x).unwrap("batch", "image_token", "embedding"))(
        pz.freeze_params(half), pixels
    )
    assert soft.dtype == jnp.bfloat16
    reference_tokens = expected["vision.hook_projected"]
    error = np.abs(np.asarray(soft, np.float32) - reference_tokens).max()
    print(f"\nbfloat16 vs transformers float32: max |diff| {error:.3f}")
    assert 0 < error < 0.05 * np.abs(reference_tokens).max()
