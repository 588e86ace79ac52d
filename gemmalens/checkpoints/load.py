"""`gemmalens.load`: a Hugging Face checkpoint directory -> `gemmalens.Model`."""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp

from gemmalens.checkpoints.safetensors_files import CheckpointDir, CheckpointError
from gemmalens.families import registry
from gemmalens.lens import Model
from gemmalens.tokenizer import Tokenizer

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# config.json model_type -> loader(ckpt, dtype, show_progress) -> (penzai model, config),
# from the family registry.
LOADERS = {
    model_type: family.load_checkpoint for model_type, family in registry.by_model_type().items()
}
# Families on the roadmap, so that their checkpoints get a precise message.
_PLANNED: dict[str, str] = {}


def _dtype(dtype: Any) -> jnp.dtype:
    name = jnp.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}.")
    return _DTYPES[name]


def load(
    path: str | os.PathLike,
    dtype: Any = "float32",
    show_progress: bool | None = None,
) -> Model:
    """Loads a Hugging Face Gemma checkpoint directory; nothing is ever downloaded.

    Args:
      path: a local directory with ``config.json`` and ``model.safetensors`` (or sharded
        ``model-*.safetensors`` with ``model.safetensors.index.json``), and optionally
        ``tokenizer.model``. The family is read from ``config.json``.
      dtype: ``"float32"`` or ``"bfloat16"`` for parameters and activations.
      show_progress: progress bar while reading; by default only for large checkpoints.

    Returns:
      a `gemmalens.Model`.
    """
    dtype = _dtype(dtype)
    ckpt = CheckpointDir(path)
    model_type = ckpt.config.get("model_type")
    if model_type in LOADERS:
        model, config = LOADERS[model_type](ckpt, dtype, show_progress)
    elif model_type in _PLANNED:
        raise CheckpointError(
            f"{ckpt.path} holds a {_PLANNED[model_type]} checkpoint (model_type {model_type!r}); "
            f"this version of gemmalens loads {', '.join(map(repr, sorted(LOADERS)))}."
        )
    else:
        raise CheckpointError(
            f"{ckpt.path}/config.json has model_type {model_type!r} "
            f"(architectures {ckpt.config.get('architectures')}); gemmalens loads "
            f"{', '.join(map(repr, sorted(LOADERS)))} checkpoints."
        )
    tokenizer = Tokenizer.from_file(ckpt.tokenizer_path) if ckpt.tokenizer_path else None
    # A config may name its own surface (encoder-decoders: EncoderDecoderModel).
    return getattr(config, "surface_class", Model)(model, config, tokenizer)
