"""Gemma 3n checkpoint names: gemmalens labels <-> transformers tensor names.

``Gemma3nForCausalLM`` files store the text decoder under ``model.``; the released E2B/E4B
(``Gemma3nForConditionalGeneration``) under ``model.language_model.``, beside the vision
and audio towers, which the text model does not read. Those files also hold key/value
projections for the KV-sharing layers, which never use them (transformers ignores them too).
With ``audio=True`` the audio tower and ``embed_audio`` are read too (``audio.*`` labels,
named by `gemmalens.audio.gemma3n.hf_name`), and ``embed_vision`` (``embed_vision.*``)
where the file has it. With ``vision=True`` the MobileNetV5 tower (``vision.*``, named by
`gemmalens.vision.mobilenetv5.hf_name`) and ``embed_vision``; without ``audio=True`` also
``embed_audio`` (its hard path: transformers embeds the audio ids through it).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
from penzai import pz

from gemmalens.audio import gemma3n as audio_names
from gemmalens.audio.merge import (
    Gemma3nAudioEmbedderConfig,
    Gemma3nImageEncoderConfig,
    Gemma3nVisionEmbedderConfig,
)
from gemmalens.checkpoints import gemma3
from gemmalens.checkpoints.parameters import build_from_checkpoint, find_prefix, text_config
from gemmalens.checkpoints.safetensors_files import CheckpointDir, CheckpointError
from gemmalens.families.gemma3n import Gemma3nConfig
from gemmalens.vision import mobilenetv5

TEXT_PREFIXES = ("model.", "model.language_model.", "language_model.model.")
VISION_EMBEDDER_PREFIXES = ("model.embed_vision.", "embed_vision.")
VISION_TOWER_PREFIXES = (mobilenetv5.HUB_TOWER_PREFIX, "vision_tower.timm_model.")

# Labels particular to Gemma 3n; the rest follow the Gemma 3 rules (blocks.N -> layers.N, ...).
_RENAMES = [
    (r"^per_layer_inputs\.token_table$", "embed_tokens_per_layer.weight"),
    (r"^per_layer_inputs\.model_projection\.weights$", "per_layer_model_projection.weight"),
    (r"^per_layer_inputs\.projection_norm\.scale$", "per_layer_projection_norm.weight"),
    (r"^altup_expand\.(\d+)\.", r"altup_projections.\1."),
    (r"^altup_collapse\.(\d+)\.", r"altup_unembed_projections.\1."),
]
_UNUSED_SHARED_KV = re.compile(r"layers\.(\d+)\.self_attn\.(k_proj|v_proj|k_norm|v_norm)\.weight$")


def hf_name(label: str) -> str:
    """``blocks.3.altup.modality_router.weights`` -> ``layers.3.altup.modality_router.weight``."""
    for pattern, replacement in _RENAMES:
        label = re.sub(pattern, replacement, label)
    return gemma3.hf_name(label)


def text_prefix(ckpt: CheckpointDir) -> str:
    """The prefix under which this checkpoint stores the text decoder."""
    return find_prefix(ckpt, TEXT_PREFIXES, "embed_tokens_per_layer.weight", "Gemma 3n")


def ignored_tensors(prefix: str, config: Gemma3nConfig) -> Callable[[str], bool]:
    """Tensors the text model does not read: the tied ``lm_head``, everything outside the
    text decoder (vision and audio towers and embedders), and the key/value projections
    stored for KV-sharing layers."""
    consumers = {i for i, source in enumerate(config.kv_sources) if source is not None}

    def ignore(key: str) -> bool:
        if key.endswith("lm_head.weight") or not key.startswith(prefix):
            return True
        unused = _UNUSED_SHARED_KV.fullmatch(key[len(prefix) :])
        return unused is not None and int(unused.group(1)) in consumers

    return ignore


def vision_embedder_prefix(ckpt: CheckpointDir) -> str | None:
    """Where the checkpoint keeps ``embed_vision``, or None (an audio-only file)."""
    for prefix in VISION_EMBEDDER_PREFIXES:
        if prefix + "embedding.weight" in ckpt:
            return prefix
    return None


def with_towers(
    ckpt: CheckpointDir, config: Gemma3nConfig, audio: bool, vision: bool
) -> Gemma3nConfig:
    """``config`` with the towers asked for, the embedders they need and the placeholder
    ids of a ``gemma3n`` checkpoint: ``audio`` adds the audio tower, ``embed_audio`` and
    ``embed_vision``'s hard path (when the file has it); ``vision`` the MobileNetV5 tower
    and ``embed_vision``, and without ``audio`` ``embed_audio``'s hard path."""
    hf = ckpt.config
    if hf.get("model_type") != "gemma3n":
        asked = " and ".join(t for t, on in (("audio", audio), ("vision", vision)) if on)
        raise CheckpointError(
            f"{ckpt.path} is a text-only Gemma 3n checkpoint (model_type "
            f"{hf.get('model_type')!r}, architectures {hf.get('architectures')}): it has no "
            f"{asked} tower. Load it without {asked}=True; Gemma3nForConditionalGeneration "
            "checkpoints (model_type 'gemma3n') have them."
        )
    changes: dict = dict(
        audio_token_id=int(hf.get("audio_token_id", 262_273)),
        image_token_id=int(hf.get("image_token_id", 262_145)),
        audio_soft_tokens_per_image=int(hf.get("audio_soft_tokens_per_image", 188)),
    )
    try:
        if audio:
            changes["audio"] = audio_names.Gemma3nAudioTowerConfig.from_hf(hf)
            if vision_embedder_prefix(ckpt) is not None:
                changes["vision_embedder"] = Gemma3nVisionEmbedderConfig.from_hf(hf)
        if vision:
            changes["vision"] = Gemma3nImageEncoderConfig.from_hf(hf)
            changes["vision_embedder"] = changes["vision"].embedder
            if not audio:
                changes["audio_embedder"] = Gemma3nAudioEmbedderConfig.from_hf(hf)
        return dataclasses.replace(config, **changes)
    except ValueError as error:
        raise CheckpointError(f"{ckpt.path}: {error}") from None


def with_audio(ckpt: CheckpointDir, config: Gemma3nConfig) -> Gemma3nConfig:
    """``config`` with the audio tower (`with_towers`)."""
    return with_towers(ckpt, config, audio=True, vision=False)


def _vision_hf_name(label: str, prefix: str) -> str:
    """``embed_vision.embedding.embeddings`` -> ``{prefix}embedding.weight``."""
    name = label.removeprefix("embed_vision.")
    return prefix + re.sub(r"\.(weights|scale|embeddings)$", ".weight", name)


def _tower_prefixes(ckpt: CheckpointDir, audio: bool, vision: bool) -> dict[str, str]:
    """Where the file keeps what the towers asked for read: ``{"audio", "embed_audio",
    "vision", "embed_vision"}`` -> prefix (``embed_vision`` beside audio only when the file
    has it). Raises a `CheckpointError` that says what is missing."""
    parts: dict[str, tuple[tuple[str, ...], str, str]] = {
        "embed_audio": (
            (audio_names.HUB_EMBEDDER_PREFIX, "embed_audio."),
            "embedding_projection.weight",
            "Gemma 3n audio embedder",
        ),
    }
    if audio:
        parts["audio"] = (
            (audio_names.HUB_AUDIO_PREFIX, "audio_tower."),
            "subsample_conv_projection.input_proj_linear.weight",
            "Gemma 3n audio",
        )
    if vision:
        parts["vision"] = (VISION_TOWER_PREFIXES, "conv_stem.conv.weight", "Gemma 3n vision")
        parts["embed_vision"] = (
            VISION_EMBEDDER_PREFIXES,
            "embedding.weight",
            "Gemma 3n vision embedder",
        )
    prefixes = {}
    for part, (candidates, probe, what) in parts.items():
        try:
            prefixes[part] = find_prefix(ckpt, candidates, probe, what)
        except CheckpointError as error:
            asked = "audio=True" if part in ("audio", "embed_audio") and audio else "vision=True"
            needs = {
                "audio": "its audio tower",
                "embed_audio": "embed_audio (the hard audio tokens go through it)",
                "vision": "its vision tower",
                "embed_vision": "embed_vision",
            }[part]
            raise CheckpointError(
                f"{asked}, but this Gemma 3n checkpoint lacks {needs}: {error} Load it "
                f"without {asked} to run the rest."
            ) from None
    if audio and not vision:
        found = vision_embedder_prefix(ckpt)
        if found is not None:
            prefixes["embed_vision"] = found
    return prefixes


def load_checkpoint(
    ckpt: CheckpointDir,
    dtype: jnp.dtype,
    show_progress: bool | None,
    audio: bool = False,
    vision: bool = False,
) -> tuple[pz.nn.Layer, Gemma3nConfig]:
    """Builds the Gemma 3n text decoder of a ``gemma3n_text`` or ``gemma3n`` checkpoint;
    with ``audio``, the audio tower, ``embed_audio`` and ``embed_vision`` of a ``gemma3n``
    one too; with ``vision``, the MobileNetV5 tower and ``embed_vision`` (and
    ``embed_audio``'s hard path).

    Both apply the final soft-cap (30); the multimodal model's text ids beyond
    ``vocab_size_per_layer_input`` read per-layer-embedding row 0.
    """
    hf = text_config(ckpt, "gemma3n", "Gemma 3n")
    try:
        config = Gemma3nConfig.from_hf(hf)
    except ValueError as error:
        raise CheckpointError(
            f"{ckpt.path}/config.json does not describe a valid Gemma 3n text decoder: {error}"
        ) from None
    if audio or vision:
        config = with_towers(ckpt, config, audio, vision)
    prefix = text_prefix(ckpt)
    ignore_text = ignored_tensors(prefix, config)

    def key_for(label: str) -> str:
        return prefix + hf_name(label)

    ignore = ignore_text
    if audio or vision:
        towers = _tower_prefixes(ckpt, audio, vision)
        read = tuple(towers.values())

        def key_for(label: str) -> str:
            if label.startswith("audio."):
                return audio_names.hf_name(label, towers.get("audio", ""), towers["embed_audio"])
            if label.startswith("vision."):
                return mobilenetv5.hf_name(label, towers["vision"])
            if label.startswith("embed_vision."):
                return _vision_hf_name(label, towers["embed_vision"])
            return prefix + hf_name(label)

        def ignore(key: str) -> bool:
            # What the text model skips (the towers among it), except the towers and
            # embedders asked for: every one of their tensors is read.
            return ignore_text(key) and not key.startswith(read)

    model = build_from_checkpoint(
        ckpt,
        config.build,
        key_for,
        dtype,
        ignore=ignore,
        show_progress=show_progress,
    )
    return model, config


def to_file_layout(tensors: dict[str, np.ndarray], config: Gemma3nConfig) -> dict[str, np.ndarray]:
    """Adds the key/value projections that KV-sharing layers carry in transformers' files
    (it builds them for every layer) but never use: zeros shaped like their producer's."""
    out = dict(tensors)
    for consumer, producer in enumerate(config.kv_sources):
        if producer is None:
            continue
        for name in ("k_proj.weight", "v_proj.weight", "k_norm.weight"):
            source = f"model.layers.{producer}.self_attn.{name}"
            if source in tensors:
                out[f"model.layers.{consumer}.self_attn.{name}"] = np.zeros_like(tensors[source])
    return out
