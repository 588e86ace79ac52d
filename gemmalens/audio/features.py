"""The audio front end of Gemma 3n and Gemma 4: log-mel features, in numpy.

The outputs equal those of transformers' ``Gemma3nAudioFeatureExtractor`` and
``Gemma4AudioFeatureExtractor`` (transformers 5.23) with their default arguments, to the
bit on the machines this was checked on: every step is the same numpy operation on the
same dtype (float32 waveforms and frames, a float32 FFT, a float64 mel projection and
log, features rounded to float32 at the end).

The two families share one pipeline and differ only in constants, collected in a
``LogMelConfig`` each (``GEMMA3N_AUDIO`` and ``GEMMA4_AUDIO``):

1. Batch: each waveform is cut to ``max_length`` samples (30 s), then all are padded
   with zeros on the right to the longest, rounded up to a multiple of
   ``pad_to_multiple_of`` (128). A per-sample mask marks the real samples.
2. Frame: Gemma 4 first prepends ``frame_length // 2`` zeros ("semicausal" framing, so
   that frame ``i`` is centred on sample ``i * hop``); Gemma 3n does not. Frames start
   every ``hop_length`` samples and span ``frame_length + 1`` samples (see ``frames``).
3. Pre-emphasis (Gemma 3n only, 0.97, HTK flavour), periodic Hann window, real FFT of
   ``fft_length`` points (zero-padded), magnitude (not power).
4. HTK-mel triangular filterbank without area normalisation (``mel_filterbank``), then
   the natural log, with the floor applied as ``max(mel, floor)`` (Gemma 3n, 1e-5) or
   ``mel + floor`` (Gemma 4, 1e-3). Optional per-bin mean/stddev normalisation (unset
   in both defaults).
5. Frame mask: Gemma 3n marks a frame valid when its *first* sample is real audio,
   Gemma 4 when its *last* one is; Gemma 4 also zeroes the features of invalid frames.

Inputs: one waveform (a 1-D float array, or a list of numbers), a path to a PCM WAV
file, or a list of these (a batch, which may mix lengths). Waveforms are floats in
[-1, 1] at 16 kHz. Nothing is resampled: another rate is an error that says how to
resample. A 2-D array is refused rather than guessed at (it could be a batch or
multi-channel audio): pass a list of 1-D arrays for a batch, or average the channels.
Integer arrays are refused too (their scale is unknown; ``read_wav`` scales PCM).

Not reproduced: transformers' ``dither`` (random noise; 0 by default),
``input_scale_factor`` (1 by default) and the non-HTK pre-emphasis flavour, none of which
the defaults use; and its ``padding``/``truncation`` switches other than the defaults
(pad to the longest, truncate at ``max_length``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import wave
from collections.abc import Sequence
from typing import Literal

import numpy as np

__all__ = [
    "GEMMA3N_AUDIO",
    "GEMMA4_AUDIO",
    "AudioFeatures",
    "LogMelConfig",
    "frame_mask",
    "frames",
    "gemma3n_audio_features",
    "gemma4_audio_features",
    "hann_window",
    "log_mel",
    "log_mel_features",
    "mel_filterbank",
    "pad_batch",
    "preemphasize",
    "read_wav",
]

Waveform = np.ndarray | Sequence[float] | str | os.PathLike
WaveformInput = Waveform | Sequence[Waveform]


@dataclasses.dataclass(frozen=True)
class AudioFeatures:
    """Log-mel features of a batch of waveforms.

    Attributes:
      features: ``[batch, frames, mel_bins]`` float32 log-mel features. All waveforms of
        a batch are padded to one length, so short ones have trailing frames that cover
        padding (``mask`` False there).
      mask: ``[batch, frames]`` bool, True for frames the model should attend to
        (transformers calls it ``input_features_mask``).
    """

    features: np.ndarray
    mask: np.ndarray


@dataclasses.dataclass(frozen=True)
class LogMelConfig:
    """The constants of one family's front end (see the module docstring for the steps).

    Lengths are in samples at ``sampling_rate``.
    """

    name: str
    sampling_rate: int
    frame_length: int
    hop_length: int
    fft_length: int
    num_mel_bins: int
    min_frequency: float
    max_frequency: float
    # 0 turns pre-emphasis off. HTK flavour: the first sample of a frame is scaled by
    # (1 - coefficient) instead of looking back across the frame boundary.
    preemphasis: float
    mel_floor: float
    # "clamp": log(max(mel, floor)) (Gemma 3n); "add": log(mel + floor) (Gemma 4).
    floor_mode: Literal["clamp", "add"]
    # Gemma 3n evaluates its Hann window in float32 arithmetic, Gemma 4 in float64; the
    # two differ by up to 1.8e-7, so each is reproduced as it is.
    window_dtype: type
    # Prepend frame_length // 2 zeros before framing (Gemma 4's "semicausal" padding).
    semicausal_padding: bool
    # Which sample of a frame decides whether it is valid (see ``frame_mask``).
    mask_rule: Literal["first_sample", "last_sample"]
    zero_masked_frames: bool
    pad_to_multiple_of: int | None = 128
    max_length: int | None = 480_000
    # Per-bin normalisation ([num_mel_bins] each); neither published default sets them.
    per_bin_mean: tuple[float, ...] | None = None
    per_bin_stddev: tuple[float, ...] | None = None


GEMMA3N_AUDIO = LogMelConfig(
    name="Gemma 3n",
    sampling_rate=16_000,
    frame_length=512,  # 32 ms
    hop_length=160,  # 10 ms
    # "FFT overdrive": twice the next power of two above the frame length.
    fft_length=1024,
    num_mel_bins=128,
    min_frequency=125.0,
    max_frequency=7600.0,
    preemphasis=0.97,
    mel_floor=1e-5,
    floor_mode="clamp",
    window_dtype=np.float32,
    semicausal_padding=False,
    mask_rule="first_sample",
    zero_masked_frames=False,
)

GEMMA4_AUDIO = LogMelConfig(
    name="Gemma 4",
    sampling_rate=16_000,
    frame_length=320,  # 20 ms
    hop_length=160,  # 10 ms
    fft_length=512,
    num_mel_bins=128,
    min_frequency=0.0,
    max_frequency=8000.0,
    preemphasis=0.0,
    mel_floor=1e-3,
    floor_mode="add",
    window_dtype=np.float64,
    semicausal_padding=True,
    mask_rule="last_sample",
    zero_masked_frames=True,
)

# ---------------------------------------------------------------------------------------
# Reading WAV files


def read_wav(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Reads an integer-PCM WAV file with the standard library's ``wave`` module.

    8-bit (unsigned), 16-, 24- and 32-bit (signed) PCM are supported; samples are
    divided by 2**(bits - 1), so they lie in [-1, 1). Multi-channel files are mixed
    down to mono by averaging the channels. Floating-point and compressed WAV files are
    not supported (``wave`` cannot read them): convert them to PCM first, e.g.
    ``ffmpeg -i in.wav -acodec pcm_s16le out.wav``.

    Args:
      path: the file.

    Returns:
      ``(waveform, sample_rate)``: ``[samples]`` float32, and the rate in Hz from the
      file's header.
    """
    try:
        with wave.open(os.fspath(path), "rb") as f:
            channels = f.getnchannels()
            width = f.getsampwidth()
            rate = f.getframerate()
            data = f.readframes(f.getnframes())
    except wave.Error as e:
        raise ValueError(
            f"{os.fspath(path)!r} cannot be read as an integer-PCM WAV file ({e}). Convert it, "
            "e.g. `ffmpeg -i in.wav -acodec pcm_s16le out.wav`, or decode it yourself and pass "
            "the waveform as a float array."
        ) from e
    if width == 1:
        # 8-bit WAV is the one unsigned width; 128 is silence.
        ints = np.frombuffer(data, np.uint8).astype(np.int32) - 128
    elif width == 2:
        ints = np.frombuffer(data, "<i2").astype(np.int32)
    elif width == 3:
        b = np.frombuffer(data, np.uint8).reshape(-1, 3).astype(np.int32)
        ints = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        ints = np.where(ints >= 1 << 23, ints - (1 << 24), ints)  # sign-extend
    elif width == 4:
        ints = np.frombuffer(data, "<i4")
    else:
        raise ValueError(f"{os.fspath(path)!r}: unsupported sample width {8 * width} bits")
    samples = ints.astype(np.float64) / float(1 << (8 * width - 1))
    # Drop a trailing partial frame, which a truncated file can carry.
    samples = samples[: len(samples) // channels * channels].reshape(-1, channels)
    return samples.mean(axis=1).astype(np.float32), rate


# ---------------------------------------------------------------------------------------
# Input checks and batching


def _resample_hint(rate: int, expected: int) -> str:
    g = math.gcd(rate, expected)
    up, down = expected // g, rate // g
    return (
        f"Resample it to {expected} Hz first (gemmalens does not resample), e.g. "
        f"scipy.signal.resample_poly(x, {up}, {down}) or "
        f"librosa.resample(x, orig_sr={rate}, target_sr={expected})."
    )


def _one_waveform(item: Waveform, sampling_rate: int, config: LogMelConfig) -> np.ndarray:
    """One input as a ``[samples]`` float32 array, after checking it."""
    if isinstance(item, (str, os.PathLike)):
        wav, rate = read_wav(item)
        where = f"{os.fspath(item)!r} is {rate} Hz audio"
    else:
        wav, rate = np.asarray(item), sampling_rate
        where = f"sampling_rate={rate}"
    if rate != config.sampling_rate:
        raise ValueError(
            f"{config.name} audio features need {config.sampling_rate} Hz audio, but "
            f"{where}. {_resample_hint(rate, config.sampling_rate)}"
        )
    if wav.ndim != 1:
        raise ValueError(
            f"a waveform must be 1-D [samples], got shape {wav.shape}. For a batch pass a "
            "list of 1-D arrays; for multi-channel audio average the channels first, e.g. "
            "x.mean(axis=channel_axis) (read_wav does this for WAV files)."
        )
    if wav.size == 0:
        raise ValueError("empty waveform: every waveform needs at least one sample")
    if not np.issubdtype(wav.dtype, np.floating):
        raise TypeError(
            f"waveforms must be float arrays in [-1, 1], got dtype {wav.dtype}. Scale integer "
            "PCM first (e.g. int16: x / 32768), or read WAV files with read_wav."
        )
    # transformers pads in float64 and then rounds to float32; rounding first is the same.
    return wav.astype(np.float32)


def _as_list(waveforms: WaveformInput) -> list[Waveform]:
    if isinstance(waveforms, (str, os.PathLike, np.ndarray)):
        return [waveforms]
    if isinstance(waveforms, Sequence):
        if len(waveforms) == 0:
            raise ValueError("no waveforms: pass a waveform, a WAV path, or a non-empty list")
        # A flat list of numbers is one waveform, as in transformers.
        if isinstance(waveforms[0], (int, float, np.number)):
            return [np.asarray(waveforms, dtype=np.float64)]
        return list(waveforms)
    raise TypeError(f"expected a waveform, a WAV path or a list of them, got {type(waveforms)}")


def pad_batch(
    waveforms: Sequence[np.ndarray],
    pad_to_multiple_of: int | None = 128,
    max_length: int | None = 480_000,
) -> tuple[np.ndarray, np.ndarray]:
    """Truncates and right-pads 1-D waveforms into one batch, as transformers' ``pad``.

    Each waveform is cut to ``max_length`` (rounded up to a multiple of
    ``pad_to_multiple_of``, as transformers rounds it); the batch is padded with zeros to
    its longest member, rounded up to a multiple of ``pad_to_multiple_of``.

    Args:
      waveforms: ``[samples_i]`` float32 arrays.
      pad_to_multiple_of: the padded length's multiple, or None.
      max_length: the longest waveform kept, in samples, or None for no limit.

    Returns:
      ``(batch, sample_mask)``: ``[batch, samples]`` float32 and ``[batch, samples]`` bool,
      True on real samples.
    """

    def round_up(n: int) -> int:
        if pad_to_multiple_of is None:
            return n
        return -(-n // pad_to_multiple_of) * pad_to_multiple_of

    limit = None if max_length is None else round_up(max_length)
    cut = [w[:limit] for w in waveforms]
    length = round_up(max(len(w) for w in cut))
    batch = np.zeros((len(cut), length), np.float32)
    sample_mask = np.zeros((len(cut), length), bool)
    for i, w in enumerate(cut):
        batch[i, : len(w)] = w
        sample_mask[i, : len(w)] = True
    return batch, sample_mask


# ---------------------------------------------------------------------------------------
# The pipeline


def frames(waveforms: np.ndarray, frame_length: int, hop_length: int) -> np.ndarray:
    """Overlapping frames of ``frame_length + 1`` samples every ``hop_length`` samples.

    transformers frames one sample wider than the window (room for a pre-emphasis that
    looks one sample back). With the HTK flavour, or none, that last sample is dropped
    before the FFT, but it still counts: a frame exists only if all ``frame_length + 1``
    samples do, and Gemma 4's mask looks at it.

    Args:
      waveforms: ``[batch, samples]``.
      frame_length: the window length.
      hop_length: the step between frame starts.

    Returns:
      ``[batch, num_frames, frame_length + 1]``, a read-only strided view;
      ``num_frames = (samples - frame_length - 1) // hop_length + 1``, or 0.
    """
    width = frame_length + 1
    num_frames = max((waveforms.shape[1] - width) // hop_length + 1, 0)
    if num_frames == 0:
        return np.zeros((waveforms.shape[0], 0, width), waveforms.dtype)
    view = np.lib.stride_tricks.sliding_window_view(waveforms, width, axis=1)
    return view[:, ::hop_length][:, :num_frames]


def preemphasize(framed: np.ndarray, coefficient: float) -> np.ndarray:
    """HTK-flavour pre-emphasis inside each frame, dropping the extra framing sample.

    ``y[0] = (1 - c) * x[0]`` and ``y[n] = x[n] - c * x[n - 1]``: each frame is filtered
    on its own, never reading the sample before it. ``c = 0`` only drops the last sample.

    Args:
      framed: ``[..., frame_length + 1]`` (from ``frames``).
      coefficient: the pre-emphasis coefficient ``c`` (a Python float, so that float32
        frames stay float32).

    Returns:
      ``[..., frame_length]``.
    """
    if coefficient <= 0.0:
        return framed[..., :-1]
    first = framed[..., :1] * (1.0 - coefficient)
    rest = framed[..., 1:-1] - coefficient * framed[..., :-2]
    return np.concatenate([first, rest], axis=-1)


def hann_window(length: int, dtype: type = np.float64) -> np.ndarray:
    """The periodic Hann window ``0.5 * (1 - cos(2 pi n / length))``, as float32.

    Args:
      length: the window length.
      dtype: the dtype the cosine is evaluated in (``np.float32`` reproduces Gemma 3n's
        window bit for bit, ``np.float64`` Gemma 4's).

    Returns:
      ``[length]`` float32.
    """
    n = np.arange(length, dtype=dtype)
    return (0.5 * (1 - np.cos(2 * np.pi * n / length))).astype(np.float32)


def mel_filterbank(
    num_frequency_bins: int,
    num_mel_bins: int,
    min_frequency: float,
    max_frequency: float,
    sampling_rate: int,
    fft_length: int,
) -> np.ndarray:
    """Triangular filters equally spaced on the HTK mel scale, without normalisation.

    ``mel(f) = 2595 log10(1 + f / 700)``. ``num_mel_bins + 2`` points equally spaced in
    mel from ``min_frequency`` to ``max_frequency`` give each filter its start, peak (1)
    and end; the triangles are linear in Hz and evaluated at the FFT bin frequencies
    ``k * sampling_rate / fft_length``. (torchaudio's ``melscale_fbanks`` with
    ``norm=None, mel_scale="htk"``.) With Gemma 4's constants the lowest filter lies
    between bins 0 and 1 and is all zero, so its feature is always ``log(floor)``.

    Args:
      num_frequency_bins: ``fft_length // 2 + 1``.
      num_mel_bins: the number of filters.
      min_frequency: the lower edge of the first filter, Hz.
      max_frequency: the upper edge of the last filter, Hz.
      sampling_rate: Hz.
      fft_length: the FFT size.

    Returns:
      ``[num_frequency_bins, num_mel_bins]`` float64.
    """
    bin_hz = np.arange(num_frequency_bins) * (sampling_rate / fft_length)
    mel_lo, mel_hi = (2595.0 * np.log10(1.0 + f / 700.0) for f in (min_frequency, max_frequency))
    edges = 700.0 * (10.0 ** (np.linspace(mel_lo, mel_hi, num_mel_bins + 2) / 2595.0) - 1.0)
    widths = np.diff(edges)
    # slopes[k, j]: how far edge j lies above bin k, in Hz.
    slopes = edges[None, :] - bin_hz[:, None]
    rising = -slopes[:, :-2] / widths[:-1]
    falling = slopes[:, 2:] / widths[1:]
    return np.maximum(0.0, np.minimum(rising, falling))


def log_mel(
    windowed: np.ndarray,
    filterbank: np.ndarray,
    fft_length: int,
    mel_floor: float,
    floor_mode: Literal["clamp", "add"],
) -> np.ndarray:
    """Log of the mel-filtered FFT magnitude of windowed frames.

    Args:
      windowed: ``[..., frame_length]`` float32 windowed frames (zero-padded to
        ``fft_length`` by the FFT).
      filterbank: ``[fft_length // 2 + 1, mel_bins]`` (from ``mel_filterbank``).
      fft_length: the FFT size.
      mel_floor: keeps the log finite on silence.
      floor_mode: ``"clamp"`` for ``log(max(mel, floor))``, ``"add"`` for
        ``log(mel + floor)``.

    Returns:
      ``[..., mel_bins]`` float64.
    """
    # numpy >= 2 transforms float32 in single precision, as transformers does.
    magnitude = np.abs(np.fft.rfft(windowed, n=fft_length, axis=-1))
    mel = magnitude @ filterbank
    if floor_mode == "clamp":
        return np.log(np.maximum(mel, mel_floor))
    if floor_mode == "add":
        return np.log(mel + mel_floor)
    raise ValueError(f"floor_mode must be 'clamp' or 'add', got {floor_mode!r}")


def frame_mask(sample_mask: np.ndarray, num_frames: int, config: LogMelConfig) -> np.ndarray:
    """Which frames hold real audio, by one sample of each (transformers' rule per family).

    Gemma 3n looks at a frame's first sample, so the last few valid frames of a padded
    waveform (up to ``ceil(frame_length / hop_length)``, i.e. 4) reach into the padding,
    and a waveform has more valid frames in a batch with a longer one than alone. Gemma 4
    looks at the extra sample just past the window (see ``frames``), so a valid frame
    holds no padding (only audio and the leading semicausal zeros).

    Args:
      sample_mask: ``[batch, samples]`` bool, before any semicausal padding.
      num_frames: the number of frames.
      config: the family.

    Returns:
      ``[batch, num_frames]`` bool.
    """
    if config.semicausal_padding:
        sample_mask = np.pad(sample_mask, ((0, 0), (config.frame_length // 2, 0)))
    offset = {"first_sample": 0, "last_sample": config.frame_length}[config.mask_rule]
    return sample_mask[:, np.arange(num_frames) * config.hop_length + offset]


def log_mel_features(
    waveforms: WaveformInput,
    config: LogMelConfig,
    sampling_rate: int = 16_000,
) -> AudioFeatures:
    """Log-mel features of one family, for one waveform or a batch.

    Args:
      waveforms: a 1-D float array ``[samples]`` in [-1, 1], a list of numbers, a path
        to a PCM WAV file (``read_wav``), or a non-empty list of these of any lengths.
      config: the family's constants (``GEMMA3N_AUDIO`` or ``GEMMA4_AUDIO``).
      sampling_rate: the rate of array inputs, Hz; must equal ``config.sampling_rate``
        (WAV files are checked by their own header).

    Returns:
      ``AudioFeatures`` with ``features`` ``[batch, frames, num_mel_bins]`` float32 and
      ``mask`` ``[batch, frames]`` bool; batch is 1 for a single waveform. A batch
      shorter than one frame gives ``frames == 0``, as in transformers.
    """
    items = [_one_waveform(w, sampling_rate, config) for w in _as_list(waveforms)]
    batch, sample_mask = pad_batch(items, config.pad_to_multiple_of, config.max_length)
    if config.semicausal_padding:
        batch = np.pad(batch, ((0, 0), (config.frame_length // 2, 0)))

    framed = preemphasize(frames(batch, config.frame_length, config.hop_length), config.preemphasis)
    windowed = framed * hann_window(config.frame_length, config.window_dtype)
    filterbank = mel_filterbank(
        config.fft_length // 2 + 1,
        config.num_mel_bins,
        config.min_frequency,
        config.max_frequency,
        config.sampling_rate,
        config.fft_length,
    )
    features = log_mel(windowed, filterbank, config.fft_length, config.mel_floor, config.floor_mode)
    if config.per_bin_mean is not None:
        features = features - np.asarray(config.per_bin_mean)
    if config.per_bin_stddev is not None:
        features = features / np.asarray(config.per_bin_stddev)
    features = features.astype(np.float32)

    mask = frame_mask(sample_mask, features.shape[1], config)
    if config.zero_masked_frames:
        features = features * mask[..., None]
    return AudioFeatures(features=features, mask=mask)


def _configured(base: LogMelConfig, **overrides) -> LogMelConfig:
    for key in ("per_bin_mean", "per_bin_stddev"):
        value = overrides.get(key)
        if value is not None:
            value = tuple(float(v) for v in np.asarray(value, np.float64).reshape(-1))
            if len(value) != base.num_mel_bins:
                raise ValueError(f"{key} needs {base.num_mel_bins} values, got {len(value)}")
            overrides[key] = value
    return dataclasses.replace(base, **overrides)


def gemma3n_audio_features(
    waveforms: WaveformInput,
    sampling_rate: int = 16_000,
    *,
    pad_to_multiple_of: int | None = 128,
    max_length: int | None = 480_000,
    per_bin_mean: Sequence[float] | None = None,
    per_bin_stddev: Sequence[float] | None = None,
) -> AudioFeatures:
    """Gemma 3n's log-mel features (``Gemma3nAudioFeatureExtractor``).

    32 ms Hann frames every 10 ms, pre-emphasis 0.97, 1024-point FFT magnitude, 128 HTK
    mel bins over 125-7600 Hz, ``log(max(mel, 1e-5))``.

    Args:
      waveforms: a 1-D float array ``[samples]`` in [-1, 1], a list of numbers, a path
        to a PCM WAV file, or a non-empty list of these of any lengths.
      sampling_rate: the rate of array inputs; must be 16000 (resample first otherwise).
      pad_to_multiple_of: the padded length's multiple in samples, or None.
      max_length: longer waveforms are cut to this many samples (30 s), or None.
      per_bin_mean: ``[128]`` subtracted from the log-mels, if given.
      per_bin_stddev: ``[128]`` the log-mels are divided by, if given.

    Returns:
      ``AudioFeatures``: ``features`` ``[batch, frames, 128]`` float32 with
      ``frames = (padded_samples - 513) // 160 + 1``, and ``mask`` ``[batch, frames]``.
    """
    config = _configured(
        GEMMA3N_AUDIO,
        pad_to_multiple_of=pad_to_multiple_of,
        max_length=max_length,
        per_bin_mean=per_bin_mean,
        per_bin_stddev=per_bin_stddev,
    )
    return log_mel_features(waveforms, config, sampling_rate)


def gemma4_audio_features(
    waveforms: WaveformInput,
    sampling_rate: int = 16_000,
    *,
    pad_to_multiple_of: int | None = 128,
    max_length: int | None = 480_000,
    per_bin_mean: Sequence[float] | None = None,
    per_bin_stddev: Sequence[float] | None = None,
) -> AudioFeatures:
    """Gemma 4's log-mel features (``Gemma4AudioFeatureExtractor``).

    20 ms Hann frames every 10 ms after 10 ms of leading zeros, no pre-emphasis, 512-point
    FFT magnitude, 128 HTK mel bins over 0-8000 Hz, ``log(mel + 1e-3)``; frames that are
    masked out are zeroed.

    Args:
      waveforms: a 1-D float array ``[samples]`` in [-1, 1], a list of numbers, a path
        to a PCM WAV file, or a non-empty list of these of any lengths.
      sampling_rate: the rate of array inputs; must be 16000 (resample first otherwise).
      pad_to_multiple_of: the padded length's multiple in samples, or None.
      max_length: longer waveforms are cut to this many samples (30 s), or None.
      per_bin_mean: ``[128]`` subtracted from the log-mels, if given.
      per_bin_stddev: ``[128]`` the log-mels are divided by, if given.

    Returns:
      ``AudioFeatures``: ``features`` ``[batch, frames, 128]`` float32 with
      ``frames = (padded_samples + 160 - 321) // 160 + 1``, and ``mask``
      ``[batch, frames]``.
    """
    config = _configured(
        GEMMA4_AUDIO,
        pad_to_multiple_of=pad_to_multiple_of,
        max_length=max_length,
        per_bin_mean=per_bin_mean,
        per_bin_stddev=per_bin_stddev,
    )
    return log_mel_features(waveforms, config, sampling_rate)
