"""T5Gemma 2 with images, end to end, against transformers' ``T5Gemma2ForConditionalGeneration``
(eager, float32): a tiny perturbed checkpoint with a tiny SigLIP tower saved by
``save_pretrained``, loaded with ``gl.load(path, vision=True)``, run on two encoder rows with
three images in all (one row right-padded) and two decoder rows."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import transformers

import gemmalens as gl
from gemmalens.checkpoints import CheckpointError
from gemmalens.encdec import EncoderOutput
from gemmalens.vision import expand_gemma3_image_ids
from gemmalens.vision.merge import image_runs
from tests import hf_reference as ref
from tests.test_activation_dtype import check_float32_activations_with_towers

TOLERANCE = 1e-4  # relative to the logit scale
EOI = ref.T5GEMMA2_EOI  # 500
BOI, IMAGE = EOI - 1, EOI + 1
TOKENS_PER_IMAGE = ref.TINY_SIGLIP_TOKENS_PER_IMAGE
VISION = ref.TINY_SIGLIP


def _expand(ids: list[int], images: int) -> list[int]:
    return expand_gemma3_image_ids(ids, images, BOI, EOI, IMAGE, TOKENS_PER_IMAGE)


# Row 0: two images; row 1: one image, then text, then right padding (mask 0, pad id 0).
_ROW0 = _expand([2, 10, 11, BOI, 12, 13, BOI, 14, 15, 16, 17, 18], 2)
_ROW1 = _expand([2, 20, 21, 22, 23, BOI, 30, 31, 32], 1)
TOKENS = np.zeros((2, len(_ROW0)), np.int64)
TOKENS[0], TOKENS[1, : len(_ROW1)] = _ROW0, _ROW1
MASK = (np.arange(TOKENS.shape[1])[None] < np.array([[len(_ROW0)], [len(_ROW1)]])).astype(np.int64)
DECODER_TOKENS = np.array([[2, 40, 41, 42, 43, 44], [2, 50, 51, EOI, 52, 53]])
PIXELS = np.random.RandomState(0).uniform(-1, 1, (3, 3, 32, 32)).astype(np.float32)
REAL = MASK.astype(bool)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A perturbed tiny T5Gemma2ForConditionalGeneration (norms, biases, the projector and
    the eoi row moved off their initial values), saved by transformers."""
    directory = tmp_path_factory.mktemp("t5gemma2_mm")
    torch.manual_seed(0)
    shared = ref.TINY_T5GEMMA2_TEXT
    config = transformers.T5Gemma2Config(
        encoder=dict(
            text_config={**shared, **ref.TINY_T5GEMMA2_ENCODER},
            vision_config=VISION,  # vision_use_head defaults to True: its tensors are skipped
            mm_tokens_per_image=TOKENS_PER_IMAGE,
            boi_token_index=BOI,
            eoi_token_index=EOI,
        ),
        decoder={**shared, **ref.TINY_T5GEMMA2_DECODER},
        image_token_index=IMAGE,
    )
    config._attn_implementation = "eager"
    for sub in (config.encoder, config.encoder.text_config, config.encoder.vision_config):
        sub._attn_implementation = "eager"
    config.decoder._attn_implementation = "eager"
    model = transformers.T5Gemma2ForConditionalGeneration(config).eval()
    ref.perturb_(model, seed=0)
    model.save_pretrained(directory)
    return directory, model


@pytest.fixture(scope="module")
def expected(checkpoint):
    _, hf = checkpoint
    with torch.no_grad():
        return hf(
            input_ids=torch.as_tensor(TOKENS),
            attention_mask=torch.as_tensor(MASK),
            pixel_values=torch.as_tensor(PIXELS),
            decoder_input_ids=torch.as_tensor(DECODER_TOKENS),
            output_hidden_states=True,
        )


@pytest.fixture(scope="module")
def model(checkpoint):
    return gl.load(checkpoint[0], vision=True)


@pytest.fixture(scope="module")
def cached(model):
    return model.run_with_cache(
        TOKENS, attention_mask=MASK, decoder_tokens=DECODER_TOKENS, pixel_values=PIXELS
    )


def _relative(actual, expected) -> float:
    return float(np.abs(np.asarray(actual) - expected).max() / np.abs(expected).max())


def test_prompt_layout():
    assert image_runs(TOKENS, IMAGE) == [(0, 4, 8), (0, 12, 16), (1, 6, 10)]
    assert TOKENS[0, 8] == EOI and TOKENS[1, 10] == EOI  # the learned, unscaled row


def test_logits_match_transformers(model, expected, cached):
    reference = expected.logits.numpy()
    fused = _relative(model(TOKENS, DECODER_TOKENS, MASK, pixel_values=PIXELS), reference)
    explicit = _relative(cached[0], reference)  # patterns captured: the explicit path
    print(
        f"\nlogits vs transformers: max |diff| / max |logit| = {fused:.1e} (fused), "
        f"{explicit:.1e} (explicit); logit scale {np.abs(reference).max():.2f}"
    )
    assert fused <= TOLERANCE and explicit <= TOLERANCE
    # m.encode with images, then decode: the same logits.
    encoded = model.encode(TOKENS, MASK, pixel_values=PIXELS)
    assert isinstance(encoded, EncoderOutput)
    reused = model(decoder_tokens=DECODER_TOKENS, encoder_output=encoded)
    assert _relative(reused, reference) <= TOLERANCE


def test_encoder_residuals_match_hidden_states(cached, expected, model):
    _, cache = cached
    hidden = [h.numpy() for h in expected.encoder_hidden_states]
    layers = model.config.encoder.num_hidden_layers
    assert len(hidden) == layers + 1
    # hidden_states[0] is the merged embedding: soft tokens at image positions.
    pairs = [("encoder.hook_embed", hidden[0])]
    pairs += [(f"encoder.blocks.{i}.hook_resid_post", hidden[i + 1]) for i in range(layers - 1)]
    # transformers' last hidden state is after the final norm.
    assert np.array_equal(hidden[layers], expected.encoder_last_hidden_state.numpy())
    pairs.append(("encoder.ln_final.hook_normalized", hidden[layers]))
    diffs = {name: _relative(np.asarray(cache[name])[REAL], value[REAL]) for name, value in pairs}
    print(
        "\nencoder residual stream vs transformers (relative):",
        {k: f"{v:.1e}" for k, v in diffs.items()},
    )
    assert max(diffs.values()) <= TOLERANCE
    # The soft tokens land at the image positions, unchanged, and nowhere else.
    placed = np.asarray(cache["encoder.hook_image_embed"])
    is_image = TOKENS == IMAGE
    assert np.array_equal(placed[~is_image], np.zeros_like(placed[~is_image]))
    soft = np.asarray(cache["encoder.vision.hook_projected"])
    assert _relative(placed[is_image], soft.reshape(-1, soft.shape[-1])) <= 1e-7
    assert np.array_equal(np.asarray(cache["encoder.hook_embed"])[is_image], placed[is_image])


def test_soft_tokens_match_transformers(checkpoint, cached):
    _, hf = checkpoint
    _, cache = cached
    with torch.no_grad():
        soft = hf.get_image_features(torch.as_tensor(PIXELS)).pooler_output.numpy()
    assert _relative(cache["encoder.vision.hook_projected"], soft) <= TOLERANCE


def test_vision_hooks_listed_and_cached(model, cached):
    _, cache = cached
    names = model.hook_names
    vision = [n for n in names if n.startswith("encoder.vision.")]
    assert vision[0] == "encoder.vision.hook_patch_embed"
    assert vision[-1] == "encoder.vision.hook_projected"
    assert "encoder.vision.blocks.1.attn.hook_pattern" in names
    assert not any(n.startswith(("vision.", "decoder.vision.")) for n in names)
    # Forward order: the tower, its tokens in the encoder stream, the merged embedding.
    order = [
        names.index(n)
        for n in ("encoder.vision.hook_projected", "encoder.hook_image_embed", "encoder.hook_embed")
    ]
    assert order == sorted(order) and order[-1] < names.index("encoder.blocks.0.hook_resid_pre")
    assert all(name in cache for name in names)
    assert cache["encoder.vision.blocks.0.attn.hook_pattern"].shape == (3, 4, 16, 16)
    assert cache["encoder.vision.hook_projected"].shape == (3, TOKENS_PER_IMAGE, 64)
    assert cache["encoder.hook_image_embed"].shape == (2, TOKENS.shape[1], 64)
    # A call without images runs no tower: its hooks are left out of the cache.
    _, text_cache = model.run_with_cache(TOKENS[:, :3], decoder_tokens=DECODER_TOKENS)
    assert "encoder.vision.hook_projected" not in text_cache
    assert "encoder.hook_embed" in text_cache
    assert "vision tower" in repr(model)


def test_ablating_the_image_tokens(model, checkpoint):
    _, hf = checkpoint
    args = dict(attention_mask=MASK, decoder_tokens=DECODER_TOKENS, pixel_values=PIXELS)
    clean = np.asarray(model(TOKENS, DECODER_TOKENS, MASK, pixel_values=PIXELS))
    zero = lambda value, name: value * 0  # noqa: E731
    projected = np.asarray(
        model.run_with_hooks(TOKENS, {"encoder.vision.hook_projected": zero}, **args)
    )
    placed = np.asarray(model.run_with_hooks(TOKENS, {"encoder.hook_image_embed": zero}, **args))
    # transformers with zero embeddings at the image positions.
    with torch.no_grad():
        ids = torch.as_tensor(TOKENS)
        embeds = hf.get_input_embeddings()(ids)
        embeds[ids == IMAGE] = 0
        reference = hf(
            inputs_embeds=embeds,
            attention_mask=torch.as_tensor(MASK),
            decoder_input_ids=torch.as_tensor(DECODER_TOKENS),
        ).logits.numpy()
    assert _relative(projected, reference) <= TOLERANCE
    assert np.array_equal(projected, placed)
    assert _relative(projected, clean) > 0.01
    # Identity hooks change nothing.
    same = model.run_with_hooks(
        TOKENS, {"encoder.vision.blocks.*.hook_resid_post": lambda v, n: None}, **args
    )
    assert _relative(same, clean) <= 1e-6


@pytest.fixture(scope="module")
def text_model(checkpoint):
    return gl.load(checkpoint[0])


def test_text_only_loading_is_unchanged(checkpoint, model, text_model, expected):
    directory, hf = checkpoint
    assert text_model.config.vision is None
    assert not any(".vision." in n or "image_embed" in n for n in text_model.hook_names)
    tokens = np.random.RandomState(1).randint(3, 490, (2, 10))
    reference = ref.seq2seq_logits(hf, tokens, DECODER_TOKENS)
    assert _relative(text_model(tokens, DECODER_TOKENS), reference) <= TOLERANCE
    # With its tower, a text-only prompt gives the same logits.
    assert _relative(model(tokens, DECODER_TOKENS), reference) <= TOLERANCE
    # Generation reads no images: the tower is left out of its program.
    greedy = model.generate(tokens, max_new_tokens=1, stop_at_eos=False)
    first = ref.seq2seq_logits(hf, tokens, np.full((2, 1), 2))[:, -1].argmax(-1)
    assert np.array_equal(np.asarray(greedy.tokens)[:, 0], first)
    with pytest.raises(NotImplementedError, match="generation with images"):
        model.generate(TOKENS, attention_mask=MASK, max_new_tokens=1)
    with pytest.raises(ValueError, match=r"T5Gemma 2 model has no vision tower.*vision=True"):
        text_model(TOKENS, DECODER_TOKENS, MASK, pixel_values=PIXELS)
    # The image checks can fail: the image placeholders' own (scaled) table rows instead of
    # the soft tokens give logits far from transformers' with images.
    plain = text_model(TOKENS, DECODER_TOKENS, MASK)
    assert _relative(plain, expected.logits.numpy()) > 0.05


def _error(model, tokens=TOKENS, **kwargs) -> str:
    with pytest.raises((ValueError, TypeError)) as error:
        model(tokens, DECODER_TOKENS, MASK, **kwargs)
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
    message = _error(model, pixel_values=PIXELS[:, :, :16])
    assert "[num_images, 3, 32, 32]" in message and "(3, 3, 16, 32)" in message
    message = _error(model, pixel_values=PIXELS, token_type_ids=MASK[:, :5])
    assert "token_type_ids has shape" in message
    with pytest.raises(TypeError, match="m.encode"):
        model(decoder_tokens=DECODER_TOKENS, encoder_output=model.encode(TOKENS[:, :3]),
              pixel_values=PIXELS)  # fmt: skip
    with pytest.raises(TypeError, match="pixel_values and token_type_ids"):
        model.run_with_cache(TOKENS, decoder_tokens=DECODER_TOKENS, images=PIXELS)


def test_load_errors(checkpoint, tmp_path):
    directory, _ = checkpoint
    config = json.loads((directory / "config.json").read_text())
    del config["encoder"]["vision_config"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(directory / "model.safetensors")
    with pytest.raises(CheckpointError, match="no encoder.vision_config"):
        gl.load(tmp_path, vision=True)


def test_counts_its_tower(checkpoint, model, text_model):
    """num_params() counts the tower: equal to transformers' model less SigLIP's unused
    attention-pooling head (the tied embedding and lm_head once)."""
    _, hf = checkpoint
    counted = {id(p): p.numel() for n, p in hf.named_parameters() if ".head." not in n}
    assert model.config.num_params() == sum(counted.values())
    assert model.config.num_params() - text_model.config.num_params() == sum(
        math.prod(p.shape)
        for n, p in hf.named_parameters()
        if (".vision_tower." in n and ".head." not in n) or ".multi_modal_projector." in n
    )


def test_patching_between_two_images(model):
    """The encoder's images swapped between the runs: each encoder site of the sweep
    equals one hooked run."""
    from gemmalens import patching

    def metric(logits):
        return logits[:, -1, 7].mean()

    corrupted = PIXELS[::-1].copy()
    kwargs = dict(decoder_tokens=DECODER_TOKENS, pixel_values=PIXELS)
    scores = np.asarray(
        patching.sweep(
            model, TOKENS, TOKENS, metric, site="encoder.resid_post",
            corrupted_pixel_values=corrupted, **kwargs,
        )
    )  # fmt: skip
    name = "encoder.blocks.0.hook_resid_post"
    _, cache = model.run_with_cache(TOKENS, names=[name], **kwargs)
    clean = np.asarray(cache[name])
    position = int(np.flatnonzero(TOKENS[0] == IMAGE)[0])

    def patch(value, _):
        return value.at[:, position].set(clean[:, position])

    hooked = model.run_with_hooks(
        TOKENS, {name: patch}, decoder_tokens=DECODER_TOKENS, pixel_values=corrupted
    )
    np.testing.assert_allclose(scores[0, position], float(metric(hooked)), rtol=1e-4, atol=1e-5)
    baseline = float(metric(model(TOKENS, decoder_tokens=DECODER_TOKENS, pixel_values=corrupted)))
    assert abs(scores[0, position] - baseline) > 1e-6


def test_image_attention_viewer_reads_the_cross_part(cached):
    """T5Gemma 2's images are in the encoder: the viewer shows the decoder's cross part
    over each image's soft tokens, and the encoder tower's own attention."""
    from gemmalens.widgets import ImageAttentionViewer

    _, cache = cached
    viewer = ImageAttentionViewer(
        cache, TOKENS, PIXELS, decoder_tokens=DECODER_TOKENS, layer=1, head=2
    )
    cross = np.asarray(cache["decoder.blocks.1.attn.hook_cross_pattern"])[0, 2]
    start = int(np.flatnonzero(TOKENS[0] == IMAGE)[0])
    np.testing.assert_allclose(
        viewer.heat, cross[:, start : start + TOKENS_PER_IMAGE], rtol=1e-6, atol=1e-7
    )
    assert len(viewer.tokens) == DECODER_TOKENS.shape[1]
    vision = ImageAttentionViewer(cache, TOKENS, PIXELS, source="vision", patch=3)
    tower = np.asarray(cache["encoder.vision.blocks.0.attn.hook_pattern"])[0].mean(axis=0)
    np.testing.assert_allclose(vision.heat, tower[3], rtol=1e-6, atol=1e-7)


def test_float32_activations_reach_the_tower(model):
    check_float32_activations_with_towers(
        model, TOKENS, attention_mask=MASK, decoder_tokens=DECODER_TOKENS, pixel_values=PIXELS
    )
