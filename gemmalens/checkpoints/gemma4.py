"""Gemma 4 checkpoint names: gemmalens labels <-> transformers tensor names.

``Gemma4ForCausalLM`` files store the text decoder under ``model.``;
``Gemma4ForConditionalGeneration`` files (the Hub's) under ``model.language_model.``, beside
the vision and audio towers, which the text model does not read.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
from penzai import pz

from gemmalens.checkpoints.parameters import build_from_checkpoint, find_prefix, text_config
from gemmalens.checkpoints.safetensors_files import CheckpointDir
from gemmalens.families.gemma4 import Gemma4Config

TEXT_PREFIXES = ("model.language_model.", "model.")

_RENAMES = [
    (r"^embed\.embeddings$", "embed_tokens.weight"),
    (r"^ln_final\.scale$", "norm.weight"),
    (r"^per_layer_inputs\.token_table$", "embed_tokens_per_layer.weight"),
    (r"^per_layer_inputs\.model_projection\.", "per_layer_model_projection."),
    (r"^per_layer_inputs\.projection_norm\.", "per_layer_projection_norm."),
    (r"^blocks\.(\d+)\.attn\.", r"layers.\1.self_attn."),
    (r"^blocks\.(\d+)\.moe\.", r"layers.\1."),
    (r"^blocks\.(\d+)\.", r"layers.\1."),
]
# Raw tensors (nn.Parameter / buffers), stored without a ".weight" suffix.
_RAW = re.compile(
    r"\.(layer_scalar|router\.scale|router\.per_expert_scale|experts\.gate_up_proj"
    r"|experts\.down_proj)$"
)
# The expert tensors are 3-D in the files; gemmalens asks for them as [out, in] matrices.
_EXPERT_TENSOR = re.compile(r"\.experts\.(gate_up_proj|down_proj)$")


def hf_name(label: str) -> str:
    """``blocks.3.moe.router.proj.weights`` -> ``layers.3.router.proj.weight`` (no prefix)."""
    for pattern, replacement in _RENAMES:
        label = re.sub(pattern, replacement, label)
    if _RAW.search(label):
        return label
    return re.sub(r"\.(weights|scale)$", ".weight", label)


class ExpertsAsMatrices:
    """A view of a checkpoint in which the 3-D expert tensors ``[E, out, in]`` read as
    ``[E * out, in]``: the ``[out, in]`` layout every gemmalens parameter request uses
    (the expert axis leads the out axes). Everything else passes through."""

    def __init__(self, ckpt: CheckpointDir):
        self._ckpt = ckpt
        self.path = ckpt.path
        self.config = ckpt.config

    def keys(self) -> list[str]:
        return self._ckpt.keys()

    def __contains__(self, key: object) -> bool:
        return key in self._ckpt

    def shape(self, key: str) -> tuple[int, ...]:
        shape = self._ckpt.shape(key)
        if _EXPERT_TENSOR.search(key) and len(shape) == 3:
            return (shape[0] * shape[1], shape[2])
        return shape

    def dtype(self, key: str) -> np.dtype:
        return self._ckpt.dtype(key)

    def array(self, key: str) -> np.ndarray:
        return self._ckpt.array(key).reshape(self.shape(key))


def text_prefix(ckpt: CheckpointDir) -> str:
    """The prefix under which this checkpoint stores the text decoder."""
    return find_prefix(ckpt, TEXT_PREFIXES, "embed_tokens.weight", "Gemma 4")


def ignored_tensors(prefix: str, config: Gemma4Config) -> Callable[[str], bool]:
    """Tensors the text model does not read: the tied ``lm_head``, the vision and audio
    towers and their embedders, and key/value weights that KV-sharing layers may carry but
    never use."""
    consumers = {i for i, source in enumerate(config.kv_sources) if source is not None}
    unused_kv = re.compile(r"layers\.(\d+)\.self_attn\.(k_proj|v_proj|k_norm|v_norm)\.")

    def ignore(key: str) -> bool:
        if key.endswith("lm_head.weight") or not key.startswith(prefix):
            return True
        match = unused_kv.search(key)
        return bool(match) and int(match.group(1)) in consumers

    return ignore


def load_checkpoint(
    ckpt: CheckpointDir, dtype: jnp.dtype, show_progress: bool | None
) -> tuple[pz.nn.Layer, Gemma4Config]:
    """Builds the Gemma 4 text decoder of a ``gemma4_text`` or ``gemma4`` checkpoint."""
    hf = text_config(ckpt, "gemma4", "Gemma 4")
    config = Gemma4Config.from_hf(hf)
    prefix = text_prefix(ckpt)
    model = build_from_checkpoint(
        ExpertsAsMatrices(ckpt),
        config.build,
        lambda label: prefix + hf_name(label),
        dtype,
        ignore=ignored_tensors(prefix, config),
        show_progress=show_progress,
    )
    return model, config


def to_file_layout(tensors: dict[str, np.ndarray], config: Gemma4Config) -> dict[str, np.ndarray]:
    """The inverse of `ExpertsAsMatrices`: expert matrices ``[E * out, in]`` back to the
    files' ``[E, out, in]``."""
    return {
        key: (
            value.reshape(config.num_experts, -1, value.shape[-1])
            if _EXPERT_TENSOR.search(key)
            else value
        )
        for key, value in tensors.items()
    }
