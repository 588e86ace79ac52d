"""Gemma 4 checkpoint names: gemmalens labels <-> transformers tensor names.

``Gemma4ForCausalLM`` files store the text decoder under ``model.``;
``Gemma4ForConditionalGeneration`` files (the Hub's) under ``model.language_model.``, beside
the vision and audio towers. The text model reads neither; with ``vision=True`` the vision
tower and its embedder are read too (``vision.*`` labels, named by
`gemmalens.vision.gemma4.hf_name`), with ``audio=True`` the audio tower and its embedder
(``audio.*``, `gemmalens.audio.gemma4.hf_name`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
from penzai import pz

from gemmalens.audio import gemma4 as audio_names
from gemmalens.checkpoints.parameters import build_from_checkpoint, find_prefix, text_config
from gemmalens.checkpoints.safetensors_files import CheckpointDir, CheckpointError
from gemmalens.families.gemma4 import Gemma4Config
from gemmalens.vision import gemma4 as vision_names

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


def with_vision(ckpt: CheckpointDir, config: Gemma4Config) -> Gemma4Config:
    """``config`` with the image encoder and placeholder ids of a ``gemma4`` checkpoint."""
    hf = ckpt.config
    if hf.get("model_type") != "gemma4" or not hf.get("vision_config"):
        kind = "text-only" if hf.get("model_type") != "gemma4" else "audio-only"
        raise CheckpointError(
            f"{ckpt.path} is a {kind} Gemma 4 checkpoint (model_type "
            f"{hf.get('model_type')!r}, architectures {hf.get('architectures')}, no "
            "vision_config): it has no vision tower. Load it without vision=True; "
            "Gemma4ForConditionalGeneration checkpoints with a vision_config have one."
        )
    try:
        encoder = vision_names.Gemma4ImageEncoderConfig.from_hf(hf)
    except ValueError as error:
        raise CheckpointError(f"{ckpt.path}: {error}") from None
    return dataclasses.replace(
        config,
        vision=encoder,
        image_token_id=int(hf.get("image_token_id", 258_880)),
        video_token_id=int(hf.get("video_token_id", 258_884)),
        audio_token_id=int(hf.get("audio_token_id", 258_881)),
    )


def with_audio(ckpt: CheckpointDir, config: Gemma4Config) -> Gemma4Config:
    """``config`` with the audio encoder and placeholder ids of a ``gemma4`` checkpoint."""
    hf = ckpt.config
    if hf.get("model_type") != "gemma4" or not hf.get("audio_config"):
        kind = "text-only" if hf.get("model_type") != "gemma4" else "vision-only"
        raise CheckpointError(
            f"{ckpt.path} is a {kind} Gemma 4 checkpoint (model_type "
            f"{hf.get('model_type')!r}, architectures {hf.get('architectures')}, no "
            "audio_config): it has no audio tower. Load it without audio=True; "
            "Gemma4ForConditionalGeneration checkpoints with an audio_config (E2B, E4B) "
            "have one."
        )
    try:
        encoder = audio_names.Gemma4AudioEncoderConfig.from_hf(hf)
    except ValueError as error:
        raise CheckpointError(f"{ckpt.path}: {error}") from None
    return dataclasses.replace(
        config,
        audio=encoder,
        image_token_id=int(hf.get("image_token_id", 258_880)),
        video_token_id=int(hf.get("video_token_id", 258_884)),
        audio_token_id=int(hf.get("audio_token_id", 258_881)),
    )


def load_checkpoint(
    ckpt: CheckpointDir,
    dtype: jnp.dtype,
    show_progress: bool | None,
    vision: bool = False,
    audio: bool = False,
) -> tuple[pz.nn.Layer, Gemma4Config]:
    """Builds the Gemma 4 text decoder of a ``gemma4_text`` or ``gemma4`` checkpoint; with
    ``vision``, the vision tower and ``embed_vision`` of a ``gemma4`` one too, with
    ``audio`` the audio tower and ``embed_audio``."""
    hf = text_config(ckpt, "gemma4", "Gemma 4")
    config = Gemma4Config.from_hf(hf)
    prefix = text_prefix(ckpt)
    ignore_text = ignored_tensors(prefix, config)
    # label prefix -> (tensor name of a label, the tower's tensor prefixes)
    towers: dict[str, tuple[Callable[[str], str], tuple[str, ...]]] = {}
    if vision:
        config = with_vision(ckpt, config)
        tower = find_prefix(
            ckpt, (vision_names.TOWER_PREFIX,), "patch_embedder.input_proj.weight", "Gemma 4 vision"
        )
        embedder = vision_names.EMBEDDER_PREFIX
        towers["vision."] = (
            lambda label: vision_names.hf_name(label, tower, embedder),
            (tower, embedder),
        )
    if audio:
        config = with_audio(ckpt, config)
        audio_tower = find_prefix(
            ckpt,
            (audio_names.TOWER_PREFIX,),
            "subsample_conv_projection.input_proj_linear.weight",
            "Gemma 4 audio",
        )
        audio_embedder = audio_names.EMBEDDER_PREFIX
        towers["audio."] = (
            lambda label: audio_names.hf_name(label, audio_tower, audio_embedder),
            (audio_tower, audio_embedder),
        )
    read = tuple(p for _, prefixes in towers.values() for p in prefixes)

    def key_for(label: str) -> str:
        for label_prefix, (tower_name, _) in towers.items():
            if label.startswith(label_prefix):
                return tower_name(label)
        return prefix + hf_name(label)

    def ignore(key: str) -> bool:
        # What the text model skips (the towers among it), except the towers asked for and
        # their embedders: every one of their tensors is read.
        return ignore_text(key) and not (read and key.startswith(read))

    model = build_from_checkpoint(
        ExpertsAsMatrices(ckpt),
        config.build,
        key_for,
        dtype,
        ignore=ignore,
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
