"""Gemma 3 with images, end to end, against transformers' ``Gemma3ForConditionalGeneration``
(eager, float32): a tiny perturbed checkpoint saved by ``save_pretrained``, loaded with
``gl.load(path, vision=True)``, run on two prompts with three images in all."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import transformers
from penzai import pz
from safetensors.numpy import save_file

import gemmalens as gl
from gemmalens.checkpoints import CheckpointError
from gemmalens.layers.params import ShapeOnly
from gemmalens.vision import expand_gemma3_image_ids, siglip
from gemmalens.vision.merge import block_ids, image_runs
from tests import hf_reference as ref

TOLERANCE = 1e-4  # relative to the logit scale
IMAGE, BOI, EOI = 257, 255, 256
TOKENS_PER_IMAGE = ref.TINY_SIGLIP_TOKENS_PER_IMAGE
WINDOW = 3  # < TOKENS_PER_IMAGE: the window cuts into an image block on local layers
VISION = ref.TINY_SIGLIP


def _expand(ids: list[int], images: int) -> list[int]:
    return expand_gemma3_image_ids(ids, images, BOI, EOI, IMAGE, TOKENS_PER_IMAGE)


# Row 0: two images; row 1: one image, then text. Image runs start at 4, 12 and 7.
ROWS = [
    _expand([2, 10, 11, BOI, 12, 13, BOI, 14, 15, 16, 17, 18], 2),
    _expand([2, 20, 21, 22, 23, 24, BOI, *range(30, 40)], 1),
]
TOKENS = np.array(ROWS)
TYPES = (TOKENS == IMAGE).astype(np.int64)
PIXELS = np.random.RandomState(0).uniform(-1, 1, (3, 3, 32, 32)).astype(np.float32)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A perturbed tiny Gemma3ForConditionalGeneration (norms, biases and the projector
    moved off their initial values), saved by transformers."""
    directory = tmp_path_factory.mktemp("gemma3_mm")
    torch.manual_seed(0)
    text = {**ref.TINY_GEMMA3, "vocab_size": 300, "sliding_window": WINDOW}
    config = transformers.Gemma3Config(
        text_config=text,
        vision_config=VISION,  # vision_use_head defaults to True: its tensors are skipped
        mm_tokens_per_image=TOKENS_PER_IMAGE,
        boi_token_index=BOI,
        eoi_token_index=EOI,
        image_token_index=IMAGE,
    )
    for part in (config, config.text_config, config.vision_config):
        part._attn_implementation = "eager"
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    ref.perturb_(model, seed=0)
    model.save_pretrained(directory)
    return directory, model


@pytest.fixture(scope="module")
def expected(checkpoint):
    _, hf = checkpoint
    with torch.no_grad():
        return hf(
            input_ids=torch.as_tensor(TOKENS),
            pixel_values=torch.as_tensor(PIXELS),
            token_type_ids=torch.as_tensor(TYPES),
            output_hidden_states=True,
            output_attentions=True,
        )


@pytest.fixture(scope="module")
def model(checkpoint):
    return gl.load(checkpoint[0], vision=True)


@pytest.fixture(scope="module")
def cached(model):
    return model.run_with_cache(TOKENS, pixel_values=PIXELS)


def _relative(actual, expected) -> float:
    return float(np.abs(np.asarray(actual) - expected).max() / np.abs(expected).max())


def test_prompt_layout():
    assert image_runs(TOKENS, IMAGE) == [(0, 4, 8), (0, 12, 16), (1, 7, 11)]
    assert block_ids(TYPES)[0, 3:17].tolist() == [-1, *[0] * 4, -1, -1, -1, -1, *[1] * 4, -1]


def test_logits_match_transformers(model, checkpoint, expected, cached):
    reference = expected.logits.numpy()
    fused = _relative(model(TOKENS, pixel_values=PIXELS), reference)
    explicit = _relative(cached[0], reference)  # patterns captured: the explicit path
    print(
        f"\nlogits vs transformers: max |diff| / max |logit| = {fused:.1e} (fused), "
        f"{explicit:.1e} (explicit); logit scale {np.abs(reference).max():.2f}"
    )
    assert fused <= TOLERANCE and explicit <= TOLERANCE
    # The checks can fail: the same images with plain causal attention (token types all
    # zero) are far off, and equal transformers' run without token_type_ids.
    causal = np.asarray(model(TOKENS, pixel_values=PIXELS, token_type_ids=0 * TYPES))
    assert _relative(causal, reference) > 0.05
    with torch.no_grad():
        hf_causal = checkpoint[1](
            input_ids=torch.as_tensor(TOKENS), pixel_values=torch.as_tensor(PIXELS)
        ).logits.numpy()
    assert _relative(causal, hf_causal) <= TOLERANCE


def test_residual_stream_matches_hidden_states(cached, expected, model):
    _, cache = cached
    hidden = [h.numpy() for h in expected.hidden_states]
    layers = model.config.num_hidden_layers
    assert len(hidden) == layers + 1
    # hidden_states[0] is the merged embedding: soft tokens at image positions.
    pairs = [("hook_embed", hidden[0])]
    pairs += [(f"blocks.{i}.hook_resid_post", hidden[i + 1]) for i in range(layers - 1)]
    pairs.append(("ln_final.hook_normalized", hidden[layers]))  # transformers' last is normed
    diffs = {name: _relative(cache[name], value) for name, value in pairs}
    print(
        "\nresidual stream vs hidden_states (relative):", {k: f"{v:.1e}" for k, v in diffs.items()}
    )
    assert max(diffs.values()) <= TOLERANCE
    soft = expected.image_hidden_states.numpy()  # [image, token, d_model]
    assert _relative(cache["vision.hook_projected"], soft) <= TOLERANCE
    placed = np.asarray(cache["hook_image_embed"])
    is_image = TOKENS == IMAGE
    assert np.array_equal(placed[~is_image], np.zeros_like(placed[~is_image]))
    assert _relative(placed[is_image], soft.reshape(-1, soft.shape[-1])) <= TOLERANCE


def _visible(layer_type: str) -> np.ndarray:
    """[batch, q, k] from the rule, written independently of the model: causal or same
    image run; on sliding layers also k > q - WINDOW."""
    seq = TOKENS.shape[1]
    q, k = np.arange(seq)[:, None], np.arange(seq)[None, :]
    blocks = np.full(TOKENS.shape, -1)
    for n, (row, start, stop) in enumerate(image_runs(TOKENS, IMAGE)):
        blocks[row, start:stop] = n
    same = (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0)
    visible = (k <= q)[None] | same
    if layer_type == "sliding_attention":
        visible &= (k > q - WINDOW)[None]
    return visible


def test_attention_patterns_and_image_block_edges(cached, expected, model):
    _, cache = cached
    types = model.config.layer_types
    assert "full_attention" in types and "sliding_attention" in types
    for i, layer_type in enumerate(types):
        ours = np.asarray(cache[f"blocks.{i}.attn.hook_pattern"])
        theirs = expected.attentions[i].numpy()
        assert np.abs(ours - theirs).max() <= 1e-5, i
        visible = np.broadcast_to(_visible(layer_type)[:, None], ours.shape)
        # Exactly zero where masked, non-zero where visible, in both models.
        assert np.array_equal(ours > 0, visible), i
        assert np.array_equal(theirs > 0, visible), i
    full = np.asarray(cache["blocks.5.attn.hook_pattern"])[0, 0]  # row 0, head 0
    local = np.asarray(cache["blocks.0.attn.hook_pattern"])[0, 0]
    start, end = 4, 7  # row 0's first image: tokens 4..7
    # Full layer: the token before the block does not see into it; the block's first
    # token sees its last, not beyond; its last sees its first; the token after sees all.
    assert full[start - 1, start] == 0 and full[start - 1, start - 1] > 0
    assert full[start, end] > 0 and full[start, end + 1] == 0
    assert full[end, start] > 0 and full[end, start - 1] > 0
    assert (full[end + 1, : end + 2] > 0).all()
    # The second image's block does not see the first's future, only its past (causal).
    assert full[12, 15] > 0 and full[12, 7] > 0 and full[7, 12] == 0
    # Sliding layer (window 3): the first token still sees the whole block ahead, but the
    # last token sees only 3 keys back, so not the block's first token.
    assert local[start, end] > 0 and local[start, start - 2] > 0 and local[start, start - 3] == 0
    assert local[end, start] == 0 and local[end, start + 1] > 0
    assert local[end + 1, end - 1] > 0 and local[end + 1, end - 2] == 0


def test_vision_hooks_listed_and_cached(model, cached):
    _, cache = cached
    names = model.hook_names
    vision = [n for n in names if n.startswith("vision.")]
    assert vision[0] == "vision.hook_patch_embed" and vision[-1] == "vision.hook_projected"
    assert "vision.blocks.1.attn.hook_pattern" in names
    # Forward order: the tower, its tokens in the text stream, the merged embedding.
    order = [names.index(n) for n in ("vision.hook_projected", "hook_image_embed", "hook_embed")]
    assert order == sorted(order) and order[-1] < names.index("blocks.0.hook_resid_pre")
    assert all(name in cache for name in names)
    assert cache["vision.blocks.0.attn.hook_pattern"].shape == (3, 4, 16, 16)
    assert cache["vision.hook_projected"].shape == (3, TOKENS_PER_IMAGE, 64)
    assert cache["hook_image_embed"].shape == (2, TOKENS.shape[1], 64)
    # A call without images runs no tower: its hooks are left out of the cache.
    _, text_cache = model.run_with_cache(TOKENS[:, :3])
    assert "vision.hook_projected" not in text_cache and "hook_embed" in text_cache


def test_ablating_the_image_tokens(model, checkpoint):
    _, hf = checkpoint
    clean = np.asarray(model(TOKENS, pixel_values=PIXELS))
    zero = lambda value, name: value * 0  # noqa: E731
    projected = np.asarray(
        model.run_with_hooks(TOKENS, {"vision.hook_projected": zero}, pixel_values=PIXELS)
    )
    placed = np.asarray(
        model.run_with_hooks(TOKENS, {"hook_image_embed": zero}, pixel_values=PIXELS)
    )
    # transformers with zero embeddings at the image positions and the same image blocks.
    with torch.no_grad():
        ids = torch.as_tensor(TOKENS)
        embeds = hf.get_input_embeddings()(ids)
        embeds[ids == IMAGE] = 0
        reference = hf(inputs_embeds=embeds, token_type_ids=torch.as_tensor(TYPES)).logits.numpy()
    assert _relative(projected, reference) <= TOLERANCE
    assert np.array_equal(projected, placed)
    assert _relative(projected, clean) > 0.01
    # Identity hooks change nothing.
    same = model.run_with_hooks(
        TOKENS, {"vision.blocks.*.hook_resid_post": lambda v, n: None}, pixel_values=PIXELS
    )
    assert _relative(same, clean) <= 1e-6


def test_text_only_loading_is_unchanged(checkpoint, model):
    directory, hf = checkpoint
    text_model = gl.load(directory)
    assert text_model.config.vision is None
    assert not any(n.startswith("vision.") for n in text_model.hook_names)
    tokens = np.random.RandomState(1).randint(3, 250, (2, 10))
    with torch.no_grad():
        reference = hf(input_ids=torch.as_tensor(tokens)).logits.numpy()
    assert _relative(text_model(tokens), reference) <= TOLERANCE
    # With its tower, a text-only prompt gives the same logits.
    assert _relative(model(tokens), reference) <= TOLERANCE
    # Generation reads no images: the tower is left out of its program.
    greedy = model.generate(tokens, max_new_tokens=1, stop_at_eos=False)
    assert np.array_equal(np.asarray(greedy.tokens)[:, 0], reference[:, -1].argmax(-1))
    with pytest.raises(NotImplementedError, match="generation with images"):
        model.generate(TOKENS, max_new_tokens=1)
    with pytest.raises(ValueError, match=r"vision=True"):
        text_model(TOKENS, pixel_values=PIXELS)


def _error(model, tokens=TOKENS, **kwargs) -> str:
    with pytest.raises((ValueError, TypeError)) as error:
        model(tokens, **kwargs)
    return str(error.value)


def test_clear_errors(model):
    message = _error(model)
    assert "no pixel_values" in message and "12 image token(s)" in message
    assert "3 run(s)" in message
    message = _error(model, pixel_values=PIXELS[:2])
    assert "3 run(s) of image tokens" in message and "2 image(s)" in message
    short = TOKENS.copy()
    short[0, 7] = 50  # the first run loses its last token: 3 runs, one of 3 tokens
    message = _error(model, short, pixel_values=PIXELS)
    assert "mm_tokens_per_image = 4" in message and "row 0 [4:7] (3 tokens)" in message
    merged = TOKENS.copy()
    merged[0, 8:12] = IMAGE  # two images with no text between them: one run of 12
    message = _error(model, merged, pixel_values=PIXELS)
    assert "2 run(s)" in message and "3 image(s)" in message
    message = _error(model, pixel_values=PIXELS[:, :, :16])
    assert "[num_images, 3, 32, 32]" in message and "(3, 3, 16, 32)" in message
    message = _error(model, pixel_values=PIXELS, token_type_ids=TYPES[:, :5])
    assert "token_type_ids has shape" in message
    message = _error(model, pixel_values=PIXELS, images=PIXELS)
    assert "['images']" in message


def test_load_errors(checkpoint, tmp_path):
    text_dir = tmp_path / "text"
    ref.gemma3_text(text_dir)
    with pytest.raises(CheckpointError, match="text-only Gemma 3 checkpoint"):
        gl.load(text_dir, vision=True)
    other = tmp_path / "gemma3n"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gemma3n_text"}))
    save_file({"x": np.zeros(1, np.float32)}, other / "model.safetensors")
    with pytest.raises(CheckpointError, match="text-only Gemma 3n checkpoint.*no vision tower"):
        gl.load(other, vision=True)


def test_built_model_counts_its_tower():
    """num_params() counts what the built tree holds (tower included), and a built model
    lists the tower's hook points (the tree of zeros: no weights drawn)."""
    tower = siglip.Gemma3VisionConfig(
        siglip.SiglipVisionConfig(16, 24, 1, 2, image_size=32, patch_size=8),
        siglip.Gemma3ProjectorConfig(TOKENS_PER_IMAGE, 2560),
    )
    small = gl.preset("gemma3_4b").replace(vision=tower).replace(
        vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
        sliding_window=4,
    )  # fmt: skip
    assert small.vision.projector.text_hidden_size == 32  # replace() follows hidden_size
    tree = small.build(ShapeOnly())
    values = pz.select(tree).at_instances_of(pz.ParameterValue).get_sequence()
    sizes = {v.label: math.prod(v.value.data_array.shape) for v in values}  # tied: once
    assert sum(sizes.values()) == small.num_params()
    assert any(label.startswith("vision.") for label in sizes)
    names = gl.Model(tree, small).hook_names
    assert "vision.blocks.0.attn.hook_pattern" in names and "hook_image_embed" in names
    with pytest.raises(ValueError, match="must match"):
        dataclasses.replace(small, hidden_size=40)


def test_gemma3_4b_preset_counts_the_multimodal_model():
    """gl.preset("gemma3_4b") against transformers' Gemma3ForConditionalGeneration built on
    the meta device from the released 4B config (shapes only, nothing allocated)."""
    text = gl.preset("gemma3_4b_text")
    config = transformers.Gemma3Config(
        text_config=dict(
            vocab_size=262_208, hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size, num_hidden_layers=text.num_hidden_layers,
            num_attention_heads=text.num_attention_heads,
            num_key_value_heads=text.num_key_value_heads, head_dim=text.head_dim,
            query_pre_attn_scalar=text.query_pre_attn_scalar, sliding_window=1024,
            rope_scaling={"rope_type": "linear", "factor": 8.0},
        ),
        vision_config=dict(
            hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
            num_attention_heads=16, image_size=896, patch_size=14, vision_use_head=False,
        ),
        mm_tokens_per_image=256,
    )  # fmt: skip
    with torch.device("meta"):
        hf = transformers.Gemma3ForConditionalGeneration(config)
    hf_count = sum(p.numel() for p in hf.parameters())  # the tied lm_head once
    assert hf_count == 4_300_079_472  # ARCHITECTURES.md
    assert gl.preset("gemma3_4b").num_params() == hf_count
    assert gl.preset("gemma3_12b").num_params() == 12_187_325_040
    assert gl.preset("gemma3_27b").num_params() == 27_432_406_640
