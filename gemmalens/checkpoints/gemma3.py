"""Gemma 3 checkpoint names: gemmalens labels <-> transformers tensor names."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import jax.numpy as jnp
from penzai import pz

from gemmalens.checkpoints.parameters import build_from_checkpoint, find_prefix, text_config
from gemmalens.checkpoints.safetensors_files import CheckpointDir
from gemmalens.families.gemma3 import Gemma3Config

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
    return lambda label: prefix + hf_name(label)


def ignored_tensors(prefix: str) -> Callable[[str], bool]:
    """Tensors a text model does not read: the tied ``lm_head`` and the vision tower."""

    def ignore(key: str) -> bool:
        if key.endswith("lm_head.weight"):
            return True
        return prefix != "model." and not key.startswith(prefix)

    return ignore


def load_checkpoint(
    ckpt: CheckpointDir, dtype: jnp.dtype, show_progress: bool | None
) -> tuple[pz.nn.Layer, Gemma3Config]:
    """Builds the Gemma 3 text decoder of a ``gemma3_text`` or ``gemma3`` checkpoint."""
    config = Gemma3Config.from_hf(text_config(ckpt, "gemma3", "Gemma 3"))
    if ckpt.config.get("model_type") == "gemma3":
        # Gemma3ForConditionalGeneration never applies the final logit soft-cap.
        config = dataclasses.replace(config, final_logit_softcapping=None)
    prefix = text_prefix(ckpt)
    model = build_from_checkpoint(
        ckpt,
        config.build,
        key_mapper(prefix),
        dtype,
        ignore=ignored_tensors(prefix),
        show_progress=show_progress,
    )
    return model, config
