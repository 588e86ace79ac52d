"""`gemmalens.load`: a Hugging Face checkpoint directory -> `gemmalens.Model`."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax.numpy as jnp

from gemmalens.checkpoints import gemma3 as gemma3_names
from gemmalens.checkpoints.parameters import build_from_checkpoint
from gemmalens.checkpoints.safetensors_files import CheckpointDir, CheckpointError
from gemmalens.families.gemma3 import Gemma3Config, build_gemma3
from gemmalens.lens import Model
from gemmalens.tokenizer import Tokenizer

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_PLANNED = {
    "gemma3n": "Gemma 3n",
    "gemma3n_text": "Gemma 3n",
    "gemma4": "Gemma 4",
    "gemma4_text": "Gemma 4",
    "t5gemma2": "T5Gemma 2",
}


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
    hf = ckpt.config
    model_type = hf.get("model_type")
    if model_type == "gemma3_text":
        config = Gemma3Config.from_hf(hf)
    elif model_type == "gemma3":
        if "text_config" not in hf:
            raise CheckpointError(
                f"{ckpt.path}/config.json is a Gemma 3 config without text_config."
            )
        # Gemma3ForConditionalGeneration never applies the final logit soft-cap.
        config = dataclasses.replace(
            Gemma3Config.from_hf(hf["text_config"]), final_logit_softcapping=None
        )
    elif model_type in _PLANNED:
        raise CheckpointError(
            f"{ckpt.path} holds a {_PLANNED[model_type]} checkpoint (model_type {model_type!r}); "
            "this version of gemmalens loads Gemma 3 only."
        )
    else:
        raise CheckpointError(
            f"{ckpt.path}/config.json has model_type {model_type!r} "
            f"(architectures {hf.get('architectures')}); gemmalens loads 'gemma3_text' and "
            "'gemma3' checkpoints."
        )
    prefix = gemma3_names.text_prefix(ckpt)
    model = build_from_checkpoint(
        ckpt,
        lambda source: build_gemma3(config, source),
        gemma3_names.key_mapper(prefix),
        dtype,
        ignore=gemma3_names.ignored_tensors(prefix),
        show_progress=show_progress,
    )
    tokenizer = Tokenizer.from_file(ckpt.tokenizer_path) if ckpt.tokenizer_path else None
    return Model(model, config, tokenizer)
