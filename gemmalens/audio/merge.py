"""How images and sound enter Gemma 3n's text stream: soft tokens in place of the image
and audio placeholders, and the hard multimodal tokens embedded by their own tables.

A Gemma 3n model loaded with its towers (``gl.load(path, vision=True, audio=True)``)
embeds like this (transformers 5.23, ``Gemma3nModel.forward``)::

    tokens [batch, seq]
      -> E[ids] * sqrt(d_model)                         (the text embedding)
      -> ids in the vision range [vision offset, audio offset): embed_vision's hard path
         (table row, RMS norm, projection, RMS norm without scale)
      -> ids in the audio range [audio offset, vocab_size): embed_audio's hard path
      -> pixel_values -> MobileNetV5 (`gemmalens.vision.mobilenetv5`)  vision.*
         [image, 2048, 16, 16] -> [image, 256, 2048] * sqrt(2048)
         -> embed_vision's soft path                    vision.hook_soft_tokens
      -> the image soft tokens at the image-token positions  hook_image_embed  [batch, seq, d]
      -> input_features -> the tower (`gemmalens.audio.gemma3n`)  audio.*
         [clip, audio_token, d_model], then per clip: the tokens of padded frames
         replaced by the hard embedding of the last text id (``vocab_size - 1``, the last
         audio row), and the clip padded with that embedding to
         ``audio_soft_tokens_per_image`` (188) tokens
      -> the soft tokens at the audio-token positions     hook_audio_embed  [batch, seq, d]
         (clip after clip, row-major over the batch; zero at other positions)
      -> at image and audio positions the soft tokens replace the embedding
      -> hook_embed: what enters block 0 (AltUp's stream 0)

The hard paths apply in every call, with or without images or audio: transformers'
multimodal model embeds the start- and end-of-audio / -image tokens (and the placeholders
themselves, before they are replaced) that way, so a model with one tower still builds
both embedders (`Gemma3nAudioEmbedderConfig`: embed_audio's hard path beside the vision
tower alone). The per-layer inputs read the original ids (every multimodal id reads row 0
of their table, `gemmalens.layers.per_layer_embeddings`), their context part the merged
embedding. Gemma 3n's attention stays causal around images and audio (no token types).

Each image fills one run of ``msfa_output_resolution**2`` (256) placeholders
(`gemmalens.vision.merge.image_side_inputs` checks them); each clip one run of
``audio_soft_tokens_per_image`` placeholders, whatever its length: 30 s of audio make 188
soft tokens, a shorter clip fewer, the rest of its run holds the padding embedding (as
Gemma 3n's processor writes 188 placeholders per clip). `audio_side_inputs` checks a
call's clips against its tokens and makes the side inputs the model reads
(``input_features``, ``input_features_mask``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from penzai import pz

from gemmalens.audio.features import AudioFeatures
from gemmalens.audio.gemma3n import (
    FEATURE_AXES,
    FEATURE_MASK_AXES,
    AudioTower,
    Gemma3nAudioConfig,
    Gemma3nAudioTowerConfig,
)
from gemmalens.layers.embeddings import take_rows
from gemmalens.layers.hooks import HookPoint
from gemmalens.layers.norms import RMSNorm
from gemmalens.layers.params import CountsParameters, ParamBuilder, ParamSource
from gemmalens.vision.merge import PIXEL_VALUES, describe_runs, image_runs, place_soft_tokens
from gemmalens.vision.mobilenetv5 import (
    MobileNetV5Config,
    MobileNetV5Tower,
    tokens_from_fused,
)

__all__ = [
    "INPUT_FEATURES",
    "INPUT_FEATURES_MASK",
    "Gemma3nAudioEmbedderConfig",
    "Gemma3nImageEncoderConfig",
    "Gemma3nMultimodalEmbedding",
    "Gemma3nVisionEmbedderConfig",
    "Gemma3nVisionTower",
    "HardTokenEmbedder",
    "audio_side_inputs",
    "real_soft_tokens",
]

# The side inputs that carry the log-mel features [clip, frame, mel] and their frame mask
# [clip, frame] (True = real audio): the feature extractor's names.
INPUT_FEATURES = "input_features"
INPUT_FEATURES_MASK = "input_features_mask"
# The processor's token types (``token_type_ids``, from ``mm_token_type_ids``).
_TYPES = {0: "text", 1: "image", 2: "video", 3: "audio"}


@dataclasses.dataclass(frozen=True)
class Gemma3nVisionEmbedderConfig(CountsParameters):
    """``embed_vision`` of Gemma 3n: the table of hard vision tokens (ids ``vocab_offset``
    to ``vocab_offset + vocab_size - 1``, the image placeholder and end-of-image among them)
    projected into the text width, and the soft path that brings the MobileNetV5 tower's
    image features there (`Gemma3nImageEncoderConfig`). A model without the tower builds
    it for the hard tokens alone, so that they embed as in transformers. Defaults: E2B's
    and E4B's."""

    text_hidden_size: int = 2048
    hidden_size: int = 2048
    vocab_size: int = 128
    vocab_offset: int = 262_144
    rms_norm_eps: float = 1e-6

    # Where the parameters live (the label prefix): ``embed_vision.``.
    SCOPE = "embed_vision"

    def build(self, source: ParamSource) -> HardTokenEmbedder:
        return build_hard_embedder(ParamBuilder(source).scope(self.SCOPE), self)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> Gemma3nVisionEmbedderConfig:
        """Reads a transformers ``gemma3n`` config dict (``vision_config`` and
        ``text_config.hidden_size``); keys it leaves out take transformers' defaults."""
        vision = hf.get("vision_config") or {}
        text = hf.get("text_config") or {}
        return cls(
            text_hidden_size=text.get("hidden_size", 2048),
            hidden_size=vision.get("hidden_size", 2048),
            vocab_size=vision.get("vocab_size", 128),
            vocab_offset=vision.get("vocab_offset", 262_144),
            rms_norm_eps=vision.get("rms_norm_eps", 1e-6),
        )


@dataclasses.dataclass(frozen=True)
class Gemma3nAudioEmbedderConfig(Gemma3nVisionEmbedderConfig):
    """``embed_audio``'s hard path alone, for a Gemma 3n model with its vision tower but
    without the audio tower: transformers embeds every id from the audio ``vocab_offset``
    on through ``embed_audio`` whether or not audio is fed (end-of-audio, the audio
    placeholder). Its labels are the audio tower's embedder's (``audio.embed.*``), so
    that it reads the same tensors. Defaults: E2B's and E4B's."""

    hidden_size: int = 1536
    vocab_offset: int = 262_272

    SCOPE = "audio.embed"

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> Gemma3nAudioEmbedderConfig:
        """Reads a transformers ``gemma3n`` config dict (``audio_config`` and
        ``text_config.hidden_size``)."""
        audio = hf.get("audio_config") or {}
        text = hf.get("text_config") or {}
        return cls(
            text_hidden_size=text.get("hidden_size", 2048),
            hidden_size=audio.get("hidden_size", 1536),
            vocab_size=audio.get("vocab_size", 128),
            vocab_offset=audio.get("vocab_offset", 262_272),
            rms_norm_eps=audio.get("rms_norm_eps", 1e-6),
        )


@dataclasses.dataclass(frozen=True)
class Gemma3nImageEncoderConfig:
    """Gemma 3n's image path: the MobileNetV5 tower (``vision``, parameters under
    ``vision.``) and ``embed_vision`` (``embedder``), whose soft path brings the tower's
    ``msfa_output_resolution**2`` tokens per image into the text width."""

    vision: MobileNetV5Config
    embedder: Gemma3nVisionEmbedderConfig

    @property
    def soft_tokens_per_image(self) -> int:
        """Placeholders per image (transformers' ``vision_soft_tokens_per_image``, 256)."""
        return self.vision.num_soft_tokens

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> Gemma3nImageEncoderConfig:
        """Reads a transformers ``gemma3n`` config dict (``vision_config``,
        ``text_config.hidden_size``, ``vision_soft_tokens_per_image``)."""
        config = cls(
            MobileNetV5Config.from_hf(hf.get("vision_config") or {}),
            Gemma3nVisionEmbedderConfig.from_hf(hf),
        )
        expected = hf.get("vision_soft_tokens_per_image", config.soft_tokens_per_image)
        if expected != config.soft_tokens_per_image:
            raise ValueError(
                f"vision_soft_tokens_per_image is {expected}, but the tower makes "
                f"msfa_output_resolution**2 = {config.soft_tokens_per_image} soft tokens per "
                "image; they must match."
            )
        if config.vision.hidden_size != config.embedder.hidden_size:
            raise ValueError(
                f"The tower writes {config.vision.hidden_size} channels but embed_vision "
                f"reads {config.embedder.hidden_size}; they must match."
            )
        return config


@pz.pytree_dataclass
class HardTokenEmbedder(pz.nn.Layer):
    """``Gemma3nMultimodalEmbedder`` as a layer: called on ids ``[batch, seq]`` in
    ``[vocab_offset, vocab_offset + vocab)``, the hard path -> ``[batch, seq, embedding]``
    (text width): table row, ``hard_embedding_norm``, ``embedding_projection``, RMS norm
    without scale. `embed_soft` is the soft path (image features).

    ``soft_embedding_norm`` is always built, so that every tensor of ``embed_vision`` is
    read and counted, also by a model without the vision tower.
    """

    embedding: pz.nn.ParameterLike[pz.nx.NamedArray]
    hard_embedding_norm: RMSNorm
    soft_embedding_norm: RMSNorm
    project: pz.nn.Sequential
    vocab_offset: int = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, ids: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        table = self.embedding.value
        rows = take_rows(table, ids, lambda i: i - self.vocab_offset)
        return self.project(self.hard_embedding_norm(rows))

    def embed_ids(self, ids: pz.nx.NamedArray) -> pz.nx.NamedArray:
        """The hard path (the name `gemmalens.audio.gemma3n.AudioEmbedder` gives it)."""
        return self(ids)

    def embed_soft(self, x: pz.nx.NamedArray) -> pz.nx.NamedArray:
        """The soft path (image features, ``[..., embedding]`` of the vision width ->
        the text width): ``soft_embedding_norm``, ``embedding_projection``, RMS norm
        without scale (`gemmalens.vision.mobilenetv5`)."""
        return self.project(self.soft_embedding_norm(x))


def _projection(params: ParamBuilder, width: int, text_width: int, eps: float):
    return pz.nn.Sequential(
        [
            pz.nn.RenameAxes("embedding", "multimodal_embedding"),
            params.linear(
                "embedding_projection", {"embedding": text_width}, {"multimodal_embedding": width}
            ),
            RMSNorm.build(
                params, "embedding_post_projection_norm", "embedding", text_width, eps, "none"
            ),
        ]
    )


def build_hard_embedder(
    params: ParamBuilder, config: Gemma3nVisionEmbedderConfig
) -> HardTokenEmbedder:
    """The hard-token embedder, parameters under ``params`` (``embed_vision.``)."""
    width, eps = config.hidden_size, config.rms_norm_eps
    return HardTokenEmbedder(
        embedding=params(
            "embedding.embeddings", {"vocab": config.vocab_size}, {"embedding": width}
        ),
        hard_embedding_norm=RMSNorm.build(
            params, "hard_embedding_norm", "embedding", width, eps, "plain"
        ),
        soft_embedding_norm=RMSNorm.build(
            params, "soft_embedding_norm", "embedding", width, eps, "plain"
        ),
        project=_projection(params, width, config.text_hidden_size, eps),
        vocab_offset=config.vocab_offset,
    )


def _where(mask: pz.nx.NamedArray, a: pz.nx.NamedArray, b: pz.nx.NamedArray) -> pz.nx.NamedArray:
    return pz.nx.nmap(jnp.where)(mask, a, b)


@pz.pytree_dataclass
class Gemma3nVisionTower(pz.nn.Layer):
    """The MobileNetV5 tower and the soft tokens it makes: pixel values ``[image, channel,
    height, width]`` -> fused features (``vision.*``) -> ``[image, image_token, embedding]``
    in the tower's width, times sqrt(width) as transformers scales them. ``embed_vision``'s
    soft path, which shares its parameters with the hard tokens, is applied by
    `Gemma3nMultimodalEmbedding`."""

    encoder: MobileNetV5Tower
    width: int = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, pixels: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        return tokens_from_fused(self.encoder(pixels, **side_inputs), self.width)


@pz.pytree_dataclass
class Gemma3nMultimodalEmbedding(pz.nn.Layer):
    """Gemma 3n's multimodal embedding: the token embedding, the hard vision and audio
    tokens through their embedders, the images' and the clips' soft tokens at their
    placeholders.

    Input: token ids (named axes ``batch``, ``seq``). Side inputs ``pixel_values``
    (``batch`` (one per image), ``channel``, ``height``, ``width``), ``input_features``
    (``batch`` (one per clip), ``frame``, ``mel``) and ``input_features_mask`` (``batch``,
    ``frame``; True = real audio); without them only the hard paths apply.
    Output: ``[batch, seq, embedding]``.

    Attributes:
      embed: the scaled token embedding (`gemmalens.layers.embeddings.EmbedTokens`).
      vision_hard: ``embed_vision`` (hard path for ids in ``[vision offset, audio
        offset)``, soft path for the images), or None (a model without it embeds those
        ids as text).
      audio_hard: ``embed_audio``'s hard path where the model has no audio tower (the
        tower's embedder serves otherwise), or None.
      vision: the MobileNetV5 tower (hook points ``vision.*``), or None.
      hook_vision_soft_tokens: ``vision.hook_soft_tokens``, each image's soft tokens in
        the text width (``[image, image_token, embedding]``, embed_vision's soft path).
      hook_image_embed: the image soft tokens at their positions (zero elsewhere).
      audio: the audio tower and ``embed_audio`` (hook points ``audio.*``), or None.
      hook_audio_embed: the audio soft tokens at their positions (zero elsewhere); what
        it holds at audio-token positions is what the stream gets there.
      image_token_id, audio_token_id: the placeholder ids (262145, 262273 released).
      padding_id: the hard id whose embedding stands for padded audio soft tokens: the
        last text id, ``vocab_size - 1`` (the last audio row), as transformers takes it.
      soft_tokens_per_clip: ``audio_soft_tokens_per_image`` (188): each clip's run length.
    """

    embed: pz.nn.Layer
    vision_hard: HardTokenEmbedder | None
    audio_hard: HardTokenEmbedder | None
    vision: Gemma3nVisionTower | None
    hook_vision_soft_tokens: HookPoint | None
    hook_image_embed: HookPoint | None
    audio: AudioTower | None
    hook_audio_embed: HookPoint | None
    image_token_id: int = dataclasses.field(metadata={"pytree_node": False})
    audio_token_id: int = dataclasses.field(metadata={"pytree_node": False})
    padding_id: int = dataclasses.field(metadata={"pytree_node": False})
    soft_tokens_per_clip: int = dataclasses.field(metadata={"pytree_node": False})

    @property
    def audio_ids(self) -> Any:
        """What embeds the hard audio ids: the tower's embedder, or ``audio_hard``."""
        return self.audio_hard if self.audio is None else self.audio.embedder

    def __call__(self, tokens: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        embedded = self.embed(tokens, **side_inputs)
        dtype = embedded.dtype
        audio_offset = self.audio_ids.vocab_offset
        if self.vision_hard is not None:
            in_range = (tokens >= self.vision_hard.vocab_offset) & (tokens < audio_offset)
            ids = _where(in_range, tokens, self.vision_hard.vocab_offset)
            embedded = _where(in_range, self.vision_hard(ids).astype(dtype), embedded)
        is_hard_audio = tokens >= audio_offset
        ids = _where(is_hard_audio, tokens, self.padding_id)
        embedded = _where(is_hard_audio, self.audio_ids.embed_ids(ids).astype(dtype), embedded)
        # Images first, then audio, as transformers merges them (their positions differ).
        if self.vision is not None and side_inputs.get(PIXEL_VALUES) is not None:
            embedded = self._merge_images(tokens, embedded, side_inputs)
        if self.audio is not None and side_inputs.get(INPUT_FEATURES) is not None:
            embedded = self._merge_audio(tokens, embedded, side_inputs)
        return embedded

    def _merge_images(
        self, tokens: pz.nx.NamedArray, embedded: pz.nx.NamedArray, side_inputs: dict
    ) -> pz.nx.NamedArray:
        # The tower sees only the pixels: the text's masks and positions are not its own.
        features = self.vision(side_inputs[PIXEL_VALUES])
        soft = self.hook_vision_soft_tokens(self.vision_hard.embed_soft(features), **side_inputs)
        soft = soft.unwrap("batch", "image_token", "embedding").astype(embedded.dtype)
        # Every image fills its run of msfa_output_resolution**2 placeholders (checked on
        # the host by image_side_inputs).
        is_image = tokens == self.image_token_id
        placed = place_soft_tokens(is_image.unwrap("batch", "seq"), soft)
        placed = self.hook_image_embed(
            pz.nx.wrap(placed).tag("batch", "seq", "embedding"), **side_inputs
        )
        return _where(is_image, placed, embedded)

    def _merge_audio(
        self, tokens: pz.nx.NamedArray, embedded: pz.nx.NamedArray, side_inputs: dict
    ) -> pz.nx.NamedArray:
        dtype = embedded.dtype
        audio_embedder = self.audio.embedder
        # The tower sees only its own inputs: the text's masks and positions are not its own.
        soft, valid = self.audio(side_inputs[INPUT_FEATURES], side_inputs.get(INPUT_FEATURES_MASK))
        soft = soft.unwrap("batch", "audio_token", "embedding").astype(dtype)
        valid = valid.unwrap("batch", "audio_token")
        padding = audio_embedder.embed_ids(jnp.full((1, 1), self.padding_id, jnp.int32))
        padding = padding.unwrap("batch", "seq", "embedding")[0, 0].astype(dtype)
        clips, count, width = soft.shape
        soft = jnp.where(valid[..., None], soft, padding)
        # Every clip fills its run of soft_tokens_per_clip placeholders (checked on the
        # host: count <= soft_tokens_per_clip).
        extra = jnp.broadcast_to(padding, (clips, self.soft_tokens_per_clip - count, width))
        soft = jnp.concatenate([soft, extra], axis=1)
        is_audio = tokens == self.audio_token_id
        placed = place_soft_tokens(is_audio.unwrap("batch", "seq"), soft)
        placed = self.hook_audio_embed(
            pz.nx.wrap(placed).tag("batch", "seq", "embedding"), **side_inputs
        )
        return _where(is_audio, placed, embedded)


def build_embedding(
    params: ParamBuilder,
    source: ParamSource,
    embed: pz.nn.Layer,
    audio: Gemma3nAudioTowerConfig | None,
    vision_embedder: Gemma3nVisionEmbedderConfig | None,
    audio_token_id: int,
    padding_id: int,
    soft_tokens_per_clip: int,
    vision: Gemma3nImageEncoderConfig | None = None,
    audio_embedder: Gemma3nAudioEmbedderConfig | None = None,
    image_token_id: int = 262_145,
) -> Gemma3nMultimodalEmbedding:
    """`Gemma3nMultimodalEmbedding` around ``embed``: the towers' parameters under
    ``vision.`` and ``audio.``, ``embed_vision``'s under ``embed_vision.`` (where
    ``vision`` is set its embedder is ``vision_embedder``), ``embed_audio``'s hard path
    under ``audio.embed.`` without the audio tower; the hooks ``vision.hook_soft_tokens``,
    ``hook_image_embed`` and ``hook_audio_embed`` for the towers built."""
    embed_hook = lambda name: params.hook(name, ("batch", "seq", "embedding"))  # noqa: E731
    tower = None
    if vision is not None:
        tower = Gemma3nVisionTower(vision.vision.build(source), vision.vision.hidden_size)
    return Gemma3nMultimodalEmbedding(
        embed=embed,
        vision_hard=None if vision_embedder is None else vision_embedder.build(source),
        audio_hard=None if audio is not None else audio_embedder.build(source),
        vision=tower,
        hook_vision_soft_tokens=None
        if vision is None
        else params.hook("vision.hook_soft_tokens", ("batch", "image_token", "embedding")),
        hook_image_embed=None if vision is None else embed_hook("hook_image_embed"),
        audio=None if audio is None else audio.build(source),
        hook_audio_embed=None if audio is None else embed_hook("hook_audio_embed"),
        image_token_id=image_token_id,
        audio_token_id=audio_token_id,
        padding_id=padding_id,
        soft_tokens_per_clip=soft_tokens_per_clip,
    )


# ------------------------------------------------------------------------ the call's inputs


def real_soft_tokens(mask: np.ndarray, audio: Gemma3nAudioConfig) -> list[int]:
    """How many soft tokens of real audio each clip gives (the encoder's output mask,
    computed on the host): ``mask`` ``[clip, frame]``, True = real."""
    mask = np.asarray(mask, bool)
    frames = mask.shape[1]
    seq = audio.subsampled_frames(frames)
    index = np.minimum(np.arange(seq) * audio.time_stride, frames - 1)
    kept = mask[:, index][:, :: audio.conf_reduction_factor]
    return [int(n) for n in kept.sum(axis=1)]


def _no_tower_message(config: Any) -> str:
    family = getattr(config, "family", None)
    if family == "gemma3n":
        return (
            "This Gemma 3n model has no audio tower (it was loaded text-only, the default, or "
            "built without one), so it takes no input_features. Load a Gemma 3n checkpoint "
            "with its audio tower with gl.load(path, audio=True) "
            "(Gemma3nForConditionalGeneration files, model_type 'gemma3n'), or build from a "
            "config with audio (gemmalens.presets.gemma3n_with_audio('gemma3n_e2b'))."
        )
    if family == "gemma4":
        return (
            "This Gemma 4 model has no audio tower (it was loaded without it, the default, or "
            "built without one), so it takes no input_features. Load a Gemma 4 checkpoint with "
            "its audio tower with gl.load(path, audio=True) (Gemma4ForConditionalGeneration "
            "files with an audio_config: E2B, E4B), or build from a config with audio "
            "(gemmalens.presets.gemma4_with_audio('gemma4_e2b'))."
        )
    family = family or type(config).__name__
    return (
        f"This {family} model takes no input_features: gemmalens implements audio input for "
        "Gemma 3n and Gemma 4 (E2B, E4B) so far (gl.load(path, audio=True))."
    )


def feature_arrays(
    input_features: Any, input_features_mask: Any, mel: int, maker: str
) -> tuple[np.ndarray, np.ndarray]:
    """One call's clips as ``(features [clip, frame, mel] float32, mask [clip, frame]
    bool)``, checked: ``input_features`` an `AudioFeatures`, a feature extractor's output
    (a mapping holding the mask) or an array; ``mel`` the tower's input_feat_size;
    ``maker`` the function users make features with (``"gemma3n_audio_features"``), named
    in the messages. A missing mask means every frame is real."""
    if isinstance(input_features, AudioFeatures):  # the features function's result
        if input_features_mask is not None:
            raise ValueError(
                "input_features_mask was given twice: in the AudioFeatures passed as "
                "input_features and on its own; give it once."
            )
        input_features, input_features_mask = input_features.features, input_features.mask
    elif isinstance(input_features, Mapping):  # a feature extractor's or processor's output
        if "input_features" not in input_features:
            raise ValueError(
                f"input_features is a mapping without an 'input_features' entry (keys "
                f"{sorted(input_features)}); pass {maker}' result, the feature "
                "extractor's output or the array."
            )
        if "input_features_mask" in input_features:
            if input_features_mask is not None:
                raise ValueError(
                    "input_features_mask was given twice: in the input_features mapping and "
                    "on its own; give it once."
                )
            input_features_mask = input_features["input_features_mask"]
        input_features = input_features["input_features"]
    features = np.asarray(input_features)
    expected = (
        f"[num_clips, frames, {mel}] log-mel features ({mel} mel bins: the tower's "
        f"input_feat_size), as gemmalens.audio.{maker}(waveforms) makes them"
    )
    if features.ndim == 2 and features.shape[-1] == mel:
        raise ValueError(
            f"input_features has shape {features.shape}, one clip without its clip axis; "
            f"the model takes {expected}: use features[None]."
        )
    if features.ndim != 3 or features.shape[-1] != mel or 0 in features.shape:
        raise ValueError(f"input_features must be {expected}; got shape {features.shape}.")
    if not np.issubdtype(features.dtype, np.floating):
        raise TypeError(f"input_features must be floats (log-mels), got dtype {features.dtype}.")
    if input_features_mask is None:
        mask = np.ones(features.shape[:2], bool)
    else:
        mask = np.asarray(input_features_mask)
        if mask.shape != features.shape[:2]:
            raise ValueError(
                f"input_features_mask has shape {mask.shape}; for input_features of shape "
                f"{features.shape} it must be {features.shape[:2]} (True = real audio)."
            )
        if not (mask.dtype == bool or np.isin(mask, (0, 1)).all()):
            raise ValueError(
                "input_features_mask must hold booleans (or 0 / 1): True = real audio."
            )
    return features.astype(np.float32), mask.astype(bool)


def _check_token_types(config: Any, tokens: np.ndarray, types: Any) -> None:
    """The processor's token types (0 text, 1 image, 2 video, 3 audio) agree with the
    placeholders, and image placeholders meet a vision tower. Gemma 3n reads no types (its
    attention is causal throughout)."""
    image_id = getattr(config, "image_token_id", None)
    no_vision = getattr(config, "vision", None) is None and getattr(config, "audio", None)
    if no_vision and image_id is not None and (tokens == image_id).any():
        # The text model (no towers) reads them as text, as Gemma3nForCausalLM does.
        from gemmalens.vision.merge import _no_tower_message as no_vision_tower

        raise ValueError(
            f"The tokens hold image placeholders (id {image_id}). " + no_vision_tower(config)
        )
    if types is None:
        return
    types = np.asarray(types)
    if types.shape != tokens.shape:
        raise ValueError(
            f"token_type_ids has shape {types.shape} but tokens have shape {tokens.shape}; "
            "they must match (0 text, 1 image, 3 audio, as Gemma3nProcessor returns them)."
        )
    if not np.isin(types, tuple(_TYPES)).all():
        raise ValueError("token_type_ids must hold 0 (text), 1 (image), 2 (video) or 3 (audio).")
    if (types == 2).any():
        raise NotImplementedError(
            "token_type_ids mark video tokens (2): Gemma 3n's processor takes images and "
            "audio; gemmalens has no video path."
        )
    if (types == 1).any() and getattr(config, "vision", None) is None:
        from gemmalens.vision.merge import _no_tower_message as no_vision_tower

        raise ValueError(no_vision_tower(config))
    if image_id is not None and not np.array_equal(types == 1, tokens == image_id):
        raise ValueError(
            f"token_type_ids mark images (1) elsewhere than the image tokens (id {image_id}); "
            "pass the processor's token_type_ids with its input_ids, or leave them out."
        )
    audio_id = getattr(config, "audio_token_id", None)
    if (types == 3).any() and getattr(config, "audio", None) is None:
        raise ValueError(_no_tower_message(config))
    if audio_id is not None and not np.array_equal(types == 3, tokens == audio_id):
        raise ValueError(
            f"token_type_ids mark audio (3) elsewhere than the audio tokens (id {audio_id}); "
            "pass the processor's token_type_ids with its input_ids, or leave them out."
        )


def audio_side_inputs(
    config: Any,
    tokens: np.ndarray,
    input_features: Any = None,
    input_features_mask: Any = None,
    token_type_ids: Any = None,
) -> dict[str, pz.nx.NamedArray] | None:
    """Checks one call's audio against its tokens and returns the side inputs the model
    reads (``input_features``, ``input_features_mask``), or None for a call without audio.
    Gemma 3n's rules are below; a Gemma 4 config goes to `gemmalens.audio.gemma4`'s.

    Args:
      config: the model's config; ``config.audio`` is its tower (None: no tower).
      tokens: ``[batch, seq]`` ids, with ``audio_soft_tokens_per_image`` placeholder ids
        (``config.audio_token_id``) for each clip, between start- and end-of-audio tokens,
        as Gemma 3n's processor writes them.
      input_features: ``[num_clips, frames, mel]`` log-mels, clips in the order of their
        runs, row-major over the batch: `gemmalens.audio.gemma3n_audio_features`' result
        (which holds the mask), a feature extractor's output (a mapping with
        ``input_features`` and ``input_features_mask``), or the array; or None.
      input_features_mask: ``[num_clips, frames]``, True for real audio (the feature
        extractor's convention); None: every frame is real.
      token_type_ids: the processor's types (0 text, 1 image, 3 audio), checked against
        the placeholders and otherwise unused.

    Raises:
      ValueError: input_features for a model without an audio tower, audio tokens without
        input_features, input_features without audio tokens, a number of runs other than
        the number of clips, a run whose length is not ``audio_soft_tokens_per_image``,
        clips too long for it, a wrong feature or mask shape.
      NotImplementedError: video token types (Gemma 3n has no video path).
    """
    if getattr(config, "family", None) == "gemma4":  # its clips fill runs of their own length
        from gemmalens.audio import gemma4

        return gemma4.audio_side_inputs(
            config, tokens, input_features, input_features_mask, token_type_ids
        )
    tokens = np.asarray(tokens)
    tower = getattr(config, "audio", None)
    if getattr(config, "family", None) == "gemma3n":
        _check_token_types(config, tokens, token_type_ids)
    if tower is None:
        if input_features is not None or input_features_mask is not None:
            raise ValueError(_no_tower_message(config))
        return None
    audio_id, per_clip = config.audio_token_id, config.audio_soft_tokens_per_image
    runs = image_runs(tokens, audio_id)
    if input_features is None:
        if input_features_mask is not None:
            raise ValueError("input_features_mask was given without input_features.")
        if runs:
            count = sum(b - a for _, a, b in runs)
            raise ValueError(
                f"tokens hold {count} audio token(s) (id {audio_id}) in {len(runs)} run(s) but "
                "no input_features were given: pass input_features=gemma3n_audio_features("
                "waveforms) (gemmalens.audio; or the feature extractor's input_features and "
                "input_features_mask), one clip per run, or take the audio tokens out of the "
                "prompt."
            )
        return None
    features, mask = feature_arrays(
        input_features, input_features_mask, tower.audio.input_feat_size, "gemma3n_audio_features"
    )
    clips, frames = features.shape[:2]
    encoded = tower.audio.num_soft_tokens(frames)
    if encoded > per_clip:
        raise ValueError(
            f"input_features hold {frames} frames per clip, which the audio tower turns into "
            f"{encoded} soft tokens; Gemma 3n places audio_soft_tokens_per_image = {per_clip} "
            "per clip (30 s of audio in the released models). Cut the clips shorter "
            "(gemma3n_audio_features cuts at max_length = 30 s)."
        )
    real = real_soft_tokens(mask, tower.audio)
    per_clip_text = ", ".join(f"clip {i}: {n}" for i, n in enumerate(real))
    if not runs:
        raise ValueError(
            f"input_features hold {clips} clip(s) but the tokens have no audio tokens (id "
            f"{audio_id}): each clip needs its own run of audio_soft_tokens_per_image = "
            f"{per_clip} audio tokens, between start- and end-of-audio tokens, as Gemma 3n's "
            "processor writes them."
        )
    if len(runs) != clips:
        raise ValueError(
            f"tokens hold {len(runs)} run(s) of audio tokens (id {audio_id}) but input_features "
            f"has {clips} clip(s); each clip needs its own run of {per_clip} audio tokens, "
            f"between start- and end-of-audio tokens. Runs: {describe_runs(runs)}."
        )
    wrong = [run for run in runs if run[2] - run[1] != per_clip]
    if wrong:
        raise ValueError(
            f"Each clip takes audio_soft_tokens_per_image = {per_clip} consecutive audio "
            f"tokens (id {audio_id}): its soft tokens of real audio ({per_clip_text}), then "
            f"padding. These runs differ: {describe_runs(wrong)}. Two clips need text "
            "between their runs (the processor puts end- and start-of-audio tokens there)."
        )
    return {
        INPUT_FEATURES: pz.nx.wrap(jnp.asarray(features)).tag(*FEATURE_AXES),
        INPUT_FEATURES_MASK: pz.nx.wrap(jnp.asarray(mask)).tag(*FEATURE_MASK_AXES),
    }
