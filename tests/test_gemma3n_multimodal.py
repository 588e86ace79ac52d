"""Gemma 3n sees (and hears), end to end, against transformers'
``Gemma3nForConditionalGeneration`` (eager, float32, every weight perturbed): a tiny
checkpoint with the real timm MobileNetV5 tower, saved by ``save_pretrained`` and loaded
with ``gl.load(path, vision=True, audio=True)``, run on two prompts that hold an image and
a clip each.

The token layout is the released one in small (as tests/test_gemma3n_audio_model.py):
text ids below 256, hard vision tokens 256..383 (the image placeholder 257 among them),
hard audio tokens 384..511. The tower is made small through timm's model arguments
(``channel_multiplier=0.05``, ``msfa_output_resolution=2``: 64x64 images give 4 soft tokens
each), as in tests/test_vision_mobilenetv5.py, which checks the released architecture's 84
blocks stage by stage. Compiling those 84 blocks takes about 20 s per program on a CPU, so
the runs here use a shorter stack of the same blocks (`SMALL_STAGES`: every kind, one to
three per stage): timm builds it (its ``block_args`` argument) inside transformers' model,
and gemmalens' loader is given the same stages (`_load`, the one thing patched: the
config's ``model_args`` cannot name them). The loader's reading of the released
architecture from ``model_args`` is checked without a run (`test_released_architecture`).

timm is imported through `tests.torchvision_shim`, and transformers' ``TimmWrapperModel``,
which refuses to be built without torchvision, is built with that check lifted
(`_real_timm`): the model it builds is timm's own.
"""

from __future__ import annotations

import contextlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file
from transformers.models.gemma3n.feature_extraction_gemma3n import Gemma3nAudioFeatureExtractor
from transformers.models.timm_wrapper import modeling_timm_wrapper

import gemmalens as gl
from gemmalens import patching
from gemmalens.audio import gemma3n_audio_features
from gemmalens.audio.merge import (
    Gemma3nImageEncoderConfig,
    Gemma3nVisionEmbedderConfig,
    audio_side_inputs,
)
from gemmalens.checkpoints import CheckpointError
from gemmalens.presets import gemma3n_multimodal, gemma3n_with_vision
from gemmalens.vision.mobilenetv5 import MobileNetV5Config
from tests import hf_reference as ref
from tests.test_activation_dtype import check_float32_activations_with_towers

try:
    from tests.torchvision_shim import import_timm

    timm = import_timm()
except ImportError:  # pragma: no cover
    pytest.skip(
        "timm is not installed (the test command installs it: pip install --no-deps timm==1.0.31)",
        allow_module_level=True,
    )

LOGIT_TOLERANCE = 1e-4  # logits, absolute
HIDDEN_TOLERANCE = 1e-5  # the placed soft tokens and the merged embedding, absolute
N = 6  # audio_soft_tokens_per_image
PER_IMAGE = 4  # msfa_output_resolution**2
BOS, BOI, EOI, BOA = 2, 254, 256, 255
IMAGE, VISION_ID, EOA, AUDIO, AUDIO_HARD = 257, 300, 384, 385, 450
MODEL_ARGS = {"channel_multiplier": 0.05, "msfa_output_resolution": 2}
TEXT = {**ref.TINY_GEMMA3N_TWO_LAYERS, "activation_sparsity_pattern": [0.95, 0.0]}
AUDIO_CONFIG = {**ref.TINY_GEMMA3N_AUDIO, "rms_norm_eps": 1e-5}
VISION_CONFIG = dict(model_args=MODEL_ARGS, vocab_size=128, vocab_offset=256, rms_norm_eps=1e-5)
# The released stages' blocks in timm's notation (channels before the multiplier), fewer.
SMALL_STAGES = (
    ("er_r1_k3_s2_e4_c128",),
    ("uir_r1_a3_k5_s2_e6_c256",),
    ("uir_r1_a5_k5_s2_e6_c640", "mqa_r1_k3_h12_v2_s1_d64_c640", "uir_r1_a0_k0_s1_e2_c640"),
    ("uir_r1_a5_k5_s2_e6_c1280", "mqa_r1_k3_h16_s1_d96_c1280", "uir_r1_a0_k0_s1_e2_c1280"),
)
SMALL_TOWER = MobileNetV5Config(stages=SMALL_STAGES, **MODEL_ARGS)


@contextlib.contextmanager
def _real_timm():
    """transformers' ``TimmWrapperModel`` built with the shim's timm: its backend check
    (which asks for torchvision) lifted, its module-level ``timm`` name set, for the
    duration of the construction only."""
    check = modeling_timm_wrapper.requires_backends
    had_timm = hasattr(modeling_timm_wrapper, "timm")
    modeling_timm_wrapper.requires_backends = lambda *args, **kwargs: None
    modeling_timm_wrapper.timm = timm
    try:
        yield
    finally:
        modeling_timm_wrapper.requires_backends = check
        if not had_timm:
            del modeling_timm_wrapper.timm


def _hf_config() -> transformers.Gemma3nConfig:
    config = transformers.Gemma3nConfig(
        text_config=TEXT,
        audio_config=AUDIO_CONFIG,
        vision_config=VISION_CONFIG,
        audio_soft_tokens_per_image=N,
        vision_soft_tokens_per_image=PER_IMAGE,
        audio_token_id=AUDIO,
        boa_token_id=BOA,
        eoa_token_id=EOA,
        image_token_id=IMAGE,
        boi_token_id=BOI,
        eoi_token_id=EOI,
    )
    for part in (config, config.text_config, config.audio_config):
        part._attn_implementation = "eager"
    return config


def _tokens() -> np.ndarray:
    """Row 0: an image, then a clip and a hard vision id; row 1: a clip, then an image and
    a hard audio id."""
    image, clip = [BOI, *[IMAGE] * PER_IMAGE, EOI], [BOA, *[AUDIO] * N, EOA]
    row0 = [BOS, 10, *image, 11, *clip, VISION_ID, 12]
    row1 = [BOS, *clip, 20, *image, AUDIO_HARD, 21]
    row1 += list(range(30, 30 + len(row0) - len(row1)))
    return np.array([row0, row1])


def _pixels(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (2, 3, 64, 64)).astype(np.float32)


def _waveforms() -> list[np.ndarray]:
    """A chirp (0.5 s: 5 soft tokens of audio) and a shorter tone (3)."""
    t = np.arange(8_000) / 16_000
    chirp = 0.4 * np.sin(2 * np.pi * (300 * t + 2000 * t**2))
    tone = 0.3 * np.sin(2 * np.pi * 440 * t[:5_000])
    return [chirp.astype(np.float32), tone.astype(np.float32)]


def _checkpoint(directory, small: bool):
    torch.manual_seed(0)
    with _real_timm():
        model = transformers.Gemma3nForConditionalGeneration(_hf_config())
    if small:
        from timm.models._efficientnet_builder import decode_arch_def

        stages = decode_arch_def([list(stage) for stage in SMALL_STAGES])
        tower = timm.create_model(
            "mobilenetv5_300m_enc", num_classes=0, block_args=stages, **MODEL_ARGS
        )
        model.model.vision_tower.timm_model = tower
    model.eval()
    ref.perturb_(model, seed=0)  # every weight: the tower's norms and layer scales too
    model.save_pretrained(directory)
    return directory, model


def _load(directory, **towers):
    """``gl.load`` of the small-tower checkpoint: its stages are `SMALL_STAGES`."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MobileNetV5Config, "from_hf", classmethod(lambda cls, hf: SMALL_TOWER))
        return gl.load(directory, **towers)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("gemma3n_multimodal"), small=True)


@pytest.fixture(scope="module")
def features():
    waves = _waveforms()
    return Gemma3nAudioFeatureExtractor()(waves, return_tensors="np"), gemma3n_audio_features(waves)


@pytest.fixture(scope="module")
def expected(checkpoint, features):
    """transformers' run with images and audio, its image soft tokens, and the run with the
    image positions of the merged embedding zeroed (what zeroing vision.hook_soft_tokens
    gives)."""
    _, hf = checkpoint
    theirs, _ = features
    ids = torch.as_tensor(_tokens())
    with torch.no_grad():
        out = hf(
            input_ids=ids,
            pixel_values=torch.as_tensor(_pixels()),
            input_features=torch.as_tensor(theirs["input_features"]),
            input_features_mask=torch.as_tensor(theirs["input_features_mask"]),
            output_hidden_states=True,
        )
        soft = hf.model.get_image_features(torch.as_tensor(_pixels())).pooler_output.numpy()
        embeds = out.hidden_states[0][0].clone()
        embeds[torch.as_tensor(_tokens() == IMAGE)] = 0
        per_layer = hf.model.language_model.get_per_layer_inputs(ids)
        zeroed = hf(inputs_embeds=embeds, per_layer_inputs=per_layer).logits.numpy()
        swapped = hf(
            input_ids=ids,
            pixel_values=torch.as_tensor(_pixels()[::-1].copy()),
            input_features=torch.as_tensor(theirs["input_features"]),
            input_features_mask=torch.as_tensor(theirs["input_features_mask"]),
        ).logits.numpy()
    return dict(out=out, soft=soft, zeroed=zeroed, swapped=swapped)


@pytest.fixture(scope="module")
def model(checkpoint):
    return _load(checkpoint[0], vision=True, audio=True)


NAMES = [
    "vision.stages.3.blocks.1.attn.hook_pattern",
    "vision.hook_fused",
    "vision.hook_soft_tokens",
    "hook_image_embed",
    "hook_audio_embed",
    "hook_embed",
]


@pytest.fixture(scope="module")
def cached(model, features):
    _, ours = features
    return model.run_with_cache(_tokens(), names=NAMES, pixel_values=_pixels(), input_features=ours)


def _diff(actual, expected) -> float:
    return float(np.abs(np.asarray(actual) - np.asarray(expected)).max())


def test_logits_and_soft_tokens_match_transformers(model, cached, expected, features):
    logits, cache = cached
    out, tokens = expected["out"], _tokens()
    reference = out.logits.numpy()
    logit_diff = _diff(logits, reference)
    is_image = tokens == IMAGE
    placed = np.asarray(cache["hook_image_embed"])
    soft = _diff(placed[is_image], expected["soft"].reshape(-1, placed.shape[-1]))
    tower = _diff(cache["vision.hook_soft_tokens"], expected["soft"])
    embed = _diff(cache["hook_embed"], out.hidden_states[0][0].numpy())
    print(
        f"\nlogits vs transformers {logit_diff:.1e} (scale {np.abs(reference).max():.2f}); "
        f"placed image soft tokens {soft:.1e}, vision.hook_soft_tokens {tower:.1e} (scale "
        f"{np.abs(expected['soft']).max():.2f}); merged embedding {embed:.1e}"
    )
    assert logit_diff <= LOGIT_TOLERANCE
    assert max(soft, tower, embed) <= HIDDEN_TOLERANCE
    assert not placed[~is_image].any()
    # The audio soft tokens sit at their own positions, apart from the images'.
    assert not np.asarray(cache["hook_audio_embed"])[is_image].any()
    # Negative control: the two images swapped are far off (transformers agrees on that run).
    swapped, _ = model.run_with_cache(
        tokens, names=NAMES, pixel_values=_pixels()[::-1], input_features=features[1]
    )
    assert _diff(swapped, expected["swapped"]) <= LOGIT_TOLERANCE
    assert _diff(swapped, reference) > 0.1


def test_vision_hooks_capture_and_intervene(model, cached, expected, features):
    _, cache = cached
    names = model.hook_names
    order = [names.index(n) for n in ("vision.hook_fused", "vision.hook_soft_tokens")]
    order += [names.index(n) for n in ("hook_image_embed", "hook_audio_embed", "hook_embed")]
    assert order == sorted(order) and names[0] == "vision.conv_stem.hook_out"
    # 64 px: stage 3's attention is over its 2x2 grid, 16 heads (channels / 20, heads kept).
    pattern = np.asarray(cache["vision.stages.3.blocks.1.attn.hook_pattern"])
    assert pattern.shape == (2, 16, 4, 4)
    np.testing.assert_allclose(pattern.sum(-1), 1.0, atol=1e-5)
    assert cache["vision.hook_fused"].shape == (2, 2048, 2, 2)
    assert cache["vision.hook_soft_tokens"].shape == (2, PER_IMAGE, 64)
    # Zeroing the images' soft tokens is transformers' run with zeros at image positions.
    zero = lambda value, name: value * 0  # noqa: E731
    ablated = model.run_with_hooks(
        _tokens(),
        {"vision.hook_soft_tokens": zero},
        pixel_values=_pixels(),
        input_features=features[1],
    )
    assert _diff(ablated, expected["zeroed"]) <= LOGIT_TOLERANCE
    assert _diff(ablated, cached[0]) > 1e-2
    # Before the first image token nothing changed (causal attention around images).
    assert _diff(np.asarray(ablated)[:, :1], np.asarray(cached[0])[:, :1]) <= 1e-5


def _error(model, tokens, **kwargs) -> str:
    with pytest.raises((ValueError, TypeError, NotImplementedError)) as error:
        model(tokens, **kwargs)
    return str(error.value)


def test_clear_errors(model, features):
    _, ours = features
    tokens, pixels = _tokens(), _pixels()
    message = _error(model, tokens, input_features=ours)  # placeholders without images
    assert "8 image token(s)" in message and "no pixel_values" in message
    text = np.where(np.isin(tokens, (IMAGE, AUDIO)), 40, tokens)
    message = _error(model, text, pixel_values=pixels)  # images without placeholders
    assert "0 run(s)" in message and "2 image(s)" in message
    message = _error(model, tokens, pixel_values=pixels[:1], input_features=ours)  # count
    assert "2 run(s)" in message and "1 image(s)" in message
    short = tokens.copy()
    short[0, 2 + PER_IMAGE] = 40  # row 0's run ends one token early
    message = _error(model, short, pixel_values=pixels, input_features=ours)
    assert "vision_soft_tokens_per_image = 4" in message and "(3 tokens)" in message
    small = np.zeros((2, 3, 60, 60), np.float32)  # wrong pixel size
    assert "multiple of 32" in _error(model, tokens, pixel_values=small, input_features=ours)
    assert "pixel_values[None]" in _error(model, tokens, pixel_values=pixels[0])
    types = (tokens == IMAGE) * 1 + (tokens == AUDIO) * 3  # the processor's, accepted
    assert audio_side_inputs(model.config, tokens, ours, token_type_ids=types) is not None
    types[0, 0] = 1
    message = _error(model, tokens, pixel_values=pixels, input_features=ours, token_type_ids=types)
    assert "mark images" in message


def test_one_tower_models(checkpoint, expected, features):
    """Loaded with one tower, the model refuses the other modality's inputs and
    placeholders; with the vision tower alone it still embeds the hard audio ids through
    embed_audio, as transformers does (a call without pixels: no tower runs)."""
    directory, hf = checkpoint
    seeing = _load(directory, vision=True)
    assert seeing.config.audio is None and seeing.config.audio_embedder is not None
    assert not any(n.startswith("audio.") for n in seeing.hook_names)
    assert "vision tower" in repr(seeing)
    text = np.where(np.isin(_tokens(), (IMAGE, AUDIO)), 40, _tokens())  # hard ids stay
    _, cache = seeing.run_with_cache(text, names=["hook_embed"])
    with torch.no_grad():
        theirs = hf(input_ids=torch.as_tensor(text), output_hidden_states=True)
    assert _diff(cache["hook_embed"], theirs.hidden_states[0][0].numpy()) <= HIDDEN_TOLERANCE
    message = _error(seeing, _tokens(), pixel_values=_pixels(), input_features=features[1])
    assert "no audio tower" in message
    hearing = _load(directory, audio=True)
    assert hearing.config.vision is None
    message = _error(hearing, _tokens(), input_features=features[1])
    assert "image placeholders" in message and "vision=True" in message
    assert "no vision tower" in _error(hearing, text, pixel_values=_pixels())
    assert "no vision tower" in _error(_load(directory), text, pixel_values=_pixels())


def test_load_errors(tmp_path):
    text_dir = tmp_path / "text"
    ref.gemma3n_text(text_dir)
    with pytest.raises(CheckpointError, match="text-only Gemma 3n checkpoint.*vision=True"):
        gl.load(text_dir, vision=True)
    other = tmp_path / "gemma3"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gemma3_text"}))
    save_file({"x": np.zeros(1, np.float32)}, other / "model.safetensors")
    with pytest.raises(CheckpointError, match="Gemma 3 audio tower"):
        gl.load(other, audio=True)


def test_parameter_counts(checkpoint, model):
    """The loaded model counts what transformers' holds; the E2B / E4B presets with both
    towers count as transformers' ``Gemma3nForConditionalGeneration`` (meta device)."""
    _, hf = checkpoint
    assert model.config.num_params() == sum(p.numel() for p in hf.parameters())
    e4b = transformers.Gemma3nConfig()  # transformers' defaults are E4B's
    e2b_text = dict(num_hidden_layers=30, intermediate_size=8192, num_kv_shared_layers=10)
    e2b = transformers.Gemma3nConfig(text_config=e2b_text)
    counts = {}
    for name, config in (("gemma3n_e2b", e2b), ("gemma3n_e4b", e4b)):
        with _real_timm(), torch.device("meta"):
            full = transformers.Gemma3nForConditionalGeneration(config)
        counts[name] = gemma3n_multimodal(name).num_params()
        print(f"\n{name} with both towers: {counts[name]:,}")
        assert counts[name] == sum(p.numel() for p in full.parameters())
        seeing = gemma3n_with_vision(name).num_params()
        assert counts[name] - seeing == 681_348_640  # the audio tower alone
    assert counts == {"gemma3n_e2b": 5_418_464_192, "gemma3n_e4b": 7_818_517_072}


def test_config_checks():
    config = gemma3n_multimodal("gemma3n_e2b")
    narrower = config.replace(hidden_size=1024)
    assert narrower.vision.embedder.text_hidden_size == 1024
    assert narrower.vision_embedder == narrower.vision.embedder
    text = config.replace(audio=None, vision=None)
    assert text.vision_embedder is None and text.audio_embedder is None
    assert gemma3n_with_vision("gemma3n_e2b").replace(vision=None).audio_embedder is None
    with pytest.raises(ValueError, match="audio_embedder"):
        config.replace(audio=None)
    with pytest.raises(ValueError, match="vision_embedder differs"):
        config.replace(vision_embedder=Gemma3nVisionEmbedderConfig(vocab_size=64))
    with pytest.raises(ValueError, match="vision_soft_tokens_per_image"):
        Gemma3nImageEncoderConfig.from_hf({"vision_soft_tokens_per_image": 16})


def test_released_architecture(tmp_path):
    """The released tower's 84 blocks, read from the config's model_args, load (no run:
    their numbers are tests/test_vision_mobilenetv5.py's) and count as transformers'."""
    directory, hf = _checkpoint(tmp_path, small=False)
    m = gl.load(directory, vision=True, audio=True)
    assert m.config.vision.vision == MobileNetV5Config.from_hf(VISION_CONFIG)
    assert m.config.num_params() == sum(p.numel() for p in hf.parameters())
    assert sum(
        n.endswith("attn.hook_pattern") and n.startswith("vision.") for n in m.hook_names
    ) == (14 + 19)


# ----------------------------------------------------------------------------- patching


def _metric(logits):
    return logits[:, -1, 7].mean() - logits[:, -1, 9].mean()


def test_sweep_between_two_images(model):
    """Same tokens, another image: each score equals patching that one site with
    run_with_hooks, and sites before the image change nothing."""
    m = model
    tokens = np.array([[BOS, 10, BOI, *[IMAGE] * PER_IMAGE, EOI, 11, 12, 13]])
    image, other = _pixels(1)[:1], _pixels(2)[:1]
    scores = np.asarray(
        patching.sweep(m, tokens, tokens, _metric, pixel_values=image, corrupted_pixel_values=other)
    )
    layers, positions = scores.shape
    assert (layers, positions) == (2, tokens.shape[1])
    name = "blocks.1.hook_resid_pre"
    clean_logits, clean_cache = m.run_with_cache(tokens, names=[name], pixel_values=image)
    corrupted_logits, _ = m.run_with_cache(tokens, names=[name], pixel_values=other)
    baseline = float(_metric(corrupted_logits))
    assert abs(float(_metric(clean_logits)) - baseline) > 1e-4
    first = int(np.flatnonzero(tokens[0] == IMAGE)[0])
    clean = jnp.asarray(clean_cache[name])

    @jax.jit  # one compiled hooked run, the position a traced argument
    def patched(position):
        def patch(value, _):
            return value.at[:, position].set(clean[:, position])

        return _metric(m.run_with_hooks(tokens, {name: patch}, pixel_values=other))

    for position in (first + 2, positions - 1):
        np.testing.assert_allclose(
            scores[1, position], float(patched(position)), rtol=1e-4, atol=1e-5
        )
    # Causal around images: before the first image token the runs agree.
    np.testing.assert_allclose(scores[:, :first], baseline, rtol=1e-5, atol=1e-6)
    assert np.abs(scores[:, first:] - baseline).max() > 1e-5


def test_image_viewer_and_attribution_with_images(model):
    """The image viewer reads Gemma 3n's image soft tokens (a 2 x 2 grid each) off the
    captured patterns; attribution patching between two images is (clean - corrupted) .
    d metric / d resid_pre at each site, the gradient taken through run_with_hooks."""
    m = model
    tokens = np.array([[BOS, 10, BOI, *[IMAGE] * PER_IMAGE, EOI, 11, 12, 13]])
    image, other = _pixels(1)[:1], _pixels(2)[:1]
    name = "blocks.1.hook_resid_pre"
    names = ["blocks.*.attn.hook_pattern", name]
    _, cache = m.run_with_cache(tokens, names=names, pixel_values=image)
    viewer = gl.widgets.ImageAttentionViewer(cache, tokens, image)
    assert (viewer.rows, viewer.cols) == (2, 2)
    first = int(np.flatnonzero(tokens[0] == IMAGE)[0])
    pattern = np.asarray(cache["blocks.1.attn.hook_pattern"])[0].mean(0)
    drawn = viewer.image_attention(layer=1)  # [query, rows, cols], mean over heads
    np.testing.assert_allclose(
        drawn.reshape(drawn.shape[0], -1), pattern[:, first : first + PER_IMAGE], atol=1e-7
    )

    attribution = np.asarray(
        patching.attribution_patching(
            m, tokens, tokens, _metric, pixel_values=image, corrupted_pixel_values=other
        )
    )
    clean = cache
    _, corrupted = m.run_with_cache(tokens, names=names, pixel_values=other)
    base = jnp.asarray(corrupted[name])

    def metric_at(delta):
        hooked = m.run_with_hooks(
            tokens, {name: lambda value, _: value + delta}, pixel_values=other
        )
        return _metric(hooked)

    grad = np.asarray(jax.grad(metric_at)(jnp.zeros_like(base)))
    expected = ((np.asarray(clean[name]) - np.asarray(base)) * grad).sum(axis=(0, 2))
    np.testing.assert_allclose(attribution[1], expected, rtol=1e-4, atol=1e-6)
    assert np.all(attribution[:, :first] == 0) and np.abs(attribution[:, first:]).max() > 0


def test_float32_activations_reach_both_towers(model, features):
    _, ours = features
    check_float32_activations_with_towers(
        model, _tokens(), pixel_values=_pixels(), input_features=ours
    )
