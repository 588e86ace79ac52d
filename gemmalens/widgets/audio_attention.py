"""`AudioAttentionViewer`: where a text token listens in a clip, drawn on the clip's time
axis under its waveform and log-mel spectrogram, and where the audio encoder's frames look
among themselves (its local, chunked attention).

The tower is found by its hook names (``audio.blocks.{i}.attn.hook_pattern``), not by
family; the time each soft token covers comes from the tower's config (`AudioLayout`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import traitlets
from matplotlib import colormaps
from matplotlib.figure import Figure

from gemmalens.audio.features import GEMMA3N_AUDIO, AudioFeatures
from gemmalens.widgets import _figures
from gemmalens.widgets._base import (
    MEAN_HEAD,
    Viewer,
    check_choice,
    check_head,
    layers_with,
    options_list,
    select_head,
    token_labels,
    tokenizer_of,
)
from gemmalens.widgets.image_attention import png_data_url

TEXT_PATTERN = "blocks.{layer}.attn.hook_pattern"
ENCODER_PATTERN = "audio.blocks.{layer}.attn.hook_pattern"
SOURCES = {"text": "text token -> audio soft tokens", "encoder": "audio frame -> audio frame"}
# Gemma 3n's and Gemma 4's front ends both step 10 ms between log-mel frames.
HOP_SECONDS = GEMMA3N_AUDIO.hop_length / GEMMA3N_AUDIO.sampling_rate
# How many (min, max) pairs of the waveform the live widget draws.
ENVELOPE_POINTS = 400
# The spectrogram PNG is at most this many pixels wide (one pixel per frame below it).
SPECTROGRAM_PIXELS = 1200
# and at most this many high (the static copy embeds one PNG per state: keep it small).
SPECTROGRAM_ROWS = 64


# ----------------------------------------------------------------------------- the layout


@dataclasses.dataclass(frozen=True)
class AudioLayout:
    """How an audio tower's outputs line up with its input frames.

    Attributes:
      time_stride: input (log-mel) frames per encoder frame: the product of the
        subsampling convolutions' time strides (Gemma 3n and Gemma 4: 4).
      reduction: encoder frames per soft token (Gemma 3n ``conf_reduction_factor``: 4;
        a tower that keeps every frame: 1).
      chunk_size: W, the queries of one chunk of the encoder's local attention.
      max_past, max_future: L and R, the frames a query sees before and after it; a
        chunk reads C = W + L + R keys, from frame ``chunk * W - L`` on.
    """

    time_stride: int
    reduction: int
    chunk_size: int
    max_past: int
    max_future: int

    @property
    def frames_per_token(self) -> int:
        """Input frames one soft token stands for (Gemma 3n: 16, i.e. 160 ms)."""
        return self.time_stride * self.reduction

    @property
    def context_size(self) -> int:
        return self.chunk_size + self.max_past + self.max_future

    # The names `gemmalens.audio.gemma3n.dense_pattern` reads off a tower config.
    @property
    def conf_attention_chunk_size(self) -> int:
        return self.chunk_size

    @property
    def max_past_horizon(self) -> int:
        return self.max_past

    def encoder_frames(self, frames: int) -> int:
        """Encoder frames of ``frames`` input frames: each stride-s convolution (time
        padded at the end) gives ``ceil(frames / s)``; s = ``time_stride`` in all."""
        return (frames - 1) // self.time_stride + 1 if frames > 0 else 0

    @classmethod
    def from_config(cls, config: Any) -> AudioLayout:
        """The layout of a model config's audio tower (``config.audio``, or its ``.audio``
        when that wraps the tower's own config), read from transformers' field names."""
        tower = getattr(config, "audio", None)
        tower = getattr(tower, "audio", tower)
        if tower is None:
            raise ValueError(
                "This model has no audio tower (its config's audio is None). Load a Gemma 3n "
                "or Gemma 4 (E2B, E4B) checkpoint with gl.load(path, audio=True), or build "
                "from a config with audio (gemmalens.presets.gemma3n_with_audio('gemma3n_e2b'))."
            )

        def read(*names: str, default: Any = None) -> Any:
            for name in names:
                if getattr(tower, name, None) is not None:
                    return getattr(tower, name)
            if default is None:
                raise ValueError(
                    f"Cannot read {names[0]} from the audio tower's config "
                    f"{type(tower).__name__}: pass layout=AudioLayout(...)."
                )
            return default

        stride = read("time_stride")  # the subsampling convolutions' product
        left = read("max_past_horizon", default=-1)
        if left < 0:
            left = max(0, int(read("conf_attention_context_left", "attention_context_left")) - 1)
        right = read("max_future_horizon", "conf_attention_context_right", default=-1)
        if right < 0:
            right = int(read("attention_context_right"))
        return cls(
            time_stride=int(stride),
            reduction=int(read("conf_reduction_factor", "reduction_factor", default=1)),
            chunk_size=int(read("conf_attention_chunk_size", "attention_chunk_size")),
            max_past=int(left),
            max_future=int(right),
        )


def dense_encoder_pattern(chunked: np.ndarray, layout: AudioLayout, frames: int) -> np.ndarray:
    """``audio.blocks.{i}.attn.hook_pattern`` (``[..., chunk, chunk_pos, context]``) as a
    dense ``[..., query frame, key frame]`` over ``frames`` encoder frames (zero outside
    each query's window), via `gemmalens.audio.gemma3n.dense_pattern`."""
    from gemmalens.audio.gemma3n import dense_pattern

    chunked = np.asarray(chunked, np.float32)
    if chunked.shape[-2:] != (layout.chunk_size, layout.context_size):
        raise ValueError(
            f"The encoder's patterns have chunks of {chunked.shape[-2]} queries and "
            f"{chunked.shape[-1]} keys, but the layout says {layout.chunk_size} and "
            f"{layout.context_size}: pass layout=AudioLayout(...) for this tower."
        )
    lead = chunked.shape[:-3]
    flat = chunked.reshape(-1, 1, *chunked.shape[-3:])
    dense = np.asarray(dense_pattern(flat, layout, frames))
    return dense.reshape(*lead, frames, frames)


# ----------------------------------------------------------------------------- the inputs


def _features_and_mask(audio: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(features [clip, frame, mel], mask [clip, frame] bool)`` from `AudioFeatures`, a
    feature extractor's mapping or a bare features array (every frame real)."""
    if isinstance(audio, AudioFeatures):
        features, mask = audio.features, audio.mask
    elif isinstance(audio, Mapping):
        if "input_features" not in audio:
            raise ValueError("audio must hold 'input_features' (and 'input_features_mask').")
        features = audio["input_features"]
        mask = audio.get("input_features_mask")
    else:
        features, mask = audio, None
    features = np.asarray(features, np.float32)
    if features.ndim == 2:
        features = features[None]
    if features.ndim != 3:
        raise ValueError(
            f"audio must be log-mel features [clip, frame, mel]; got shape {features.shape}."
        )
    mask = np.ones(features.shape[:2], bool) if mask is None else np.asarray(mask, bool)
    if mask.ndim == 1:
        mask = mask[None]
    if mask.shape != features.shape[:2]:
        raise ValueError(f"input_features_mask {mask.shape} != features {features.shape[:2]}.")
    return features, mask


def real_counts(mask: np.ndarray, layout: AudioLayout) -> tuple[list[int], list[int]]:
    """Per clip: how many encoder frames and how many soft tokens are real audio. Encoder
    frame ``t`` takes the flag of input frame ``t * time_stride`` (clipped to the last), and
    soft token ``j`` is encoder frame ``j * reduction``, as the towers compute their masks."""
    mask = np.asarray(mask, bool)
    frames = mask.shape[1]
    encoder = mask[:, np.minimum(np.arange(layout.encoder_frames(frames)) * layout.time_stride,
                                 frames - 1)]  # fmt: skip
    tokens = encoder[:, :: layout.reduction]
    return [int(n) for n in encoder.sum(1)], [int(n) for n in tokens.sum(1)]


def stretches(count: int, frames_each: int, hop_seconds: float) -> np.ndarray:
    """``[count, 2]`` (start, stop) seconds: item ``i`` covers input frames
    ``[i * frames_each, (i + 1) * frames_each)``."""
    starts = np.arange(count) * frames_each * hop_seconds
    return np.stack([starts, starts + frames_each * hop_seconds], axis=1)


def spectrogram_rgb(features: np.ndarray, cmap: str = "magma") -> np.ndarray:
    """``[frame, mel]`` log-mel -> ``[mel', frame', 3]`` uint8, low frequencies at the
    bottom, at most `SPECTROGRAM_PIXELS` wide and `SPECTROGRAM_ROWS` high (averaged)."""
    values = np.asarray(features, np.float32)
    if values.shape[0] > SPECTROGRAM_PIXELS:
        group = math.ceil(values.shape[0] / SPECTROGRAM_PIXELS)
        padded = np.pad(values, ((0, -values.shape[0] % group), (0, 0)), mode="edge")
        values = padded.reshape(-1, group, values.shape[1]).mean(1)
    if values.shape[1] > SPECTROGRAM_ROWS:  # pairs of mel bins averaged: half the PNG
        group = math.ceil(values.shape[1] / SPECTROGRAM_ROWS)
        padded = np.pad(values, ((0, 0), (0, -values.shape[1] % group)), mode="edge")
        values = padded.reshape(values.shape[0], -1, group).mean(2)
    low, high = np.percentile(values, [2, 99.5]) if values.size else (0.0, 1.0)
    scaled = np.clip((values - low) / max(high - low, 1e-6), 0, 1)
    rgb = colormaps[cmap](scaled.T[::-1])[..., :3]
    return (rgb * 255).round().astype(np.uint8)


def envelope(wave: np.ndarray, points: int = ENVELOPE_POINTS) -> np.ndarray:
    """``[points, 2]`` (min, max) of the waveform over equal stretches of it."""
    wave = np.asarray(wave, np.float32).reshape(-1)
    if wave.size == 0:
        return np.zeros((0, 2), np.float32)
    edges = np.linspace(0, wave.size, min(points, wave.size) + 1).astype(int)
    return np.array([[wave[a:b].min(), wave[a:b].max()] for a, b in zip(edges[:-1], edges[1:])])


# ----------------------------------------------------------------------------- the viewer


class AudioAttentionViewer(Viewer):
    """Attention over audio, on the clip's time axis.

    Two sources (chosen when the viewer is built):

    * ``"text"``: pick a text token (click it), a layer and a head (or the mean over
      heads); each of the clip's soft tokens is drawn as a bar over the stretch of time it
      stands for, as high as the token's attention to it (Gemma 3n: a soft token per 16
      log-mel frames, 160 ms). A clip shorter than its run of placeholders (188 in Gemma
      3n, for 30 s) leaves the run's tail to padding soft tokens, which cover no time: the
      side panel gives the attention they take. Captures ``blocks.{i}.attn.hook_pattern``.
    * ``"encoder"``: the audio tower's own local attention
      (``audio.blocks.{i}.attn.hook_pattern``, chunked, made dense): a heatmap of query
      frame by key frame, both in seconds, and the chosen query frame's attention under
      the spectrogram. Click a row to choose the query frame.

    Build it from a cache of a run with audio::

        features = gl.audio.gemma3n_audio_features(waves)
        logits, cache = m.run_with_cache(tokens, input_features=features)
        viewer = AudioAttentionViewer(cache, tokens, features, waveforms=waves)
        viewer = AudioAttentionViewer(cache, tokens, features, source="encoder")

    Traitlets (synced):
      source: ``"text"`` or ``"encoder"``.
      layer, head: the layer (text) or tower block (encoder) and head (-1: the mean).
      clip: which clip (clips are numbered row-major over the batch, as the model takes
        them).
      selected_token: the query token (text source), -1 for the last token outside audio.
      frame: the query frame (encoder source).
      duration: the clip's real audio, in seconds (real log-mel frames x 10 ms).
      spectrogram_url: the clip's log-mel features as an inline PNG.
      waveform: ``[point, 2]`` min and max of the waveform (empty without waveforms).
      heat: text source ``[query][soft token]``: attention of every token to each soft
        token of the clip's run; encoder source ``[query frame][key frame]`` over the
        clip's real encoder frames.
      share: text source ``[query]``: each token's total attention on the run.
      times: ``[item][2]`` start and stop seconds of each real soft token (text) or
        encoder frame (encoder).
      real_tokens: text source: how many of the run's soft tokens hold real audio (the
        rest is padding).
      audio_positions: text source: the token positions of the clip's run.
    """

    css_class = "gemmalens-audio-attention"
    _data_controls = ("layer", "head", "clip")

    source = traitlets.Unicode("text").tag(sync=True)
    layer = traitlets.Int(0).tag(sync=True)
    head = traitlets.Int(MEAN_HEAD).tag(sync=True)
    clip = traitlets.Int(0).tag(sync=True)
    selected_token = traitlets.Int(-1).tag(sync=True)
    frame = traitlets.Int(0).tag(sync=True)
    duration = traitlets.Float(0.0).tag(sync=True)
    spectrogram_url = traitlets.Unicode("").tag(sync=True)
    waveform = traitlets.List().tag(sync=True)
    heat = traitlets.List().tag(sync=True)
    share = traitlets.List().tag(sync=True)
    times = traitlets.List().tag(sync=True)
    real_tokens = traitlets.Int(0).tag(sync=True)
    audio_positions = traitlets.List().tag(sync=True)

    def __init__(
        self,
        cache: Mapping[str, Any],
        tokens: Any,
        audio: Any,
        *,
        source: str = "text",
        waveforms: Sequence[Any] | None = None,
        audio_token_id: int | None = None,
        tokenizer: Any = None,
        layer: int | None = None,
        head: int = MEAN_HEAD,
        clip: int | None = None,
        selected_token: int = -1,
        frame: int = 0,
        batch: int = 0,
        layout: AudioLayout | None = None,
        hop_seconds: float = HOP_SECONDS,
        sampling_rate: int = GEMMA3N_AUDIO.sampling_rate,
        embed_html: bool = True,
    ):
        """
        Args:
          cache: an `ActivationCache` of a run with audio holding the patterns of the
            source (see the class docstring).
          tokens: the token ids of the run (``[batch, seq]``), audio placeholders included.
          audio: what the model heard: `gemmalens.audio.gemma3n_audio_features`' result,
            a feature extractor's mapping (``input_features``, ``input_features_mask``), or
            ``[clip, frame, mel]`` features (every frame real).
          source: ``"text"`` or ``"encoder"``.
          waveforms: the clips' waveforms (one 1-D array per clip, at ``sampling_rate``),
            drawn above the spectrogram; None leaves the waveform out.
          audio_token_id: the placeholder id (default: the cache's model's config).
          tokenizer: decodes the ids (default: the cache's model's tokenizer).
          layer, head, clip, selected_token, frame: what is shown first (``clip``: the
            first of the batch row by default).
          batch: which batch row (text source).
          layout: the tower's time layout (default: read from the model's config).
          hop_seconds: seconds between log-mel frames (10 ms for Gemma 3n and Gemma 4).
          sampling_rate: of ``waveforms``.
          embed_html: add the static `to_html` copy to the notebook output.
        """
        if not isinstance(cache, Mapping):
            raise TypeError(
                "AudioAttentionViewer takes the ActivationCache of m.run_with_cache(tokens, "
                f"input_features=...), got {type(cache).__name__}."
            )
        check_choice("source", source, list(SOURCES))
        config = getattr(getattr(cache, "model", None), "config", None)
        if layout is None:
            if config is None:
                raise ValueError(
                    "The cache has no model config to read the audio tower's layout from: "
                    "pass layout=AudioLayout(...)."
                )
            layout = AudioLayout.from_config(config)
        encoder_layers = layers_with(cache, ENCODER_PATTERN)
        if not encoder_layers and not any(str(n).startswith("audio.") for n in cache):
            raise KeyError(
                "The cache holds no audio tower hook points (audio.*): run the model with "
                "audio, m.run_with_cache(tokens, input_features=features)."
            )
        ids = np.asarray(tokens)
        ids = ids[None] if ids.ndim == 1 else ids
        if audio_token_id is None:
            audio_token_id = getattr(config, "audio_token_id", None)
            if audio_token_id is None:
                raise ValueError("Which token id marks audio positions? Pass audio_token_id=...")
        from gemmalens.vision.merge import image_runs

        runs = image_runs(ids, audio_token_id)
        features, mask = _features_and_mask(audio)
        if len(runs) != features.shape[0]:
            raise ValueError(
                f"{features.shape[0]} clips given for {len(runs)} runs of audio placeholders "
                f"(id {audio_token_id}) in the tokens; pass the features of the run."
            )
        if waveforms is not None:
            waveforms = [np.asarray(w, np.float32).reshape(-1) for w in waveforms]
            if len(waveforms) != len(runs):
                raise ValueError(f"{len(waveforms)} waveforms given for {len(runs)} clips.")
        self._layout, self._hop, self._rate = layout, float(hop_seconds), int(sampling_rate)
        self._runs, self._features, self._mask, self._waves = runs, features, mask, waveforms
        self._real_frames_in = [int(n) for n in mask.sum(1)]
        self._real_frames, self._real_tokens = real_counts(mask, layout)
        self._pictures: dict[int, str] = {}
        if source == "text":
            self._init_text(cache, ids, batch, tokenizer)
            clips = [c for c, run in enumerate(runs) if run[0] == batch]
            if not clips:
                raise ValueError(f"Batch row {batch} holds no audio placeholder run.")
        else:
            self._init_encoder(cache, encoder_layers)
            self._labels = []
            clips = list(range(len(runs)))
        self._clips = clips
        note = (
            "Bars: the chosen token's attention to each soft token, over the time it stands "
            "for; padding soft tokens (past the clip's end) cover no time."
            if source == "text"
            else "The audio tower's local attention: query frame (row) by key frame (column)."
        )
        super().__init__(
            embed_html=embed_html,
            view="audio-attention",
            title="Where the text listens in the audio"
            if source == "text"
            else "Frame-to-frame attention in the audio tower",
            tokens=self._labels,
            options={
                "layer": options_list(self._layers),
                "head": [[MEAN_HEAD, "mean"], *options_list(range(self._heads))],
                "clip": options_list(clips, lambda c: f"clip {c}"),
            },
            note=note,
            source=source,
            layer=self._layers[0] if layer is None else layer,
            head=head,
            clip=clips[0] if clip is None else clip,
            selected_token=selected_token,
            frame=frame,
        )

    # ------------------------------------------------------------------ setup

    def _init_text(self, cache: Mapping[str, Any], ids: np.ndarray, batch: int, tokenizer):
        layers = layers_with(cache, TEXT_PATTERN)
        if not layers:
            raise KeyError(
                f"AudioAttentionViewer needs {TEXT_PATTERN.format(layer='{i}')!r} in the "
                "cache. Capture them with m.run_with_cache(tokens, names=lambda n: "
                "n.endswith('attn.hook_pattern'), input_features=...)."
            )
        if not 0 <= batch < ids.shape[0]:
            raise ValueError(f"batch must be in [0, {ids.shape[0]}), got {batch}.")
        sample = np.asarray(cache[TEXT_PATTERN.format(layer=layers[0])])
        if sample.shape[-1] != ids.shape[1]:
            raise ValueError(
                f"The patterns have {sample.shape[-1]} keys but tokens has {ids.shape[1]} "
                "positions; pass the tokens of the run the cache comes from."
            )
        self._layers, self._heads, self._batch = layers, sample.shape[1], batch
        self._labels = token_labels(ids, tokenizer_of(cache, tokenizer), batch, sample.shape[2])
        self._patterns = {
            i: np.asarray(np.asarray(cache[TEXT_PATTERN.format(layer=i)])[batch], np.float32)
            for i in layers
        }

    def _init_encoder(self, cache: Mapping[str, Any], layers: list[int]) -> None:
        if not layers:
            raise KeyError(
                f"The encoder source needs {ENCODER_PATTERN.format(layer='{i}')!r} in the "
                "cache: capture them with m.run_with_cache(tokens, names=lambda n: "
                "n.startswith('audio.') and n.endswith('hook_pattern'), input_features=...)."
            )
        frames = self._layout.encoder_frames(self._features.shape[1])
        self._layers = layers
        self._patterns = {
            i: dense_encoder_pattern(cache[ENCODER_PATTERN.format(layer=i)], self._layout, frames)
            for i in layers
        }
        sample = self._patterns[layers[0]]
        if sample.shape[0] != len(self._runs):
            raise ValueError(
                f"The tower's patterns hold {sample.shape[0]} clips but the tokens "
                f"{len(self._runs)} runs of audio placeholders."
            )
        self._heads = sample.shape[1]

    # ------------------------------------------------------------------ controls

    @traitlets.validate("layer")
    def _check_layer(self, proposal: Any) -> int:
        what = "layer" if self.source == "text" else "layer (audio tower block)"
        return check_choice(what, proposal["value"], self._layers)

    @traitlets.validate("head")
    def _check_head(self, proposal: Any) -> int:
        return check_head(proposal["value"], self._heads)

    @traitlets.validate("clip")
    def _check_clip(self, proposal: Any) -> int:
        return check_choice("clip", proposal["value"], self._clips)

    @traitlets.validate("selected_token")
    def _check_selected(self, proposal: Any) -> int:
        return check_choice(
            "selected_token", proposal["value"], list(range(-1, len(self._labels))), " (-1: none)"
        )

    @traitlets.validate("frame")
    def _check_frame(self, proposal: Any) -> int:
        frames = max(self._real_frames) if self.source == "encoder" else 1
        return check_choice("frame", proposal["value"], list(range(max(frames, 1))))

    # ------------------------------------------------------------------ data

    def text_attention(
        self, layer: int | None = None, head: int | None = None, clip: int | None = None
    ) -> np.ndarray:
        """Text source: ``[query, soft token]`` attention of every token to each soft
        token of ``clip``'s run of placeholders (real ones first, then padding)."""
        if self.source != "text":
            raise ValueError("text_attention is the text source's; this viewer is 'encoder'.")
        layer = self.layer if layer is None else check_choice("layer", layer, self._layers)
        head = self.head if head is None else head
        clip = self.clip if clip is None else check_choice("clip", clip, self._clips)
        _, start, stop = self._runs[clip]
        return select_head(self._patterns[layer], head)[:, start:stop]

    def encoder_attention(
        self, layer: int | None = None, head: int | None = None, clip: int | None = None
    ) -> np.ndarray:
        """Encoder source: ``[query frame, key frame]`` attention over ``clip``'s real
        encoder frames (each `AudioLayout.time_stride` log-mel frames long)."""
        if self.source != "encoder":
            raise ValueError("encoder_attention is the encoder source's; this viewer is 'text'.")
        layer = self.layer if layer is None else check_choice("layer", layer, self._layers)
        head = self.head if head is None else head
        clip = self.clip if clip is None else check_choice("clip", clip, self._clips)
        real = self._real_frames[clip]
        return select_head(self._patterns[layer][clip], head)[:real, :real]

    def token_times(self, clip: int | None = None) -> np.ndarray:
        """``[real soft token, 2]`` start and stop seconds of each soft token of real audio
        in ``clip``: token ``j`` stands for log-mel frames ``[j * F, (j + 1) * F)``, F =
        `AudioLayout.frames_per_token` (it is the encoder frame that starts the stretch;
        Gemma 3n's tower looks back only, so it hears the first few frames of its stretch
        and what came before, and the rest of the stretch reaches the next token)."""
        clip = self.clip if clip is None else clip
        return stretches(self._real_tokens[clip], self._layout.frames_per_token, self._hop)

    def frame_times(self, clip: int | None = None) -> np.ndarray:
        """``[real encoder frame, 2]`` start and stop seconds of each encoder frame."""
        clip = self.clip if clip is None else clip
        return stretches(self._real_frames[clip], self._layout.time_stride, self._hop)

    def _spectrogram_url(self, clip: int) -> str:
        if clip not in self._pictures:
            real = self._features[clip][: self._real_frames_in[clip]]
            self._pictures[clip] = png_data_url(spectrogram_rgb(real))
        return self._pictures[clip]

    def _waveform_of(self, clip: int) -> np.ndarray | None:
        return None if self._waves is None else self._waves[clip]

    def _compute(self, controls: Mapping[str, Any]) -> dict[str, Any]:
        layer, head, clip = controls["layer"], controls["head"], controls["clip"]
        wave = self._waveform_of(clip)
        data: dict[str, Any] = {
            "duration": self._real_frames_in[clip] * self._hop,
            "spectrogram_url": self._spectrogram_url(clip),
            "waveform": np.zeros((0, 2)) if wave is None else envelope(wave),
        }
        if self.source == "text":
            heat = self.text_attention(layer, head, clip)
            _, start, stop = self._runs[clip]
            data.update(
                heat=heat,
                share=heat.sum(axis=1),
                times=self.token_times(clip),
                real_tokens=self._real_tokens[clip],
                audio_positions=list(range(start, stop)),
            )
        else:
            data.update(
                heat=self.encoder_attention(layer, head, clip),
                share=[],
                times=self.frame_times(clip),
                real_tokens=0,
                audio_positions=[],
            )
        return data

    def _static_values(self) -> dict[str, list]:
        values = super()._static_values()
        values["clip"] = list(self._clips)
        return values

    # ------------------------------------------------------------------ figure

    def _query(self) -> int:
        """The text query shown: ``selected_token``, else the last token outside audio."""
        if self.selected_token >= 0:
            return self.selected_token
        inside = set(self.audio_positions)
        query = len(self._labels) - 1
        while query > 0 and query in inside:
            query -= 1
        return query

    def figure(self, figsize: tuple[float, float] | None = None, cmap: str = "viridis") -> Figure:
        """The current state as a matplotlib figure on the clip's time axis (seconds): the
        waveform (when given), the log-mel spectrogram and, for the text source, the chosen
        token's attention per soft token; for the encoder source, the chosen frame's
        attention and the frame-by-frame attention heatmap."""
        clip, wave = self.clip, self._waveform_of(self.clip)
        head = "mean over heads" if self.head == MEAN_HEAD else f"head {self.head}"
        text = self.source == "text"
        heights = ([0.8] if wave is not None else []) + [1.3, 1.2] + ([] if text else [3.2])
        figure = _figures.new_figure(7.5, 1.2 + 1.25 * sum(heights), figsize=figsize)
        axes = list(figure.subplots(len(heights), 1, height_ratios=heights, squeeze=False)[:, 0])
        duration = self._real_frames_in[clip] * self._hop
        times = self.token_times() if text else self.frame_times()
        end = max(duration, float(times[-1, 1]) if len(times) else 0.0)
        if wave is not None:
            ax = axes.pop(0)
            ax.plot(np.arange(wave.size) / self._rate, wave, color="#4a4a4a", linewidth=0.6)
            ax.set(xlim=(0, end), ylabel="amplitude", title=f"Clip {clip}: waveform")
            ax.tick_params(labelbottom=False)
        ax = axes.pop(0)
        real = self._features[clip][: self._real_frames_in[clip]]
        ax.imshow(
            real.T,
            origin="lower",
            aspect="auto",
            cmap="magma",
            extent=(0, duration, 0, real.shape[1]),
        )
        ax.set(xlim=(0, end), ylabel="mel bin", title=f"Clip {clip}: log-mel features")
        ax.tick_params(labelbottom=False)
        ax = axes.pop(0)
        values = self.text_attention()[self._query()] if text else self.encoder_attention()[
            min(self.frame, len(times) - 1)]  # fmt: skip
        shown = values[: len(times)]
        colours = colormaps[cmap](shown / max(float(shown.max(initial=0)), 1e-12))
        ax.bar(times[:, 0], shown, width=times[:, 1] - times[:, 0], align="edge",
               color=colours, edgecolor="white", linewidth=0.5)  # fmt: skip
        ax.set(xlim=(0, end), ylabel="attention")
        if text:
            query = self._query()
            padding = float(values[len(times) :].sum())
            ax.set_title(
                f"Layer {self.layer}, {head}: token {query} {self._labels[query]!r} -> soft "
                f"tokens ({float(values.sum()):.3f} on the clip, {padding:.3f} on its "
                f"{len(values) - len(times)} padding tokens)",
                fontsize=9,
            )
            ax.set_xlabel("time (s)")
            return figure
        query = min(self.frame, len(times) - 1)
        ax.set_title(
            f"Audio block {self.layer}, {head}: frame {query} "
            f"({times[query, 0]:.2f}-{times[query, 1]:.2f} s) -> earlier frames",
            fontsize=9,
        )
        ax.tick_params(labelbottom=False)
        ax = axes.pop(0)
        matrix = self.encoder_attention()
        image = ax.imshow(
            matrix, cmap=cmap, vmin=0.0, aspect="auto", interpolation="nearest",
            extent=(0, times[-1, 1], times[-1, 1], 0),
        )  # fmt: skip
        ax.axhline((times[query, 0] + times[query, 1]) / 2, color="#d62728", linewidth=0.8)
        ax.set(xlim=(0, end), xlabel="key time (s)", ylabel="query time (s)")
        ax.set_title("Frame-to-frame attention (each row sums to 1)", fontsize=9)
        figure.colorbar(image, ax=ax, label="attention", shrink=0.8)
        return figure


__all__ = [
    "AudioAttentionViewer",
    "AudioLayout",
    "dense_encoder_pattern",
    "real_counts",
    "spectrogram_rgb",
]
