"""Gemma 3n hears, end to end, against transformers' ``Gemma3nForConditionalGeneration``
(eager, float32): a tiny perturbed checkpoint saved by ``save_pretrained``, loaded with
``gl.load(path, audio=True)``, run on two prompts holding three clips of different lengths
(synthetic waveforms through the Gemma 3n feature extractor, transformers' and gemmalens'
own).

The token layout is the released one in small: text ids below 256 (the per-layer table's
size), hard vision tokens 256..383, hard audio tokens 384..511 (end of the vocabulary), so
every multimodal id reads per-layer row 0 and the padding of soft tokens is the last id,
511. The prompts hold a hard vision id and hard audio ids besides the placeholders.

transformers builds ``Gemma3nForConditionalGeneration``'s vision tower through timm
(``TimmWrapperModel``), which refuses to be built without torchvision. No image is fed to
either model here (images, with the real timm tower, are tests/test_gemma3n_multimodal.py's),
so the tests stub that one construction: ``AutoModel.from_config`` returns an empty module
for the vision config while the checkpoint is built; everything the audio path and the
text model read (including ``embed_vision``, which embeds the hard vision tokens) is
transformers' own.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file
from transformers.models.gemma3n import modeling_gemma3n as hf_gemma3n
from transformers.models.gemma3n.feature_extraction_gemma3n import Gemma3nAudioFeatureExtractor

import gemmalens as gl
from gemmalens.audio import gemma3n_audio_features
from gemmalens.audio.gemma3n import Gemma3nAudioConfig
from gemmalens.audio.merge import real_soft_tokens
from gemmalens.checkpoints import CheckpointError
from gemmalens.presets import gemma3n_with_audio
from tests import hf_reference as ref

HIDDEN_TOLERANCE = 1e-5  # the merged embedding, absolute
LOGIT_TOLERANCE = 1e-4  # logits, absolute
N = 10  # audio_soft_tokens_per_image: each clip's run of placeholders
BOS, BOA, EOA, AUDIO, IMAGE, VISION_ID, AUDIO_HARD = 2, 255, 384, 385, 257, 300, 450
TEXT = {
    **ref.TINY_GEMMA3N,
    "vocab_size": 512,
    "vocab_size_per_layer_input": 256,
    # Three layers (compiling is most of these tests' time): one sparse, layer 2 reusing
    # layer 0's keys and values.
    "num_hidden_layers": 3,
    "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
    "intermediate_size": [96, 128, 64],
    "activation_sparsity_pattern": [0.95, 0.0, 0.0],
    "num_kv_shared_layers": 1,
}
AUDIO_CONFIG = dict(
    vocab_size=128,
    vocab_offset=384,
    input_feat_size=128,  # the feature extractor's 128 mel bins: 128 -> 64 -> 32
    hidden_size=32,
    rms_norm_eps=1e-5,
    gradient_clipping=2.5,  # small enough that the clamps act
    conf_attention_chunk_size=3,
    conf_attention_context_left=4,
    conf_attention_context_right=1,
    conf_attention_logit_cap=4.0,
    conf_num_attention_heads=4,
    conf_num_hidden_layers=1,  # the tower's own parity is tests/test_audio_gemma3n.py's
    conf_conv_kernel_size=3,
    conf_reduction_factor=4,
    sscp_conv_channel_size=(6, 4),
)
VISION_CONFIG = dict(hidden_size=16, vocab_size=128, vocab_offset=256, rms_norm_eps=1e-5)
SECONDS = (1.0, 0.6, 0.35)  # 97 frames each once batched: 7, 4 and 3 soft tokens of audio


def _waveforms() -> list[np.ndarray]:
    """A chirp, a vowel-like harmonic tone with vibrato, and noise bursts."""
    rng = np.random.default_rng(0)
    out = []
    for i, seconds in enumerate(SECONDS):
        t = np.arange(int(seconds * 16_000)) / 16_000
        if i == 0:
            wave = 0.4 * np.sin(2 * np.pi * (200 * t + 1500 * t**2))
        elif i == 1:
            f0 = 140 * (1 + 0.03 * np.sin(2 * np.pi * 5 * t))
            phase = 2 * np.pi * np.cumsum(f0) / 16_000
            wave = sum(0.3 / k * np.sin(k * phase) for k in range(1, 8))
        else:
            wave = 0.2 * rng.standard_normal(t.size) * (np.sin(2 * np.pi * 8 * t) > 0)
        out.append(wave.astype(np.float32))
    return out


def _clip(count: int = N) -> list[int]:
    return [BOA, *[AUDIO] * count, EOA]


def _tokens() -> np.ndarray:
    """Row 0: clips 0 and 1, then a hard vision id; row 1: clip 2, then a hard audio id."""
    row0 = [BOS, 10, *_clip(), 11, 12, *_clip(), VISION_ID, 13]
    row1 = [BOS, *_clip(), AUDIO_HARD, 20, 21]
    row1 += list(range(30, 30 + len(row0) - len(row1)))
    return np.array([row0, row1])


def _build_hf(config: transformers.Gemma3nConfig, device: str = "cpu") -> torch.nn.Module:
    """``Gemma3nForConditionalGeneration`` with its timm vision tower stubbed (see above)."""
    from_config = hf_gemma3n.AutoModel.from_config

    def without_timm(cfg, **kwargs):
        if isinstance(cfg, transformers.Gemma3nVisionConfig):
            return torch.nn.Module()
        return from_config(cfg, **kwargs)

    hf_gemma3n.AutoModel.from_config = without_timm
    try:
        with torch.device(device):
            return transformers.Gemma3nForConditionalGeneration(config)
    finally:
        hf_gemma3n.AutoModel.from_config = from_config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gemma3n_audio")
    torch.manual_seed(0)
    config = transformers.Gemma3nConfig(
        text_config=TEXT,
        audio_config=AUDIO_CONFIG,
        vision_config=VISION_CONFIG,
        audio_soft_tokens_per_image=N,
        audio_token_id=AUDIO,
        boa_token_id=BOA,
        eoa_token_id=EOA,
        image_token_id=IMAGE,
        boi_token_id=254,
        eoi_token_id=256,
    )
    for part in (config, config.text_config, config.audio_config):
        part._attn_implementation = "eager"
    model = _build_hf(config).eval()
    ref.perturb_(model, seed=0)  # every weight, the norms and AltUp's scales included
    model.save_pretrained(directory)
    return directory, model


@pytest.fixture(scope="module")
def features():
    """transformers' extractor output (the arrays given to transformers) and gemmalens'
    own (`AudioFeatures`), for the three clips batched."""
    waves = _waveforms()
    theirs = Gemma3nAudioFeatureExtractor()(waves, return_tensors="np")
    ours = gemma3n_audio_features(waves)
    return theirs, ours


@pytest.fixture(scope="module")
def expected(checkpoint, features):
    """transformers' outputs: the run with audio, the padding embedding (hard id 511) and a
    run with the real audio positions zeroed (for the hook test)."""
    _, hf = checkpoint
    theirs, _ = features
    ids = torch.as_tensor(_tokens())
    with torch.no_grad():
        out = hf(
            input_ids=ids,
            input_features=torch.as_tensor(theirs["input_features"]),
            input_features_mask=torch.as_tensor(theirs["input_features_mask"]),
            output_hidden_states=True,
        )
        padding = hf.model.embed_audio(input_ids=torch.tensor([[511]]))[0, 0].numpy()
        # Real audio positions zeroed, padding positions unchanged: what zeroing the
        # tower's soft tokens (audio.hook_projected) gives.
        real = _real_positions(_tokens(), theirs["input_features_mask"])
        embeds = out.hidden_states[0][0].clone()
        embeds[torch.as_tensor(real)] = 0
        zeroed = hf(
            inputs_embeds=embeds,
            per_layer_inputs=hf.model.language_model.get_per_layer_inputs(ids),
        ).logits.numpy()
    return dict(out=out, padding=padding, zeroed=zeroed)


def _real_positions(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``[batch, seq]`` bool: the audio positions that hold soft tokens of real audio."""
    real = real_soft_tokens(mask, _tower_config())
    out = np.zeros(tokens.shape, bool)
    clip = 0
    for row in range(tokens.shape[0]):
        starts = np.flatnonzero(np.diff(np.r_[0, tokens[row] == AUDIO]) == 1)
        for start in starts:
            out[row, start : start + real[clip]] = True
            clip += 1
    return out


def _tower_config() -> Gemma3nAudioConfig:
    return Gemma3nAudioConfig.from_hf(AUDIO_CONFIG)


@pytest.fixture(scope="module")
def model(checkpoint):
    return gl.load(checkpoint[0], audio=True)


@pytest.fixture(scope="module")
def cached(model, features):
    _, ours = features
    return model.run_with_cache(_tokens(), input_features=ours)


def _diff(actual, expected) -> float:
    return float(np.abs(np.asarray(actual) - np.asarray(expected)).max())


def test_features_and_prompt_layout(features):
    theirs, ours = features
    assert _diff(ours.features, theirs["input_features"]) == 0.0
    np.testing.assert_array_equal(ours.mask, theirs["input_features_mask"])
    # Clips of different lengths: 7, 4 and 3 soft tokens of real audio, each padded to N.
    assert real_soft_tokens(ours.mask, _tower_config()) == [7, 4, 3]
    assert _tower_config().num_soft_tokens(ours.features.shape[1]) == 7 < N


def test_logits_match_transformers(model, expected, cached, features):
    theirs, ours = features
    tokens, reference = _tokens(), expected["out"].logits.numpy()
    fused = _diff(
        model(
            tokens,
            input_features=theirs["input_features"],
            input_features_mask=theirs["input_features_mask"],
        ),
        reference,
    )
    explicit = _diff(cached[0], reference)
    print(
        f"\nlogits vs transformers: max |diff| {fused:.1e} (call), {explicit:.1e} (cache); "
        f"logit scale {np.abs(reference).max():.2f}"
    )
    assert fused <= LOGIT_TOLERANCE and explicit <= LOGIT_TOLERANCE
    # The extractor's output whole, and with the processor's token types, give the same.
    types = (tokens == AUDIO) * 3
    assert _diff(model(tokens, input_features=theirs, token_type_ids=types), reference) <= (
        LOGIT_TOLERANCE
    )
    # The checks can fail: clips in another order, or every frame taken as real audio
    # (the padding of the shorter clips encoded as sound), are far off.
    order = [1, 0, 2]
    swapped = _diff(
        model(tokens, input_features=ours.features[order], input_features_mask=ours.mask[order]),
        reference,
    )
    unmasked = _diff(model(tokens, input_features=ours.features), reference)
    print(f"negative controls: clips swapped {swapped:.2f}, padding taken as audio {unmasked:.2f}")
    assert swapped > 0.1 and unmasked > 1e-2


def test_merged_embedding_matches_transformers(cached, expected, features):
    """hidden_states[0] (transformers stacks the AltUp streams there; stream 0 is the merged
    embedding), the soft tokens placed, the padding embedding."""
    _, cache = cached
    out, tokens = expected["out"], _tokens()
    streams = out.hidden_states[0].numpy()  # [stream, batch, seq, d_model]
    embed = _diff(cache["hook_embed"], streams[0])
    expanded = _diff(cache["hook_altup_expanded"], streams.transpose(1, 2, 0, 3))
    placed = np.asarray(cache["hook_audio_embed"])
    is_audio = tokens == AUDIO
    soft = _diff(placed[is_audio], out.audio_hidden_states.numpy().reshape(-1, placed.shape[-1]))
    print(f"\nmerged embedding {embed:.1e}, AltUp streams {expanded:.1e}, soft tokens {soft:.1e}")
    assert max(embed, expanded, soft) <= HIDDEN_TOLERANCE
    assert not placed[~is_audio].any()
    # Past each clip's real tokens, its run holds the embedding of hard id 511.
    real = _real_positions(tokens, features[0]["input_features_mask"])
    assert real.sum() == 7 + 4 + 3
    assert _diff(placed[is_audio & ~real], expected["padding"][None]) <= HIDDEN_TOLERANCE
    assert _diff(placed[real][:, None], expected["padding"]) > 0.1


def test_hooks_listed_and_usable(model, cached, expected, features):
    _, cache = cached
    _, ours = features
    names = model.hook_names
    audio = [n for n in names if n.startswith("audio.")]
    assert audio[:2] == ["audio.subsample.conv_0.hook_out", "audio.subsample.conv_1.hook_out"]
    assert audio[-2:] == ["audio.hook_soft_emb_norm", "audio.hook_projected"]
    order = [names.index(n) for n in ("audio.hook_projected", "hook_audio_embed", "hook_embed")]
    assert order == sorted(order) and order[-1] < names.index("blocks.0.hook_resid_pre")
    assert all(name in cache for name in names)
    assert cache["audio.hook_projected"].shape == (3, 7, 64)  # clips, soft tokens, d_model
    assert cache["audio.blocks.0.attn.hook_pattern"].shape == (3, 4, 9, 3, 7)
    # Zeroing the tower's soft tokens is transformers' run with zeros at the positions of
    # real audio (the padding embedding stays at the others).
    zero = lambda value, name: value * 0  # noqa: E731
    ablated = model.run_with_hooks(_tokens(), {"audio.hook_projected": zero}, input_features=ours)
    assert _diff(ablated, expected["zeroed"]) <= LOGIT_TOLERANCE
    assert _diff(ablated, cached[0]) > 1e-2
    # Before the first audio token nothing changed (causal attention).
    assert _diff(np.asarray(ablated)[:, :2], np.asarray(cached[0])[:, :2]) <= 1e-5


def test_text_calls(model, checkpoint):
    """A call without audio leaves the tower's hook points, which did not run, out of the
    cache (read off an abstract run: the hard paths it runs are those of the calls with
    audio above); text-only loading stays the default."""
    text_ids = np.where(_tokens() == AUDIO, 40, _tokens())
    cache = jax.eval_shape(lambda: dict(model.run_with_cache(text_ids)[1]))
    assert not any(n.startswith("audio.") or n == "hook_audio_embed" for n in cache)
    assert "hook_embed" in cache and "blocks.0.hook_resid_pre" in cache
    text_model = gl.load(checkpoint[0])
    assert text_model.config.audio is None and "audio tower" in repr(model)
    assert not any(n.startswith("audio.") for n in text_model.hook_names)
    assert text_model.config.num_params() < model.config.num_params()
    message = _error(text_model, _tokens(), input_features=np.zeros((3, 97, 128), np.float32))
    assert "no audio tower" in message and "gl.load(path, audio=True)" in message


def _error(model, tokens, **kwargs) -> str:
    with pytest.raises((ValueError, TypeError, NotImplementedError)) as error:
        model(tokens, **kwargs)
    return str(error.value)


def test_clear_errors(model, features):
    _, ours = features
    tokens = _tokens()
    message = _error(model, tokens)  # placeholders without audio
    assert "30 audio token(s)" in message and "no input_features" in message
    text = np.array([[BOS, 10, 11, 12]])
    message = _error(model, text, input_features=ours)  # audio without placeholders
    assert "3 clip(s)" in message and "no audio tokens" in message
    message = _error(model, tokens[:1], input_features=ours)  # more clips than runs
    assert "2 run(s)" in message and "3 clip(s)" in message
    short = np.array([[BOS, *_clip(N - 1), 10, *_clip(), *_clip(N + 1)]])
    message = _error(model, short, input_features=ours)  # runs of the wrong lengths
    assert "audio_soft_tokens_per_image = 10" in message and "clip 0: 7" in message
    assert "[2:11] (9 tokens)" in message and "(11 tokens)" in message
    long = np.zeros((3, 200, 128), np.float32)  # 13 soft tokens per clip, more than N
    assert "13 soft tokens" in _error(model, tokens, input_features=long)
    message = _error(model, tokens, input_features=np.zeros((3, 97, 64), np.float32))
    assert "[num_clips, frames, 128]" in message
    assert "features[None]" in _error(model, tokens, input_features=ours.features[0])
    message = _error(model, tokens, input_features=ours, input_features_mask=ours.mask)
    assert "given twice" in message
    mask = ours.mask[:, :50]
    assert "(3, 97)" in _error(
        model, tokens, input_features=ours.features, input_features_mask=mask
    )
    image = tokens.copy()
    image[0, -1] = IMAGE
    assert "vision tower" in _error(model, image, input_features=ours)
    wrong_types = (tokens == AUDIO) * 3
    wrong_types[0, 0] = 3
    assert "mark audio" in _error(model, tokens, input_features=ours, token_type_ids=wrong_types)
    assert "input_features" in _error(model, tokens, input_features=ours, pixel_value=1)
    with pytest.raises(NotImplementedError, match="generation with audio"):
        model.generate([[BOS, *_clip(), 10]], max_new_tokens=1)


def test_audio_only_checkpoint(checkpoint, features, expected, tmp_path):
    """Without embed_vision (an audio-only file), the model loads and runs; only the hard
    vision id (row 0's second to last token) then reads the text table."""
    directory, _ = checkpoint
    tensors = load_file(directory / "model.safetensors")
    kept = {k: v for k, v in tensors.items() if not k.startswith("model.embed_vision.")}
    save_file(kept, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    model = gl.load(tmp_path, audio=True)
    assert model.config.vision_embedder is None
    logits = np.asarray(model(_tokens(), input_features=features[1]))
    reference = expected["out"].logits.numpy()
    vision_at = int(np.flatnonzero(_tokens()[0] == VISION_ID)[0])
    assert _diff(logits[0, :vision_at], reference[0, :vision_at]) <= LOGIT_TOLERANCE
    assert _diff(logits[1], reference[1]) <= LOGIT_TOLERANCE
    assert _diff(logits[0, vision_at], reference[0, vision_at]) > 1e-2


def test_load_errors(tmp_path):
    text_dir = tmp_path / "text"
    ref.gemma3n_text(text_dir)
    with pytest.raises(CheckpointError, match="text-only Gemma 3n checkpoint.*audio=True"):
        gl.load(text_dir, audio=True)
    # Gemma 4 has its audio tower now (tests/test_audio_gemma4.py); Gemma 3 has none.
    other = tmp_path / "gemma3"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gemma3_text"}))
    save_file({"x": np.zeros(1, np.float32)}, other / "model.safetensors")
    with pytest.raises(CheckpointError, match="Gemma 3 audio tower.*Gemma 3n"):
        gl.load(other, audio=True)


def test_parameter_counts(checkpoint, model):
    """The loaded model counts what transformers' model holds (its stubbed vision tower has
    nothing); the E2B / E4B presets with audio count as transformers'
    ``Gemma3nForConditionalGeneration`` without its vision tower (meta device)."""
    _, hf = checkpoint
    assert model.config.num_params() == sum(p.numel() for p in hf.parameters())
    e4b = transformers.Gemma3nConfig()  # transformers' defaults are E4B's
    e2b_text = dict(num_hidden_layers=30, intermediate_size=8192, num_kv_shared_layers=10)
    e2b = transformers.Gemma3nConfig(text_config=e2b_text)
    for name, config in (("gemma3n_e2b", e2b), ("gemma3n_e4b", e4b)):
        hf_count = sum(p.numel() for p in _build_hf(config, "meta").parameters())
        ours = gemma3n_with_audio(name)
        tower = ours.num_params() - gl.preset(name).num_params()
        print(f"\n{name} with audio: {ours.num_params():,} (audio tower and embedders {tower:,})")
        assert ours.num_params() == hf_count
        assert tower == 681_348_640 + 1536 * (128 + 2 + 2048) + 2048 * (128 + 2 + 2048)
    assert gemma3n_with_audio("gemma3n_e4b").num_params() == 7_524_390_160


def test_config_checks():
    config = gemma3n_with_audio("gemma3n_e2b")
    narrower = config.replace(hidden_size=1024)
    assert narrower.audio.text_hidden_size == narrower.vision_embedder.text_hidden_size == 1024
    with pytest.raises(ValueError, match="must end the text vocabulary"):
        config.replace(vocab_size=262_144 + 128)
    with pytest.raises(ValueError, match="audio_token_id"):
        config.replace(audio_token_id=5)
    with pytest.raises(ValueError, match="must match"):
        dataclasses.replace(config, hidden_size=1024)
