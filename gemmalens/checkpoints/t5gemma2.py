"""T5Gemma 2 checkpoint names: gemmalens labels <-> transformers tensor names.

The text stacks' labels map here; the encoder's vision tower (``encoder.vision.*``, read
only when loading with ``vision=True``) maps through `gemmalens.vision.siglip.hf_name`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import jax.numpy as jnp
from penzai import pz

from gemmalens.checkpoints.parameters import build_from_checkpoint, find_prefix
from gemmalens.checkpoints.safetensors_files import CheckpointDir, CheckpointError
from gemmalens.families.t5gemma2 import T5Gemma2Config
from gemmalens.vision import siglip

# transformers 5.23 writes the encoder's text stack under "model.encoder."; in memory (and
# possibly in other writers' files) it sits under "model.encoder.text_model.".
ENCODER_PREFIXES = ("model.encoder.", "model.encoder.text_model.")
DECODER_PREFIX = "model.decoder."
# The encoder's SigLIP tower: transformers 5.23 drops ``vision_model.`` when saving; other
# writers keep it. The projector is stored under one name.
VISION_PREFIXES = ("model.encoder.vision_tower.vision_model.", "model.encoder.vision_tower.")
PROJECTOR_PREFIXES = ("model.encoder.multi_modal_projector.",)

_RENAMES = [
    (r"^embed\.embeddings$", "embed_tokens.weight"),
    (r"^embed\.eoi_embedding$", "embed_tokens.eoi_embedding"),
    (r"^ln_final\.scale$", "norm.weight"),
    (r"^blocks\.(\d+)\.attn\.", r"layers.\1.self_attn."),
    (r"^blocks\.(\d+)\.", r"layers.\1."),
    (r"\.input_layernorm\.", ".pre_self_attn_layernorm."),
    (r"\.post_attention_layernorm\.", ".post_self_attn_layernorm."),
    (r"\.(weights|scale)$", ".weight"),
]


def hf_name(label: str) -> str:
    """``blocks.3.input_layernorm.scale`` -> ``layers.3.pre_self_attn_layernorm.weight``
    (a label inside one stack, no prefix)."""
    for pattern, replacement in _RENAMES:
        label = re.sub(pattern, replacement, label)
    return label


def encoder_prefix(ckpt: CheckpointDir) -> str:
    """The prefix under which this checkpoint stores the encoder's text stack."""
    return find_prefix(ckpt, ENCODER_PREFIXES, "embed_tokens.weight", "T5Gemma 2")


def key_mapper(encoder: str) -> Callable[[str], str]:
    """Label -> tensor name; the shared embedding is stored with the encoder."""

    def key_for(label: str) -> str:
        stack, _, rest = label.partition(".")
        if stack == "decoder":
            return DECODER_PREFIX + hf_name(rest)
        if stack == "encoder":
            return encoder + hf_name(rest)
        return encoder + hf_name(label)

    return key_for


def ignored_tensors(key: str) -> bool:
    """Tensors the text path does not read: vision tower, projector, tied copies."""
    return (
        ".vision_tower." in key
        or ".multi_modal_projector." in key
        or key.startswith(("lm_head.", DECODER_PREFIX + "embed_tokens."))
    )


def vision_config(ckpt: CheckpointDir) -> siglip.Gemma3VisionConfig:
    """The encoder's tower config (``encoder.vision_config``, ``mm_tokens_per_image``)."""
    encoder = ckpt.config.get("encoder") or {}
    if not encoder.get("vision_config"):
        raise CheckpointError(
            f"{ckpt.path}/config.json has no encoder.vision_config: this T5Gemma 2 checkpoint "
            "has no vision tower. Load it without vision=True."
        )
    try:
        return siglip.Gemma3VisionConfig.from_hf(encoder)
    except ValueError as error:
        raise CheckpointError(f"{ckpt.path}: {error}") from None


def _vision_names(
    ckpt: CheckpointDir, encoder: str
) -> tuple[Callable[[str], str], Callable[[str], bool]]:
    """Label -> tensor name and the tensors not read, for both stacks and the tower."""
    tower = find_prefix(
        ckpt, VISION_PREFIXES, "embeddings.patch_embedding.weight", "T5Gemma 2 SigLIP vision"
    )
    projector = find_prefix(
        ckpt, PROJECTOR_PREFIXES, "mm_input_projection_weight", "T5Gemma 2 multimodal"
    )
    text = key_mapper(encoder)

    def key_for(label: str) -> str:
        if label.startswith("encoder.vision."):
            return siglip.hf_name(label.removeprefix("encoder."), tower, projector)
        return text(label)

    def ignore(key: str) -> bool:
        # Tied copies, and SigLIP's attention-pooling head, which T5Gemma 2 never runs.
        return key.startswith(("lm_head.", DECODER_PREFIX + "embed_tokens.", tower + "head."))

    return key_for, ignore


def load_checkpoint(
    ckpt: CheckpointDir, dtype: jnp.dtype, show_progress: bool | None, vision: bool = False
) -> tuple[pz.nn.Layer, T5Gemma2Config]:
    """Builds the text encoder-decoder of a ``t5gemma2`` checkpoint; with ``vision``, the
    encoder's SigLIP tower and projector too."""
    try:
        config = T5Gemma2Config.from_hf(ckpt.config)
    except KeyError as missing:
        raise CheckpointError(
            f"{ckpt.path}/config.json lacks {missing} in its T5Gemma 2 encoder or decoder config."
        ) from None
    encoder = encoder_prefix(ckpt)
    key_for, ignore = key_mapper(encoder), ignored_tensors
    if vision:
        config = dataclasses.replace(config, vision=vision_config(ckpt))
        key_for, ignore = _vision_names(ckpt, encoder)
    model = build_from_checkpoint(
        ckpt, config.build, key_for, dtype, ignore=ignore, show_progress=show_progress
    )
    return model, config
