"""T5Gemma 2 checkpoint names: gemmalens labels <-> transformers tensor names (text path)."""

from __future__ import annotations

import re
from collections.abc import Callable

import jax.numpy as jnp
from penzai import pz

from gemmalens.checkpoints.parameters import build_from_checkpoint, find_prefix
from gemmalens.checkpoints.safetensors_files import CheckpointDir, CheckpointError
from gemmalens.families.t5gemma2 import T5Gemma2Config

# transformers 5.23 writes the encoder's text stack under "model.encoder."; in memory (and
# possibly in other writers' files) it sits under "model.encoder.text_model.".
ENCODER_PREFIXES = ("model.encoder.", "model.encoder.text_model.")
DECODER_PREFIX = "model.decoder."

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


def load_checkpoint(
    ckpt: CheckpointDir, dtype: jnp.dtype, show_progress: bool | None
) -> tuple[pz.nn.Layer, T5Gemma2Config]:
    """Builds the text encoder-decoder of a ``t5gemma2`` checkpoint."""
    try:
        config = T5Gemma2Config.from_hf(ckpt.config)
    except KeyError as missing:
        raise CheckpointError(
            f"{ckpt.path}/config.json lacks {missing} in its T5Gemma 2 encoder or decoder config."
        ) from None
    model = build_from_checkpoint(
        ckpt,
        config.build,
        key_mapper(encoder_prefix(ckpt)),
        dtype,
        ignore=ignored_tensors,
        show_progress=show_progress,
    )
    return model, config
