"""Gemma 3n checkpoint names: gemmalens labels <-> transformers tensor names.

``Gemma3nForCausalLM`` files store the text decoder under ``model.``; the released E2B/E4B
(``Gemma3nForConditionalGeneration``) under ``model.language_model.``, beside the vision
and audio towers, which the text model does not read. Those files also hold key/value
projections for the KV-sharing layers, which never use them (transformers ignores them too).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
from penzai import pz

from gemmalens.checkpoints import gemma3
from gemmalens.checkpoints.parameters import build_from_checkpoint, find_prefix, text_config
from gemmalens.checkpoints.safetensors_files import CheckpointDir, CheckpointError
from gemmalens.families.gemma3n import Gemma3nConfig

TEXT_PREFIXES = ("model.", "model.language_model.", "language_model.model.")

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


def load_checkpoint(
    ckpt: CheckpointDir, dtype: jnp.dtype, show_progress: bool | None
) -> tuple[pz.nn.Layer, Gemma3nConfig]:
    """Builds the Gemma 3n text decoder of a ``gemma3n_text`` or ``gemma3n`` checkpoint.

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
    prefix = text_prefix(ckpt)
    model = build_from_checkpoint(
        ckpt,
        config.build,
        lambda label: prefix + hf_name(label),
        dtype,
        ignore=ignored_tensors(prefix, config),
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
