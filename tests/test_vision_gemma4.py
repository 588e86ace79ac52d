"""Gemma 4 with images, end to end, against transformers' ``Gemma4ForConditionalGeneration``
(eager, float32): a tiny perturbed checkpoint saved by ``save_pretrained``, loaded with
``gl.load(path, vision=True)``, run on two prompts with three real images (figures of the
docs, one cropped to portrait) prepared by transformers' image processor.

The one tiny config exercises every path at once: an E2B-like text decoder (per-layer
inputs, KV sharing) with the 26B/31B-style ``use_bidirectional_attention="vision"``, and a
tower with clipped linears (E2B/E4B) *and* standardisation (26B/31B). Every weight is
perturbed, and so are the clipping bounds (finite, so that they clip) and the
standardisation vectors."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
import torch
import transformers
from penzai import pz
from safetensors.numpy import save_file
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

import gemmalens as gl
from gemmalens.checkpoints import CheckpointError
from gemmalens.layers.params import ParamRequest, RandomInit, ShapeOnly
from gemmalens.layers.per_layer_embeddings import PerLayerInputs
from gemmalens.presets import gemma4_with_vision
from gemmalens.vision import gemma4, preprocess_gemma4
from gemmalens.vision.merge import image_runs, image_side_inputs
from tests import hf_reference as ref
from tests.test_activation_dtype import check_float32_activations_with_towers

HIDDEN_TOLERANCE = 1e-5  # tower hidden states and attention patterns, absolute
LOGIT_TOLERANCE = 1e-4  # logits, absolute
IMAGE, VIDEO, AUDIO, BOI, EOI = 500, 501, 502, 503, 504
PATCH, KERNEL, SOFT_TOKENS = 4, 2, 70  # max_patches = 70 * 2**2 = 280 patches of 4x4 px
VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention in the tower
    head_dim=8,
    patch_size=PATCH,
    pooling_kernel_size=KERNEL,
    position_embedding_size=32,
    use_clipped_linears=True,
    standardize=True,
    rms_norm_eps=1e-5,  # != 1e-6: a dropped eps shows
)
TEXT = {**ref.TINY_GEMMA4_E2B, "use_bidirectional_attention": "vision", "sliding_window": 8}
DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "teaching"


def _images() -> list[PIL.Image.Image]:
    """Three real images of different shapes (66, 60 and 64 soft tokens): landscape, a
    tall crop, a square crop."""
    wide = PIL.Image.open(DOCS / "induction_gemma3.png")
    tall = PIL.Image.open(DOCS / "routing_gemma4_moe.png").crop((0, 0, 200, 672))
    square = PIL.Image.open(DOCS / "loss_gemma3.png").crop((0, 0, 384, 384))
    return [image.convert("RGB") for image in (wide, tall, square)]


def _run(count: int) -> list[int]:
    return [BOI, *[IMAGE] * count, EOI]


@pytest.fixture(scope="module")
def inputs():
    """The processor's arrays for the three images, and two prompts: row 0 holds images 0
    and 1, row 1 image 2 then text (the same length)."""
    processed = Gemma4ImageProcessorPil()(
        _images(),
        return_tensors="np",
        patch_size=PATCH,
        max_soft_tokens=SOFT_TOKENS,
        pooling_kernel_size=KERNEL,
    )
    counts = [int(c) for c in processed["num_soft_tokens_per_image"]]
    row0 = [2, 10, 11, *_run(counts[0]), 12, 13, *_run(counts[1]), 14, 15]
    row1 = [2, 20, *_run(counts[2])]
    row1 += list(range(30, 30 + len(row0) - len(row1)))
    tokens = np.array([row0, row1])
    return dict(
        pixels=processed["pixel_values"],
        positions=processed["image_position_ids"],
        counts=counts,
        tokens=tokens,
        types=(tokens == IMAGE).astype(np.int64),  # the processor's mm_token_type_ids
    )


def _perturb_buffers_(model: torch.nn.Module, seed: int) -> None:
    """Finite clipping bounds (+-0.5 to 1, so that many values clip) and standardisation
    vectors off identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            width = 0.5 + 0.5 * float(torch.rand((), generator=generator))
            if name.endswith(("input_min", "output_min")):
                buffer.fill_(-width)
            elif name.endswith(("input_max", "output_max")):
                buffer.fill_(width)
            elif name.endswith("std_bias"):
                buffer.copy_(0.3 * torch.randn(buffer.shape, generator=generator))
            elif name.endswith("std_scale"):
                buffer.copy_(1 + 0.3 * torch.randn(buffer.shape, generator=generator))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gemma4_mm")
    torch.manual_seed(0)
    config = transformers.Gemma4Config(
        text_config=TEXT,
        vision_config=VISION,
        audio_config=None,
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        audio_token_id=AUDIO,
        boi_token_id=BOI,
        eoi_token_id=EOI,
        boa_token_id=505,
        eoa_token_id=506,
    )
    for part in (config, config.text_config, config.vision_config):
        part._attn_implementation = "eager"
    model = transformers.Gemma4ForConditionalGeneration(config).eval()
    ref._perturb_gemma4_(model, seed=0)
    _perturb_buffers_(model, seed=1)
    model.save_pretrained(directory)
    return directory, model


@pytest.fixture(scope="module")
def expected(checkpoint, inputs):
    """transformers' outputs: the full model, each tower block's output (forward hooks),
    the tower's pooled tokens and the projected soft tokens."""
    _, hf = checkpoint
    tower = hf.model.vision_tower
    blocks = []
    handles = [
        layer.register_forward_hook(lambda m, a, out: blocks.append(out.numpy()))
        for layer in tower.encoder.layers
    ]
    pixels = torch.as_tensor(inputs["pixels"])
    positions = torch.as_tensor(inputs["positions"])
    with torch.no_grad():
        out = hf(
            input_ids=torch.as_tensor(inputs["tokens"]),
            pixel_values=pixels,
            image_position_ids=positions,
            mm_token_type_ids=torch.as_tensor(inputs["types"]),
            output_hidden_states=True,
            output_attentions=True,
        )
        vision = tower(pixel_values=pixels, pixel_position_ids=positions, output_attentions=True)
        soft = hf.model.get_image_features(pixels, positions).pooler_output
    for handle in handles:
        handle.remove()
    return dict(
        out=out,
        blocks=blocks[-len(tower.encoder.layers) :],
        patterns=[a.numpy() for a in vision.attentions],
        pooled=vision.last_hidden_state.numpy(),  # standardised, padding cells dropped
        soft=[s.numpy() for s in soft],
    )


@pytest.fixture(scope="module")
def model(checkpoint):
    return gl.load(checkpoint[0], vision=True)


@pytest.fixture(scope="module")
def cached(model, inputs):
    images = preprocess_gemma4(
        _images(), patch_size=PATCH, max_soft_tokens=SOFT_TOKENS, pooling_kernel_size=KERNEL
    )
    return model.run_with_cache(inputs["tokens"], pixel_values=images)


def _diff(actual, expected) -> float:
    return float(np.abs(np.asarray(actual) - np.asarray(expected)).max())


def test_processor_inputs_and_prompt_layout(inputs):
    ours = preprocess_gemma4(
        _images(), patch_size=PATCH, max_soft_tokens=SOFT_TOKENS, pooling_kernel_size=KERNEL
    )
    assert _diff(ours.pixel_values, inputs["pixels"]) <= 1e-6
    np.testing.assert_array_equal(ours.image_position_ids, inputs["positions"])
    assert ours.num_soft_tokens_per_image == inputs["counts"]
    assert gemma4.soft_token_counts(inputs["positions"], KERNEL) == inputs["counts"]
    # Images of their own sizes: each has padding, and their soft-token counts differ.
    assert len(set(inputs["counts"])) == 3 and (inputs["positions"] == -1).all(-1).any(-1).all()
    runs = image_runs(inputs["tokens"], IMAGE)
    assert [b - a for _, a, b in runs] == inputs["counts"] and [r for r, _, _ in runs] == [0, 0, 1]


def test_tower_matches_transformers(cached, expected, model, inputs):
    """Each block's output and attention pattern, the pooled (standardised) tokens and the
    soft tokens after embed_vision."""
    _, cache = cached
    layers = VISION["num_hidden_layers"]
    hidden = [
        _diff(cache[f"vision.blocks.{i}.hook_resid_post"], expected["blocks"][i])
        for i in range(layers)
    ]
    patterns = [
        _diff(cache[f"vision.blocks.{i}.attn.hook_pattern"], expected["patterns"][i])
        for i in range(layers)
    ]
    valid = np.asarray(gemma4.soft_token_mask(jnp.asarray(inputs["positions"]), KERNEL))
    assert valid.sum(-1).tolist() == inputs["counts"]
    pooled = np.asarray(cache["vision.hook_standardized"])[valid]
    soft = np.asarray(cache["vision.hook_projected"])[valid]
    scale = np.abs(expected["pooled"]).max()
    print(
        f"\ntower vs transformers: hidden states {max(hidden):.1e} (scale "
        f"{max(np.abs(b).max() for b in expected['blocks']):.1f}), patterns {max(patterns):.1e}, "
        f"pooled {_diff(pooled, expected['pooled']) / scale:.1e} relative (scale {scale:.1f}), "
        f"soft tokens {_diff(soft, np.concatenate(expected['soft'])):.1e}"
    )
    assert max(hidden) <= HIDDEN_TOLERANCE and max(patterns) <= HIDDEN_TOLERANCE
    assert _diff(pooled, expected["pooled"]) / scale <= HIDDEN_TOLERANCE
    assert _diff(soft, np.concatenate(expected["soft"])) <= HIDDEN_TOLERANCE
    # The bounds clip (so a tower that did not clip would fail the checks above): the MLP
    # gates stop exactly at their output bounds.
    gate = np.asarray(cache["vision.blocks.0.mlp.hook_pre"])
    bounds = pz.select(model.model).at_instances_of(gemma4.ClippedLinear).get_sequence()
    gate_proj = next(b for b in bounds if b.linear.weights.label.endswith("mlp.gate_proj.weights"))
    high = float(gate_proj.output_max.value.unwrap())
    assert gate.max() == np.float32(high) and (gate == np.float32(high)).sum() > 10
    # Padding patches are masked as keys: exactly zero weight in every query's row.
    padding = (inputs["positions"] == -1).all(-1)
    pattern = np.asarray(cache["vision.blocks.0.attn.hook_pattern"])
    assert (pattern.transpose(0, 3, 1, 2)[padding] == 0).all()
    assert (pattern.transpose(0, 3, 1, 2)[~padding] > 0).all()


def test_logits_match_transformers(model, checkpoint, expected, cached, inputs):
    reference = expected["out"].logits.numpy()
    images = dict(pixel_values=inputs["pixels"], image_position_ids=inputs["positions"])
    fused = _diff(model(inputs["tokens"], pixel_values=images), reference)
    explicit = _diff(cached[0], reference)  # patterns captured: the explicit path
    print(
        f"\nlogits vs transformers: max |diff| {fused:.1e} (fused), {explicit:.1e} (explicit); "
        f"logit scale {np.abs(reference).max():.2f}"
    )
    assert fused <= LOGIT_TOLERANCE and explicit <= LOGIT_TOLERANCE
    # The processor's arrays as separate keywords, under its own names, give the same.
    apart = model(
        inputs["tokens"],
        pixel_values=inputs["pixels"],
        image_position_ids=inputs["positions"],
        mm_token_type_ids=inputs["types"],
    )
    assert _diff(apart, reference) <= LOGIT_TOLERANCE
    with pytest.raises(TypeError, match="not both"):
        model(inputs["tokens"], pixel_values=images, token_type_ids=1, mm_token_type_ids=1)
    # The checks can fail. Plain causal attention (token types all zero: no vision blocks)
    # is far off, and equals transformers' run without mm_token_type_ids.
    causal = np.asarray(
        model(inputs["tokens"], pixel_values=images, token_type_ids=0 * inputs["types"])
    )
    assert _diff(causal, reference) > 0.1
    with torch.no_grad():
        hf_causal = checkpoint[1](
            input_ids=torch.as_tensor(inputs["tokens"]),
            pixel_values=torch.as_tensor(inputs["pixels"]),
            image_position_ids=torch.as_tensor(inputs["positions"]),
        ).logits.numpy()
    assert _diff(causal, hf_causal) <= LOGIT_TOLERANCE
    # Per-layer inputs that read the placeholders' own rows (not the pad row) are off too.
    own_rows = (
        pz.select(model.model)
        .at_instances_of(PerLayerInputs)
        .apply(lambda layer: dataclasses.replace(layer, placeholder_ids=()))
    )
    assert _diff(model.with_tree(own_rows)(inputs["tokens"], pixel_values=images), reference) > 1e-3


def test_text_stream_and_masks(cached, expected, model, inputs):
    _, cache = cached
    out, tokens = expected["out"], inputs["tokens"]
    # hidden_states[0] is the merged embedding, with the soft tokens at image positions.
    assert _diff(cache["hook_embed"], out.hidden_states[0].numpy()) <= HIDDEN_TOLERANCE
    placed = np.asarray(cache["hook_image_embed"])
    is_image = tokens == IMAGE
    assert not placed[~is_image].any()
    assert _diff(placed[is_image], out.image_hidden_states.numpy()) <= HIDDEN_TOLERANCE
    # Row 0's first image: full layers stay causal, sliding layers (window 8) let the
    # block's first token see its whole block ahead, but not past it.
    start = 3 + 1
    end = start + inputs["counts"][0] - 1
    types = model.config.layer_types
    full = np.asarray(cache[f"blocks.{types.index('full_attention')}.attn.hook_pattern"])[0, 0]
    local = np.asarray(cache[f"blocks.{types.index('sliding_attention')}.attn.hook_pattern"])[0, 0]
    assert full[start, start + 1] == 0 and full[start, start] > 0
    assert local[start, end] > 0 and local[start, end + 1] == 0
    assert local[end, start] == 0 and local[end, end - 7] > 0  # the window still applies
    for i in range(model.config.num_hidden_layers):
        ours = np.asarray(cache[f"blocks.{i}.attn.hook_pattern"])
        assert np.array_equal(ours > 0, out.attentions[i].numpy() > 0), i


def test_hooks_listed_and_usable(model, checkpoint, cached, inputs):
    _, cache = cached
    names = model.hook_names
    vision = [n for n in names if n.startswith("vision.")]
    assert vision[:3] == [
        "vision.hook_patch_embed",
        "vision.hook_pos_embed",
        "vision.blocks.0.hook_resid_pre",
    ]
    assert vision[-4:] == [
        "vision.hook_pooled",
        "vision.hook_standardized",
        "vision.hook_soft_emb_norm",
        "vision.hook_projected",
    ]
    for name in ("attn.hook_pattern", "attn.hook_q", "mlp.hook_post", "hook_resid_post"):
        assert f"vision.blocks.1.{name}" in names
    order = [names.index(n) for n in ("vision.hook_projected", "hook_image_embed", "hook_embed")]
    assert order == sorted(order) and order[-1] < names.index("blocks.0.hook_resid_pre")
    assert all(name in cache for name in names)
    assert cache["vision.blocks.0.attn.hook_pattern"].shape == (3, 4, 280, 280)
    assert cache["vision.blocks.0.attn.hook_k"].shape == (3, 280, 2, 8)
    assert cache["vision.hook_projected"].shape == (3, SOFT_TOKENS, 64)
    # Zeroing the soft tokens in the tower is transformers' run with zero embeddings at the
    # image positions (the per-layer inputs' token part still reads the pad row there).
    images = preprocess_gemma4(
        _images(), patch_size=PATCH, max_soft_tokens=SOFT_TOKENS, pooling_kernel_size=KERNEL
    )
    zero = lambda value, name: value * 0  # noqa: E731
    ablated = model.run_with_hooks(
        inputs["tokens"], {"vision.hook_projected": zero}, pixel_values=images
    )
    hf, ids = checkpoint[1], torch.as_tensor(inputs["tokens"])
    with torch.no_grad():
        text_ids = torch.where(ids == IMAGE, 0, ids)
        embeds = hf.model.language_model.embed_tokens(text_ids)
        embeds[ids == IMAGE] = 0
        reference = hf(
            inputs_embeds=embeds,
            per_layer_inputs=hf.model.language_model.get_per_layer_inputs(text_ids),
            mm_token_type_ids=torch.as_tensor(inputs["types"]),
        ).logits.numpy()
    assert _diff(ablated, reference) <= LOGIT_TOLERANCE and _diff(ablated, cached[0]) > 1e-2
    # The processor's arrays on their own (image_position_ids beside pixel_values) make the
    # same side inputs as preprocess_gemma4's result.
    tokens = np.asarray(inputs["tokens"], np.int32)
    apart = image_side_inputs(
        model.config,
        tokens,
        inputs["pixels"],
        inputs["types"],
        image_position_ids=inputs["positions"],
    )
    together = image_side_inputs(model.config, tokens, images)
    assert apart.keys() == together.keys()
    for name in apart:
        assert (
            _diff(
                apart[name].unwrap(*apart[name].named_shape),
                together[name].unwrap(*apart[name].named_shape),
            )
            == 0
        )


def test_text_only_loading_is_the_default(checkpoint, model):
    directory, hf = checkpoint
    text_model = gl.load(directory)
    assert text_model.config.vision is None
    assert not any(n.startswith("vision.") for n in text_model.hook_names)
    tokens = np.random.RandomState(1).randint(3, 490, (2, 10))
    with torch.no_grad():
        reference = hf(input_ids=torch.as_tensor(tokens)).logits.numpy()
    assert _diff(text_model(tokens), reference) <= LOGIT_TOLERANCE
    assert _diff(model(tokens), reference) <= LOGIT_TOLERANCE  # the tower changes no text
    with pytest.raises(NotImplementedError, match="generation with images"):
        model.generate([[2, BOI, IMAGE, EOI]], max_new_tokens=1)
    with pytest.raises(ValueError, match=r"This Gemma 4 model has no vision tower.*vision=True"):
        text_model(tokens, pixel_values=np.zeros((1, 280, 48), np.float32))


def _error(model, tokens, **kwargs) -> str:
    with pytest.raises((ValueError, TypeError, NotImplementedError)) as error:
        model(tokens, **kwargs)
    return str(error.value)


def test_clear_errors(model, inputs):
    tokens, pixels, positions = inputs["tokens"], inputs["pixels"], inputs["positions"]
    images = dict(pixel_values=pixels, image_position_ids=positions)
    message = _error(model, tokens)  # placeholders without an image
    assert "no pixel_values" in message and f"{sum(inputs['counts'])} image token(s)" in message
    text = np.array([[2, 10, 11, 12]])
    message = _error(model, text, pixel_values=images)  # an image without placeholders
    assert "0 run(s) of image tokens" in message and "3 image(s)" in message
    message = _error(model, tokens[:1], pixel_values=images)  # more images than runs
    assert "2 run(s)" in message and "3 image(s)" in message
    swapped = dict(pixel_values=pixels[[1, 0, 2]], image_position_ids=positions[[1, 0, 2]])
    message = _error(model, tokens, pixel_values=swapped)  # runs of the wrong lengths
    assert f"image 0 has {inputs['counts'][1]} soft tokens" in message
    rgba = np.zeros((3, 280, 4 * PATCH * PATCH), np.float32)
    message = _error(model, tokens, pixel_values=dict(images, pixel_values=rgba))
    assert "[num_images, max_patches, 48]" in message and "4 channel(s)" in message
    message = _error(model, tokens, pixel_values=np.zeros((3, 3, 32, 32), np.float32))
    assert "whole images" in message and "patchified" in message
    message = _error(model, tokens, pixel_values=pixels)  # positions left out
    assert "need their image_position_ids" in message
    message = _error(model, tokens, pixel_values=dict(images, image_position_ids=positions[:, :8]))
    assert "image_position_ids has shape (3, 8, 2)" in message
    video = tokens.copy()
    video[1, -1] = VIDEO
    message = _error(model, video, pixel_values=images)
    assert "video placeholders" in message and "not implemented" in message
    message = _error(model, tokens, pixel_values=images, token_type_ids=inputs["types"] * 3)
    assert "audio placeholders" in message


def test_load_errors(checkpoint, tmp_path):
    text_dir = tmp_path / "text"
    ref.gemma4_text(text_dir)
    with pytest.raises(CheckpointError, match="text-only Gemma 4 checkpoint.*no vision tower"):
        gl.load(text_dir, vision=True)
    other = tmp_path / "gemma3n"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gemma3n_text"}))
    save_file({"x": np.zeros(1, np.float32)}, other / "model.safetensors")
    with pytest.raises(CheckpointError, match="text-only Gemma 3n checkpoint.*no vision tower"):
        gl.load(other, vision=True)


def test_built_model_counts_its_tower():
    """A config with a tower counts what its tree holds, less the buffers (the clipping
    bounds and standardisation vectors, which random models start at values that change
    nothing: infinite bounds, zero bias, unit scale)."""
    tower = gemma4.Gemma4ImageEncoderConfig(gemma4.Gemma4VisionConfig(**VISION), 64)
    config = gl.Gemma4Config.from_hf(TEXT).replace(vision=tower, image_token_id=IMAGE)
    tree = config.build(ShapeOnly())
    values = pz.select(tree).at_instances_of(pz.ParameterValue).get_sequence()
    sizes = {v.label: int(np.prod(v.value.data_array.shape)) for v in values}  # tied: once
    counted = {label for label in sizes if config.counts_as_parameter(label)}
    assert sum(sizes[label] for label in counted) == config.num_params()
    buffers = {label for label in set(sizes) - counted if label.startswith("vision.")}
    assert len(buffers) == 2 * 7 * 4 + 2 and "vision.std_bias" in buffers  # 7 clipped
    assert "vision.blocks.1.mlp.down_proj.output_max" in buffers
    source = RandomInit()
    for label, init, value in [("b.input_min", "-inf", -np.inf), ("b.output_max", "inf", np.inf)]:
        bound = source(ParamRequest(label, {}, {}, init, "raw")).value
        assert bound.data_array.shape == () and float(bound.data_array) == value
    assert "vision.hook_standardized" in gl.Model(tree, config).hook_names
    with pytest.raises(ValueError, match="must match"):
        dataclasses.replace(config, hidden_size=48)
    assert config.replace(hidden_size=48).vision.text_hidden_size == 48


@pytest.mark.parametrize(
    "text, tower_count",
    [("gemma4_e2b", 167_364_608), ("gemma4_31b", 569_548_080)],
)
def test_vision_presets_count_as_transformers(text, tower_count):
    """The released towers (ARCHITECTURES.md), against transformers' Gemma4VisionModel
    built on the meta device (shapes only)."""
    config = gemma4_with_vision(text)
    tower = config.vision.vision
    hf_config = transformers.Gemma4VisionConfig(
        **{
            f.name: getattr(tower, f.name)
            for f in dataclasses.fields(tower)
            if f.name != "rope_theta"
        }
    )
    with torch.device("meta"):
        hf = transformers.Gemma4VisionModel(hf_config)
    assert sum(p.numel() for p in hf.parameters()) == tower_count
    embedder = tower.hidden_size * config.hidden_size
    assert config.num_params() == gl.preset(text).num_params() + tower_count + embedder


def test_image_attention_viewer_reads_each_images_own_grid(cached, inputs):
    """Gemma 4's images have grids of their own shape: the viewer takes each from the
    processor's patch positions, for the text's attention and for the tower's."""
    from gemmalens.vision.merge import image_runs
    from gemmalens.widgets import ImageAttentionViewer
    from gemmalens.widgets.image_attention import gemma4_pictures

    _, cache = cached
    images = dict(pixel_values=inputs["pixels"], image_position_ids=inputs["positions"])
    pictures, patch_grids = gemma4_pictures(images)
    for picture, (rows, cols), places in zip(pictures, patch_grids, inputs["positions"]):
        real = (places >= 0).all(-1)
        assert rows * cols == real.sum() and picture.shape == (rows * PATCH, cols * PATCH, 3)
    text = ImageAttentionViewer(cache, inputs["tokens"], images, layer=1, head=0)
    pattern = np.asarray(cache["blocks.1.attn.hook_pattern"])[0, 0]
    for image, (row, start, stop) in enumerate(image_runs(inputs["tokens"], IMAGE)):
        if row:
            continue
        text.image = image
        rows, cols = patch_grids[image]
        assert (text.rows * KERNEL, text.cols * KERNEL) == (rows, cols)
        assert text.rows * text.cols == stop - start == inputs["counts"][image]
        np.testing.assert_allclose(text.heat, pattern[:, start:stop], rtol=1e-6, atol=1e-7)
    vision = ImageAttentionViewer(cache, inputs["tokens"], images, source="vision", image=1)
    rows, cols = patch_grids[1]
    assert (vision.rows, vision.cols) == (rows, cols)
    tower = np.asarray(cache["vision.blocks.0.attn.hook_pattern"])[1].mean(axis=0)
    np.testing.assert_allclose(vision.heat, tower[0, : rows * cols], rtol=1e-6, atol=1e-7)
    vision.image, vision.patch = 0, rows * cols + 5  # a patch only the larger grid has
    assert vision.query_patch == min(rows * cols + 5, np.prod(patch_grids[0]) - 1)


def test_patching_between_two_images(model, inputs):
    """Same tokens and patch places, other pixels: a sweep site equals one hooked run
    (Gemma 4's per-layer inputs and vision blocks go through the general program)."""
    from gemmalens import patching

    def metric(logits):
        return logits[:, -1, 7].mean()

    clean = dict(pixel_values=inputs["pixels"], image_position_ids=inputs["positions"])
    corrupted = dict(clean, pixel_values=np.ascontiguousarray(inputs["pixels"][..., ::-1]))
    tokens = inputs["tokens"]
    scores = np.asarray(
        patching.sweep(
            model, tokens, tokens, metric, pixel_values=clean, corrupted_pixel_values=corrupted
        )
    )
    name = "blocks.1.hook_resid_pre"
    _, cache = model.run_with_cache(tokens, names=[name], pixel_values=clean)
    value = np.asarray(cache[name])
    position = int(np.flatnonzero(tokens[0] == IMAGE)[-1]) + 1  # just after row 0's last image

    def patch(x, _):
        return x.at[:, position].set(value[:, position])

    hooked = model.run_with_hooks(tokens, {name: patch}, pixel_values=corrupted)
    np.testing.assert_allclose(scores[1, position], float(metric(hooked)), rtol=1e-4, atol=1e-5)
    baseline = float(metric(model(tokens, pixel_values=corrupted)))
    np.testing.assert_allclose(scores[:, 0], baseline, rtol=1e-5, atol=1e-6)  # <bos>


def test_float32_activations_reach_the_tower(model, inputs):
    images = preprocess_gemma4(
        _images(), patch_size=PATCH, max_soft_tokens=SOFT_TOKENS, pooling_kernel_size=KERNEL
    )
    check_float32_activations_with_towers(model, inputs["tokens"], pixel_values=images)
