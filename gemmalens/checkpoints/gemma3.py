"""Gemma 3 checkpoint names: gemmalens labels <-> transformers tensor names.

The text decoder's labels map here; the vision tower's (``vision.*``, read only when
loading with ``vision=True``) map through `gemmalens.vision.siglip.hf_name`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import jax.numpy as jnp
from penzai import pz

from gemmalens.checkpoints.parameters import build_from_checkpoint, find_prefix, text_config
from gemmalens.checkpoints.safetensors_files import CheckpointDir, CheckpointError
from gemmalens.families.gemma3 import Gemma3Config
from gemmalens.vision import siglip

# Text-only checkpoints (270M, 1B, Gemma3ForCausalLM) use "model."; the multimodal ones
# (4B-27B) use the legacy "language_model.model." on the Hub and "model.language_model."
# in memory; both occur in files.
TEXT_PREFIXES = ("model.", "language_model.model.", "model.language_model.")

_RENAMES = [
    (r"^embed\.embeddings$", "embed_tokens.weight"),
    (r"^ln_final\.scale$", "norm.weight"),
    (r"^blocks\.(\d+)\.attn\.", r"layers.\1.self_attn."),
    (r"^blocks\.(\d+)\.", r"layers.\1."),
    (r"\.(weights|scale)$", ".weight"),
]


def hf_name(label: str) -> str:
    """``blocks.3.attn.q_proj.weights`` -> ``layers.3.self_attn.q_proj.weight`` (no prefix)."""
    for pattern, replacement in _RENAMES:
        label = re.sub(pattern, replacement, label)
    return label


def text_prefix(ckpt: CheckpointDir) -> str:
    """The prefix under which this checkpoint stores the text decoder."""
    return find_prefix(ckpt, TEXT_PREFIXES, "embed_tokens.weight", "Gemma 3")


def key_mapper(prefix: str) -> Callable[[str], str]:
    """Maps a parameter's label to its checkpoint key under ``prefix``."""
    return lambda label: prefix + hf_name(label)


def ignored_tensors(prefix: str) -> Callable[[str], bool]:
    """Tensors a text model does not read: the tied ``lm_head`` and the vision tower."""

    def ignore(key: str) -> bool:
        if key.endswith("lm_head.weight"):
            return True
        return prefix != "model." and not key.startswith(prefix)

    return ignore


def vision_config(ckpt: CheckpointDir) -> tuple[siglip.Gemma3VisionConfig, int]:
    """The tower's config and the image token id of a ``gemma3`` (multimodal) checkpoint."""
    hf = ckpt.config
    if hf.get("model_type") != "gemma3" or not hf.get("vision_config"):
        raise CheckpointError(
            f"{ckpt.path} is a text-only Gemma 3 checkpoint (model_type "
            f"{hf.get('model_type')!r}, architectures {hf.get('architectures')}): it has no "
            "vision tower. Load it without vision=True; the 4B, 12B and 27B checkpoints "
            "(Gemma3ForConditionalGeneration, model_type 'gemma3') have one."
        )
    image_id = hf.get("image_token_index", hf.get("image_token_id", 262_144))
    return siglip.Gemma3VisionConfig.from_hf(hf), int(image_id)


def _vision_names(
    ckpt: CheckpointDir, text: str
) -> tuple[Callable[[str], str], Callable[[str], bool]]:
    """Label -> tensor name and the tensors not read, for the text decoder and the tower."""
    tower = find_prefix(
        ckpt, siglip.VISION_PREFIXES[:-1], "embeddings.patch_embedding.weight", "SigLIP vision"
    )
    projector = find_prefix(
        ckpt, siglip.PROJECTOR_PREFIXES[:-1], "mm_input_projection_weight", "Gemma 3 multimodal"
    )

    def key_for(label: str) -> str:
        if label.startswith("vision."):
            return siglip.hf_name(label, tower, projector)
        return text + hf_name(label)

    def ignore(key: str) -> bool:
        # The tied lm_head, and SigLIP's attention-pooling head, which Gemma 3 never runs.
        return key.endswith("lm_head.weight") or key.startswith(tower + "head.")

    return key_for, ignore


def load_checkpoint(
    ckpt: CheckpointDir, dtype: jnp.dtype, show_progress: bool | None, vision: bool = False
) -> tuple[pz.nn.Layer, Gemma3Config]:
    """Builds the Gemma 3 text decoder of a ``gemma3_text`` or ``gemma3`` checkpoint; with
    ``vision``, the SigLIP tower and projector of a ``gemma3`` one too."""
    config = Gemma3Config.from_hf(text_config(ckpt, "gemma3", "Gemma 3"))
    if ckpt.config.get("model_type") == "gemma3":
        # Gemma3ForConditionalGeneration never applies the final logit soft-cap.
        config = dataclasses.replace(config, final_logit_softcapping=None)
    prefix = text_prefix(ckpt)
    key_for, ignore = key_mapper(prefix), ignored_tensors(prefix)
    if vision:
        tower, image_id = vision_config(ckpt)
        config = dataclasses.replace(config, vision=tower, image_token_id=image_id)
        key_for, ignore = _vision_names(ckpt, prefix)
    model = build_from_checkpoint(
        ckpt, config.build, key_for, dtype, ignore=ignore, show_progress=show_progress
    )
    return model, config
