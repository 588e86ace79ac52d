"""Gemma 3n / Gemma 4 log-mel features against transformers' feature extractors."""

import struct
import wave

import numpy as np
import pytest
from transformers.models.gemma3n.feature_extraction_gemma3n import Gemma3nAudioFeatureExtractor
from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

from gemmalens.audio import (
    GEMMA3N_AUDIO,
    GEMMA4_AUDIO,
    gemma3n_audio_features,
    gemma4_audio_features,
    hann_window,
    mel_filterbank,
    read_wav,
)

# Both sides run the same numpy operations on the same dtypes; the measured max |diff| is
# 0.0 (bit-identical) for every case below, on both families. 1e-4 is the agreed bound.
TOL = 1e-4
SR = 16_000

FAMILIES = {
    "gemma3n": (gemma3n_audio_features, Gemma3nAudioFeatureExtractor, GEMMA3N_AUDIO),
    "gemma4": (gemma4_audio_features, Gemma4AudioFeatureExtractor, GEMMA4_AUDIO),
}


def _signals() -> dict[str, np.ndarray]:
    """Short test signals, of lengths that are not multiples of 128 or of the hop."""
    rng = np.random.default_rng(0)
    t = np.arange(24_011) / SR
    chirp_rate = (7000.0 - 100.0) / (2 * t[-1])  # 100 Hz to 7 kHz linearly
    clicks = np.zeros(8_077)
    clicks[::1000] = 0.9  # mostly exact zeros: exercises the log floor
    return {
        "sine": 0.5 * np.sin(2 * np.pi * 440.0 * t[:16_000]),
        "chirp": 0.3 * np.sin(2 * np.pi * (100.0 * t + chirp_rate * t**2)),
        "noise": 0.1 * rng.standard_normal(12_345),
        "clicks": clicks,
    }


SIGNALS = {k: v.astype(np.float32) for k, v in _signals().items()}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    ours, cls, config = FAMILIES[request.param]
    # Default arguments, built offline from the class (no hub download).
    return request.param, ours, cls(), config


def _reference(extractor, waveforms: list, **kw) -> tuple[np.ndarray, np.ndarray]:
    # Always a list: transformers 5.23's Gemma 4 extractor fails on a bare 1-D array
    # ("cannot select an axis to squeeze out"), its Gemma 3n one does not.
    out = extractor(waveforms, return_tensors="np", **kw)
    return out["input_features"], out["input_features_mask"]


def _assert_matches(ours, ref_features, ref_mask, what):
    assert ours.features.dtype == np.float32 and ours.mask.dtype == np.bool_
    assert ours.features.shape == ref_features.shape, what
    np.testing.assert_array_equal(ours.mask, ref_mask, err_msg=what)
    diff = float(np.abs(ours.features - ref_features).max()) if ref_features.size else 0.0
    assert diff <= TOL, f"{what}: max |diff| {diff} (measured 0.0 when written)"


@pytest.mark.parametrize("signal", list(SIGNALS))
def test_single_waveform_matches_transformers(family, signal):
    name, ours, extractor, _ = family
    x = SIGNALS[signal]
    _assert_matches(ours(x), *_reference(extractor, [x]), f"{name} {signal}")


def test_batch_of_different_lengths_matches_transformers(family):
    name, ours, extractor, _ = family
    batch = list(SIGNALS.values())
    got = ours(batch)
    _assert_matches(got, *_reference(extractor, batch), f"{name} batch")
    assert got.features.shape[0] == len(batch)
    assert len(set(got.mask.sum(axis=1).tolist())) == len(batch)  # lengths really differ


def test_float64_and_list_inputs_match_transformers(family):
    name, ours, extractor, _ = family
    x64 = _signals()["chirp"][:9_000]
    _assert_matches(ours(x64), *_reference(extractor, [x64]), f"{name} float64")
    xs = x64[:3_000].tolist()
    _assert_matches(ours(xs), *_reference(extractor, [xs]), f"{name} list of floats")


def test_options_match_transformers(family):
    """No rounding to 128, truncation, and per-bin normalisation."""
    name, ours, extractor, config = family
    batch = [SIGNALS["noise"], SIGNALS["clicks"]]
    kw = {"pad_to_multiple_of": None, "max_length": 10_000}
    _assert_matches(ours(batch, **kw), *_reference(extractor, batch, **kw), f"{name} {kw}")
    kw = {"pad_to_multiple_of": 100, "max_length": 5_050}  # rounded up to 5_100, as there
    _assert_matches(ours(batch, **kw), *_reference(extractor, batch, **kw), f"{name} {kw}")

    rng = np.random.default_rng(1)
    mean = rng.normal(-5.0, 1.0, config.num_mel_bins)
    std = rng.uniform(0.5, 2.0, config.num_mel_bins)
    normalised = type(extractor)(per_bin_mean=mean, per_bin_stddev=std)
    got = ours(batch, per_bin_mean=mean, per_bin_stddev=std)
    _assert_matches(got, *_reference(normalised, batch), f"{name} per-bin")


@pytest.mark.parametrize("samples", [1, 100, 200, 700])
def test_shorter_than_a_frame_matches_transformers(family, samples):
    name, ours, extractor, _ = family
    x = SIGNALS["sine"][:samples]
    _assert_matches(ours(x), *_reference(extractor, [x]), f"{name} {samples} samples")


def test_filterbank_and_window_are_transformers_own(family):
    _, _, extractor, config = family
    fb = mel_filterbank(
        config.fft_length // 2 + 1,
        config.num_mel_bins,
        config.min_frequency,
        config.max_frequency,
        config.sampling_rate,
        config.fft_length,
    )
    np.testing.assert_array_equal(fb, extractor.mel_filters)
    np.testing.assert_array_equal(
        hann_window(config.frame_length, config.window_dtype), extractor.window
    )
    assert (config.frame_length, config.hop_length, config.fft_length) == (
        extractor.frame_length,
        extractor.hop_length,
        extractor.fft_length,
    )
    # Gemma 4's lowest filter falls between FFT bins 0 and 1 (transformers' comment says
    # the uppermost): its feature is the constant log(1e-3) on every valid frame.
    empty = np.flatnonzero(fb.max(axis=0) == 0).tolist()
    assert empty == ([0] if config is GEMMA4_AUDIO else [])


def test_gemma3n_mask_reaches_into_padding():
    """transformers' rule (first sample of a frame) counts frames that overlap the padding."""
    x = SIGNALS["noise"]  # 12_345 samples, 74 frames made of real audio only
    alone = gemma3n_audio_features(x).mask.sum()
    batched = gemma3n_audio_features([x, SIGNALS["chirp"]]).mask[0].sum()
    fully_real = (len(x) - GEMMA3N_AUDIO.frame_length - 1) // GEMMA3N_AUDIO.hop_length + 1
    assert (fully_real, alone, batched) == (74, 75, 78)
    # Gemma 4 looks at each frame's last sample: only real audio, whatever the batch.
    g4 = GEMMA4_AUDIO
    fully_real = (len(x) + g4.frame_length // 2 - g4.frame_length - 1) // g4.hop_length + 1
    assert gemma4_audio_features([x, SIGNALS["chirp"]]).mask[0].sum() == fully_real


# ---------------------------------------------------------------------------------------
# WAV files


def _write_wav(path, data: bytes, channels: int, width: int, rate: int = SR):
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(width)
        f.setframerate(rate)
        f.writeframes(data)


def _extremes_and_noise(lo: int, hi: int, n: int, seed: int) -> np.ndarray:
    ints = np.random.default_rng(seed).integers(lo, hi + 1, n)
    ints[:2] = lo, hi
    return ints


def test_read_wav_16_bit_mono(tmp_path):
    ints = _extremes_and_noise(-32768, 32767, 1001, 0).astype("<i2")
    _write_wav(tmp_path / "a.wav", ints.tobytes(), 1, 2)
    wav, rate = read_wav(tmp_path / "a.wav")
    assert rate == SR and wav.dtype == np.float32
    np.testing.assert_array_equal(wav, (ints / 32768.0).astype(np.float32))
    assert wav.min() == -1.0 and wav.max() < 1.0


def test_read_wav_16_bit_stereo_averages_channels(tmp_path):
    left = _extremes_and_noise(-32768, 32767, 777, 1)
    right = _extremes_and_noise(-32768, 32767, 777, 2)
    interleaved = np.stack([left, right], axis=1).astype("<i2")
    _write_wav(tmp_path / "s.wav", interleaved.tobytes(), 2, 2)
    wav, rate = read_wav(tmp_path / "s.wav")
    assert rate == SR and wav.shape == (777,)
    np.testing.assert_array_equal(wav, ((left + right) / 2 / 32768.0).astype(np.float32))


def test_read_wav_8_bit_is_unsigned(tmp_path):
    u8 = _extremes_and_noise(0, 255, 500, 3).astype(np.uint8)
    _write_wav(tmp_path / "b.wav", u8.tobytes(), 1, 1, rate=8_000)
    wav, rate = read_wav(tmp_path / "b.wav")
    assert rate == 8_000
    np.testing.assert_array_equal(wav, ((u8.astype(int) - 128) / 128.0).astype(np.float32))


def test_read_wav_24_and_32_bit(tmp_path):
    ints = _extremes_and_noise(-(2**23), 2**23 - 1, 600, 4)
    packed = b"".join(struct.pack("<i", int(v))[:3] for v in ints)
    _write_wav(tmp_path / "c.wav", packed, 1, 3)
    wav, _ = read_wav(tmp_path / "c.wav")
    np.testing.assert_array_equal(wav, (ints / 2.0**23).astype(np.float32))

    ints = _extremes_and_noise(-(2**31), 2**31 - 1, 600, 5)
    _write_wav(tmp_path / "d.wav", ints.astype("<i4").tobytes(), 1, 4)
    wav, _ = read_wav(tmp_path / "d.wav")
    np.testing.assert_array_equal(wav, (ints / 2.0**31).astype(np.float32))


def test_wav_path_input_matches_array_input(family, tmp_path):
    name, ours, extractor, _ = family
    ints = np.round(SIGNALS["chirp"][:11_111] * 32767).astype("<i2")
    path = tmp_path / "chirp.wav"
    _write_wav(path, ints.tobytes(), 1, 2)
    x = (ints / 32768.0).astype(np.float32)
    got = ours(path)
    _assert_matches(got, *_reference(extractor, [x]), f"{name} WAV")
    np.testing.assert_array_equal(got.features, ours(str(path)).features)
    # Paths and arrays mix in one batch.
    _assert_matches(
        ours([path, SIGNALS["sine"]]),
        *_reference(extractor, [x, SIGNALS["sine"]]),
        f"{name} WAV + array",
    )


# ---------------------------------------------------------------------------------------
# Errors


def test_wrong_sampling_rate_says_how_to_resample(tmp_path):
    x = SIGNALS["sine"]
    with pytest.raises(ValueError, match=r"need 16000 Hz audio.*sampling_rate=44100") as e:
        gemma3n_audio_features(x, sampling_rate=44_100)
    assert "does not resample" in str(e.value)
    assert "resample_poly(x, 160, 441)" in str(e.value)

    ints = np.zeros(800, "<i2")
    _write_wav(tmp_path / "8k.wav", ints.tobytes(), 1, 2, rate=8_000)
    with pytest.raises(ValueError, match=r"8k.wav' is 8000 Hz audio.*resample_poly\(x, 2, 1\)"):
        gemma4_audio_features(tmp_path / "8k.wav")


def test_bad_inputs_are_refused(tmp_path):
    for fn in (gemma3n_audio_features, gemma4_audio_features):
        with pytest.raises(ValueError, match="empty waveform"):
            fn(np.zeros(0, np.float32))
        with pytest.raises(ValueError, match="empty waveform"):
            fn([SIGNALS["sine"], np.zeros(0, np.float32)])
        with pytest.raises(ValueError, match="no waveforms"):
            fn([])
        with pytest.raises(ValueError, match=r"must be 1-D.*list of 1-D arrays.*average"):
            fn(np.zeros((2, 1000), np.float32))
        with pytest.raises(ValueError, match="must be 1-D"):
            fn(np.asarray(0.5, np.float32))
        with pytest.raises(TypeError, match=r"float arrays.*x / 32768"):
            fn(np.zeros(1000, np.int16))
        with pytest.raises(ValueError, match="needs 128 values"):
            fn(SIGNALS["sine"], per_bin_mean=np.zeros(3))


def test_float_wav_is_refused_with_a_conversion_hint(tmp_path):
    # A minimal IEEE-float (format 3) WAV, which the wave module cannot read.
    payload = np.zeros(16, "<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, SR, SR * 4, 4, 32)
    data = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    data += b"data" + struct.pack("<I", len(payload)) + payload
    (tmp_path / "f.wav").write_bytes(b"RIFF" + struct.pack("<I", len(data)) + data)
    with pytest.raises(ValueError, match="integer-PCM WAV.*pcm_s16le"):
        read_wav(tmp_path / "f.wav")
