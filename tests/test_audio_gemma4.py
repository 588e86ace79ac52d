"""Gemma 4 with audio, end to end, against transformers' ``Gemma4ForConditionalGeneration``
(eager, float32): a tiny perturbed checkpoint (E2B-like text decoder, a small vision tower
and a two-block conformer) saved by ``save_pretrained``, loaded with
``gl.load(path, audio=True)``.

Three clips of different lengths share one padded batch of 50 frames (13 subsampled
frames: not a multiple of the 4-frame chunks, and two clips with padding); a fourth, short
clip fits in one chunk. Every weight is perturbed, and so are the clipping bounds (finite,
so that they clip); the tower's soft cap, gradient clipping, kernel size and norm eps are
off their defaults, so that a value read from the wrong place shows."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import transformers

import gemmalens as gl
from gemmalens.audio import gemma4
from gemmalens.audio.gemma3n import dense_pattern
from gemmalens.checkpoints import CheckpointError
from gemmalens.presets import gemma4_multimodal, gemma4_with_audio
from tests import hf_reference as ref
from tests.test_activation_dtype import check_float32_activations_with_towers

HIDDEN_TOLERANCE = 1e-5  # tower hidden states and soft tokens, absolute
LOGIT_TOLERANCE = 1e-4  # logits, absolute
IMAGE, VIDEO, AUDIO, BOI, EOI, BOA, EOA = 500, 501, 502, 503, 504, 505, 506
MEL = 16
AUDIO_CONFIG = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    subsampling_conv_channels=[MEL, 8],  # transformers reads MEL mel bins
    conv_kernel_size=3,
    attention_chunk_size=4,
    attention_context_left=5,
    attention_logit_cap=5.0,  # so that the cap bends scores
    gradient_clipping=2.5,  # so that the clamps clip
    output_proj_dims=24,
    rms_norm_eps=1e-5,  # != 1e-6: a dropped eps shows
    use_clipped_linears=True,
)
VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=16,
    patch_size=4,
    pooling_kernel_size=2,
    position_embedding_size=64,
    use_clipped_linears=True,
)
FRAMES = 50
REAL_FRAMES = (50, 30, 11)  # -> 13, 8, 3 soft tokens of real audio


def _run(count: int) -> list[int]:
    return [BOA, *[AUDIO] * count, EOA]


@pytest.fixture(scope="module")
def inputs():
    """Three clips in one batch (two padded) and two prompts of the same length: row 0
    holds clips 0 and 1, row 1 clip 2 then text; and a one-chunk clip alone."""
    rng = np.random.RandomState(0)
    features = rng.normal(size=(3, FRAMES, MEL)).astype(np.float32)
    mask = np.zeros((3, FRAMES), bool)
    for i, n in enumerate(REAL_FRAMES):
        mask[i, :n] = True
    counts = gemma4.soft_token_counts(mask)
    row0 = [2, 10, 11, *_run(counts[0]), 12, *_run(counts[1]), 13]
    row1 = [2, 20, *_run(counts[2])]
    row1 += list(range(30, 30 + len(row0) - len(row1)))
    tokens = np.array([row0, row1])
    short = rng.normal(size=(1, 12, MEL)).astype(np.float32)  # 3 frames: one chunk
    short_tokens = np.array([[2, 40, *_run(3), 41]])
    return dict(
        features=features,
        mask=mask,
        counts=counts,
        tokens=tokens,
        short=short,
        short_tokens=short_tokens,
    )


def _perturb_bounds_(model: torch.nn.Module, seed: int) -> None:
    """Finite clipping bounds (+-1 to 2, so that some values clip)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            width = 1.0 + float(torch.rand((), generator=generator))
            if name.endswith(("input_min", "output_min")):
                buffer.fill_(-width)
            elif name.endswith(("input_max", "output_max")):
                buffer.fill_(width)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gemma4_audio")
    torch.manual_seed(0)
    config = transformers.Gemma4Config(
        text_config=ref.TINY_GEMMA4_E2B,
        vision_config=VISION,
        audio_config=AUDIO_CONFIG,
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        audio_token_id=AUDIO,
        boi_token_id=BOI,
        eoi_token_id=EOI,
        boa_token_id=BOA,
        eoa_token_id=EOA,
    )
    for part in (config, config.text_config, config.vision_config, config.audio_config):
        part._attn_implementation = "eager"
    model = transformers.Gemma4ForConditionalGeneration(config).eval()
    ref._perturb_gemma4_(model, seed=0)
    _perturb_bounds_(model, seed=1)
    model.save_pretrained(directory)
    return directory, model


def _hf_audio(hf, features, mask, tokens) -> dict:
    """transformers' logits, each conformer block's output (forward hooks), the tower's
    output (``last_hidden_state``) and the projected soft tokens."""
    tower = hf.model.audio_tower
    blocks = []
    handles = [
        layer.register_forward_hook(lambda m, a, out: blocks.append(out.numpy()))
        for layer in tower.layers
    ]
    features, mask = torch.as_tensor(features), torch.as_tensor(mask)
    with torch.no_grad():
        out = hf(
            input_ids=torch.as_tensor(tokens), input_features=features, input_features_mask=mask
        )
        encoded = hf.model.get_audio_features(features, mask)
    for handle in handles:
        handle.remove()
    return dict(
        logits=out.logits.numpy(),
        blocks=blocks[: len(tower.layers)],
        encoded=encoded.last_hidden_state.numpy(),
        soft=encoded.pooler_output.numpy(),
        valid=encoded.attention_mask.numpy(),
    )


@pytest.fixture(scope="module")
def expected(checkpoint, inputs):
    hf = checkpoint[1]
    return dict(
        batch=_hf_audio(hf, inputs["features"], inputs["mask"], inputs["tokens"]),
        short=_hf_audio(
            hf, inputs["short"], np.ones(inputs["short"].shape[:2], bool), inputs["short_tokens"]
        ),
    )


@pytest.fixture(scope="module")
def model(checkpoint):
    return gl.load(checkpoint[0], audio=True)


@pytest.fixture(scope="module")
def cached(model, inputs):
    return model.run_with_cache(
        inputs["tokens"],
        input_features=inputs["features"],
        input_features_mask=inputs["mask"],
    )


def _diff(actual, expected) -> float:
    return float(np.abs(np.asarray(actual) - np.asarray(expected)).max())


def test_tower_matches_transformers(cached, expected, inputs):
    _, cache = cached
    reference = expected["batch"]
    assert reference["encoded"].shape[1] == 13 and 13 % AUDIO_CONFIG["attention_chunk_size"]
    for i, block in enumerate(reference["blocks"]):
        assert _diff(cache[f"audio.blocks.{i}.hook_resid_post"], block) <= HIDDEN_TOLERANCE
    # The first block's input is the subsampled features (transformers' hidden_states[0]
    # is block 0's output, so the input is checked through a hook on block 0).
    assert _diff(cache["audio.hook_soft_tokens"], reference["encoded"]) <= HIDDEN_TOLERANCE
    assert _diff(cache["audio.hook_projected"], reference["soft"]) <= HIDDEN_TOLERANCE
    np.testing.assert_array_equal(
        np.asarray(reference["valid"]).sum(1), np.asarray(inputs["counts"])
    )


def test_logits_match_transformers(model, cached, expected, inputs):
    logits, _ = cached
    assert _diff(logits, expected["batch"]["logits"]) <= LOGIT_TOLERANCE
    short = model(
        inputs["short_tokens"],
        input_features=inputs["short"],
        input_features_mask=np.ones(inputs["short"].shape[:2], bool),
    )
    assert _diff(short, expected["short"]["logits"]) <= LOGIT_TOLERANCE
    # The same call with the mask left out (every frame real), and with the feature
    # extractor's mapping, and with mm_token_type_ids (3 = audio), all agree.
    features = dict(input_features=inputs["short"], input_features_mask=np.ones((1, 12), bool))
    assert _diff(model(inputs["short_tokens"], input_features=inputs["short"]), short) == 0
    assert _diff(model(inputs["short_tokens"], input_features=features), short) == 0
    types = (inputs["short_tokens"] == AUDIO) * 3
    assert _diff(model(inputs["short_tokens"], mm_token_type_ids=types, **features), short) == 0


def test_negative_control_swapped_clips(model, expected, inputs):
    """The comparison can fail: clip 2 replaced by other audio of the same length (clip 0's
    first frames) changes row 1's logits far beyond the tolerance, and leaves row 0's."""
    features = inputs["features"].copy()
    features[2, :11] = inputs["features"][0, :11]  # another clip of the same length
    # run_with_cache as the `cached` fixture: the same compiled program.
    logits, _ = model.run_with_cache(
        inputs["tokens"], input_features=features, input_features_mask=inputs["mask"]
    )
    reference = expected["batch"]["logits"]
    assert _diff(logits, reference) > 100 * LOGIT_TOLERANCE
    # Row 0 saw the same audio: unchanged; row 1 changed.
    assert _diff(np.asarray(logits)[0], reference[0]) <= LOGIT_TOLERANCE


def test_cache_matches_transformers_where_they_correspond(
    cached, expected, checkpoint, inputs, model
):
    _, cache = cached
    hf = checkpoint[1]
    tower = hf.model.audio_tower
    captured = {}

    def keep(name, index=None):
        def hook(module, args, out):
            captured[name] = (out if index is None else out[index]).numpy()

        return hook

    handles = [
        tower.subsample_conv_projection.register_forward_hook(keep("subsampled", 0)),
        tower.layers[0].self_attn.register_forward_hook(keep("attn", 1)),
        tower.layers[1].lconv1d.register_forward_hook(keep("lconv")),
    ]
    with torch.no_grad():
        tower(torch.as_tensor(inputs["features"]), torch.as_tensor(inputs["mask"]))
    for handle in handles:
        handle.remove()
    assert _diff(cache["audio.hook_subsampled"], captured["subsampled"]) <= HIDDEN_TOLERANCE
    assert _diff(cache["audio.blocks.1.hook_resid_after_lconv"], captured["lconv"]) <= (
        HIDDEN_TOLERANCE
    )
    # transformers' attention weights, [clip, heads, chunk, chunk_pos, context], for every
    # query frame of the sequence (padded ones too: with no visible key, uniform in both).
    # The last chunk's slots past the sequence (frames 13-15) are dropped by both;
    # transformers masks their whole rows, gemmalens leaves them as a frame there would be.
    pattern = np.asarray(cache["audio.blocks.0.attn.hook_pattern"])
    assert pattern.shape == captured["attn"].shape
    frames = 13
    in_sequence = (np.arange(pattern.shape[2] * 4) < frames).reshape(-1, 4)
    assert _diff(pattern[:, :, in_sequence], captured["attn"][:, :, in_sequence]) <= (
        HIDDEN_TOLERANCE
    )
    # Spread over [query frame, key frame]: each real query's weights sum to 1 over the
    # keys 0 <= q - k < 4 (chunk 4, context_left 5).
    dense = np.asarray(dense_pattern(pattern, model.config.audio.audio, frames))
    assert dense.shape == (3, 4, frames, frames)
    q, k = np.arange(frames)[:, None], np.arange(frames)[None, :]
    assert not dense[0][:, (q - k < 0) | (q - k >= 4)].any()
    np.testing.assert_allclose(dense[0].sum(-1), 1.0, atol=1e-6)
    # Placed soft tokens are the projected tokens of real audio, in order.
    embed = np.asarray(cache["hook_audio_embed"])
    soft, valid = expected["batch"]["soft"], expected["batch"]["valid"]
    assert _diff(embed[inputs["tokens"] == AUDIO], soft[valid]) <= HIDDEN_TOLERANCE
    assert not embed[inputs["tokens"] != AUDIO].any()


def test_hooks_listed_and_intervention_changes_logits(model, cached, inputs):
    names = model.hook_names
    assert names.index("audio.hook_subsampled") < names.index("audio.blocks.0.hook_resid_pre")
    assert names.index("audio.blocks.1.hook_resid_post") < names.index("audio.hook_soft_tokens")
    assert names.index("hook_audio_embed") < names.index("hook_embed")
    assert "audio.blocks.1.attn.hook_pattern" in names
    logits, cache = cached
    assert cache["audio.blocks.0.attn.hook_pattern"].shape == (3, 4, 4, 4, 8)
    call = dict(input_features=inputs["features"], input_features_mask=inputs["mask"])

    def ablate_head(value, name):
        return value.at[:, 1].set(0.0)

    ablated = model.run_with_hooks(
        inputs["tokens"], hooks={"audio.blocks.0.attn.hook_z": ablate_head}, **call
    )
    changed = np.abs(np.asarray(ablated) - np.asarray(logits)).max(axis=-1)
    is_text = inputs["tokens"] != AUDIO
    # Audio changes what comes after it, never the text before the first clip.
    assert changed.max() > 1e-3 and changed[0, :3].max() <= HIDDEN_TOLERANCE
    assert changed[is_text].max() > 1e-3  # the text after the audio reads it


def test_clear_errors(model, inputs, checkpoint):
    tokens, features, mask = inputs["tokens"], inputs["features"], inputs["mask"]
    with pytest.raises(ValueError, match=r"24 audio token\(s\).*no input_features"):
        model(tokens)  # placeholders without audio
    with pytest.raises(ValueError, match="no audio tokens"):
        model(np.array([[2, 10, 11, 12]]), input_features=features, input_features_mask=mask)
    with pytest.raises(ValueError, match=r"2 run\(s\) of audio tokens.*3 clip\(s\)"):
        model(tokens[:1], input_features=features, input_features_mask=mask)
    with pytest.raises(ValueError, match="clip 0 has 8 soft tokens but its run row 0"):
        model(tokens, input_features=features[[1, 0, 2]], input_features_mask=mask[[1, 0, 2]])
    with pytest.raises(ValueError, match=r"input_features_mask has shape \(3, 8\)"):
        model(tokens, input_features=features, input_features_mask=mask[:, :8])
    with pytest.raises(ValueError, match=r"\[num_clips, frames, 16\]"):
        model(tokens, input_features=features[..., :8], input_features_mask=mask)
    with pytest.raises(ValueError, match="mark audio"):
        model(
            tokens,
            input_features=features,
            input_features_mask=mask,
            mm_token_type_ids=0 * tokens + 3,
        )
    with pytest.raises(NotImplementedError, match="generation with audio"):
        model.generate([[2, BOA, AUDIO, EOA]], max_new_tokens=1)
    text_model = gl.load(checkpoint[0])  # without audio=True
    with pytest.raises(ValueError, match=r"no audio tower.*audio=True"):
        text_model(tokens, input_features=features, input_features_mask=mask)
    images = gl.load(checkpoint[0], vision=True)
    with pytest.raises(ValueError, match=r"audio placeholders.*audio=True"):
        images(tokens)


def test_load_errors(tmp_path):
    text_dir = tmp_path / "text"
    ref.gemma4_text(text_dir)
    with pytest.raises(CheckpointError, match="text-only Gemma 4 checkpoint.*no audio tower"):
        gl.load(text_dir, audio=True)


def test_built_model_counts_its_tower(checkpoint):
    config = gl.load(checkpoint[0], audio=True).config
    hf = checkpoint[1]
    audio = sum(p.numel() for p in hf.model.audio_tower.parameters())
    embedder = sum(p.numel() for p in hf.model.embed_audio.parameters())
    assert config.audio.num_params() == audio + embedder
    text = dataclasses.replace(config, audio=None).num_params()
    assert config.num_params() == text + audio + embedder
    with pytest.raises(ValueError, match="must match"):
        dataclasses.replace(config, hidden_size=32)


@pytest.mark.parametrize("text", ["gemma4_e2b", "gemma4_e4b"])
def test_multimodal_presets_count_as_transformers(text):
    """The whole ``Gemma4ForConditionalGeneration`` (text, vision, audio and their
    embedders), built by transformers on the meta device (shapes only)."""
    config = gemma4_multimodal(text)
    hf_text = dict(
        vocab_size=config.vocab_size,
        vocab_size_per_layer_input=config.vocab_size_per_layer_input,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        layer_types=list(config.layer_types),
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        global_head_dim=config.global_head_dim,
        num_kv_shared_layers=config.num_kv_shared_layers,
        use_double_wide_mlp=config.use_double_wide_mlp,
        hidden_size_per_layer_input=config.hidden_size_per_layer_input,
        sliding_window=config.sliding_window,
    )
    hf_config = transformers.Gemma4Config(
        text_config=hf_text,
        vision_config=dict(use_clipped_linears=True),
        audio_config={},
    )
    with torch.device("meta"):
        hf = transformers.Gemma4ForConditionalGeneration(hf_config)
    count = sum(p.numel() for p in hf.parameters())
    assert config.num_params() == count
    audio = sum(p.numel() for p in hf.model.audio_tower.parameters())
    assert audio == 304_824_608  # ARCHITECTURES.md
    with_audio = gemma4_with_audio(text)
    assert with_audio.vision is None
    assert (
        with_audio.num_params() == gl.preset(text).num_params() + audio + 1536 * config.hidden_size
    )
    with pytest.raises(KeyError, match="E2B and E4B"):
        gemma4_with_audio("gemma4_31b")


def test_model_surface_and_config_with_audio(model):
    """A loaded Gemma 4 with audio is the plain `gl.Model` and says it has the tower; a
    smaller audio config counts fewer parameters; bad tower configs are refused."""
    assert type(model) is gl.Model and "audio tower" in repr(model)
    small = dataclasses.replace(
        model.config,
        audio=gemma4.Gemma4AudioEncoderConfig(
            gemma4.Gemma4AudioConfig(**{**AUDIO_CONFIG, "num_hidden_layers": 1}), 64
        ),
    )
    assert small.num_params() < model.config.num_params()
    with pytest.raises(ValueError, match="model_type"):
        gemma4.Gemma4AudioConfig.from_hf({"model_type": "gemma3n_audio"})
    with pytest.raises(ValueError, match="'gelu'"):
        gemma4.Gemma4AudioConfig(hidden_act="gelu")


@pytest.fixture(scope="module")
def both(checkpoint, inputs):
    """One prompt with an image and a clip, the model loaded with both towers, and
    transformers' logits for it."""
    import pathlib

    import PIL.Image
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    picture = pathlib.Path(__file__).resolve().parents[1] / "docs" / "teaching" / "loss_gemma3.png"
    image = PIL.Image.open(picture).crop((0, 0, 384, 384)).convert("RGB")
    processed = Gemma4ImageProcessorPil()(
        [image], return_tensors="np", patch_size=4, max_soft_tokens=70, pooling_kernel_size=2
    )
    count = int(processed["num_soft_tokens_per_image"][0])
    clip = inputs["counts"][2]
    tokens = np.array([[2, 10, BOI, *[IMAGE] * count, EOI, 11, *_run(clip), 12]])
    types = (tokens == IMAGE) * 1 + (tokens == AUDIO) * 3
    features, mask = inputs["features"][2:3], inputs["mask"][2:3]
    with torch.no_grad():
        logits = checkpoint[1](
            input_ids=torch.as_tensor(tokens),
            pixel_values=torch.as_tensor(processed["pixel_values"]),
            image_position_ids=torch.as_tensor(processed["image_position_ids"]),
            input_features=torch.as_tensor(features),
            input_features_mask=torch.as_tensor(mask),
            mm_token_type_ids=torch.as_tensor(types),
        ).logits.numpy()
    call = dict(
        pixel_values=processed["pixel_values"],
        image_position_ids=processed["image_position_ids"],
        input_features=features,
        input_features_mask=mask,
        mm_token_type_ids=types,
    )
    return gl.load(checkpoint[0], vision=True, audio=True), tokens, call, logits


def test_images_and_audio_together_match_transformers(both):
    m, tokens, call, expected = both
    logits = m(tokens, **call)
    assert _diff(logits, expected) <= LOGIT_TOLERANCE
    # Without the clip's sound (its features zeroed) the text after it reads otherwise.
    silent = dict(call, input_features=np.zeros_like(call["input_features"]))
    assert _diff(m(tokens, **silent), expected) > 100 * LOGIT_TOLERANCE


def _metric(logits):
    return logits[:, -1, 7].mean() - logits[:, -1, 9].mean()


def test_patching_between_two_clips(model, inputs):
    """A resid_pre sweep between two clips of the same length equals hooked runs (one
    compiled per layer, the position traced); before the clip nothing differs."""
    import jax
    import jax.numpy as jnp

    from gemmalens import patching

    tokens = inputs["short_tokens"]
    clean = inputs["short"]
    corrupted = np.random.RandomState(5).normal(size=clean.shape).astype(np.float32)
    scores = np.asarray(
        patching.sweep(
            model, tokens, tokens, _metric, input_features=clean, corrupted_input_features=corrupted
        )
    )
    baseline = float(_metric(model(tokens, input_features=corrupted)))
    names = [f"blocks.{i}.hook_resid_pre" for i in range(scores.shape[0])]
    _, cache = model.run_with_cache(tokens, names=names, input_features=clean)
    first_audio = int(np.flatnonzero(tokens[0] == AUDIO)[0])
    for layer in (0, scores.shape[0] - 1):
        value = jnp.asarray(cache[names[layer]])

        @jax.jit
        def patched(position, name=names[layer], value=value):
            def patch(v, _):
                return v.at[:, position].set(value[:, position])

            return _metric(model.run_with_hooks(tokens, {name: patch}, input_features=corrupted))

        for position in (first_audio + 1, tokens.shape[1] - 1):
            np.testing.assert_allclose(
                scores[layer, position], float(patched(position)), rtol=1e-4, atol=1e-5
            )
    np.testing.assert_allclose(scores[:, :first_audio], baseline, rtol=1e-5, atol=1e-6)
    assert np.abs(scores[:, first_audio:] - baseline).max() > 1e-5


def test_audio_viewer_reads_gemma4(model, cached, inputs):
    """The audio viewer on Gemma 4: a text token's attention over each clip's soft tokens
    is the captured pattern at that clip's placeholders (the runs are as long as the real
    soft tokens: no padding), each token 40 ms; the encoder view is the captured chunked
    pattern spread over frames."""
    _, cache = cached
    features = dict(input_features=inputs["features"], input_features_mask=inputs["mask"])
    text = gl.widgets.AudioAttentionViewer(cache, inputs["tokens"], features, layer=1)
    pattern = np.asarray(cache["blocks.1.attn.hook_pattern"])
    for clip, (row, count) in enumerate([(0, inputs["counts"][0]), (0, inputs["counts"][1])]):
        starts = np.flatnonzero(np.diff(np.r_[0, inputs["tokens"][row] == AUDIO]) == 1)
        start = starts[clip]
        np.testing.assert_allclose(
            text.text_attention(clip=clip),
            pattern[row].mean(0)[:, start : start + count],
            atol=1e-6,
        )
        times = text.token_times(clip)
        assert len(times) == count and np.allclose(times[:, 1] - times[:, 0], 0.04)
    encoder = gl.widgets.AudioAttentionViewer(
        cache, inputs["tokens"], features, source="encoder", layer=0
    )
    frames = inputs["counts"][0]
    dense = np.asarray(
        dense_pattern(cache["audio.blocks.0.attn.hook_pattern"], model.config.audio.audio, 13)
    )
    np.testing.assert_allclose(
        encoder.encoder_attention(clip=0), dense[0].mean(0)[:frames, :frames], atol=1e-6
    )


def test_float32_activations_reach_the_tower(model, inputs):
    check_float32_activations_with_towers(
        model,
        inputs["tokens"],
        input_features=inputs["features"],
        input_features_mask=inputs["mask"],
    )
