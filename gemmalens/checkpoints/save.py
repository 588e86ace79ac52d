"""Writing a gemmalens model as a Hugging Face checkpoint directory.

The inverse of `gemmalens.load` for the text models: the same label -> tensor
name maps, the same ``[out, in]`` layouts, so that both gemmalens and transformers read
the result. This is how the teaching models that ship with gemmalens are written.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from penzai import pz
from safetensors.numpy import save_file

from gemmalens.layers import stacking
from gemmalens.layers.params import ShapeOnly


def _writers() -> dict[str, tuple[Callable[[str], str], Callable[[dict, Any], dict]]]:
    """``model_type`` -> (label -> tensor name, file-layout fix-ups), from the registry."""
    from gemmalens.families import registry

    return {
        model_type: (family.tensor_name, family.to_file_layout)
        for model_type, family in registry.by_saved_model_type().items()
    }


_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


# Where Gemma3ForConditionalGeneration's save_pretrained (transformers 5) puts each part.
GEMMA3_MULTIMODAL_TEXT_PREFIX = "language_model.model."
GEMMA3_MULTIMODAL_VISION_PREFIX = "vision_tower."
GEMMA3_MULTIMODAL_PROJECTOR_PREFIX = "multi_modal_projector."


def _gemma3_multimodal_name(label: str) -> str:
    """A Gemma 3 label (text or ``vision.*``) as a ``gemma3`` checkpoint names the tensor."""
    from gemmalens.checkpoints import gemma3 as gemma3_names
    from gemmalens.vision import siglip

    if label.startswith("vision."):
        return siglip.hf_name(
            label, GEMMA3_MULTIMODAL_VISION_PREFIX, GEMMA3_MULTIMODAL_PROJECTOR_PREFIX
        )
    return GEMMA3_MULTIMODAL_TEXT_PREFIX + gemma3_names.hf_name(label)


def checkpoint_tensors(model: pz.nn.Layer, config: Any, model_type: str) -> dict[str, np.ndarray]:
    """Every parameter of ``model`` under its transformers name, as float32 arrays.

    ``model_type`` ``"gemma3"`` writes a Gemma 3 model with its vision tower as
    Gemma3ForConditionalGeneration does (text, SigLIP tower and projector)."""
    writers = _writers()
    multimodal = model_type == "gemma3" and getattr(config, "family", None) == "gemma3"
    if multimodal and getattr(config, "vision", None) is not None:
        writers = {model_type: (_gemma3_multimodal_name, lambda tensors, config: tensors)}
    elif model_type not in writers:
        raise ValueError(
            f"gemmalens writes {sorted(writers)} checkpoints (and 'gemma3' for a Gemma 3 "
            f"with its vision tower), not {model_type!r}: use a text-only model_type (e.g. "
            "'gemma3_text')."
        )
    key_for, to_file_layout = writers[model_type]
    if getattr(config, "vision", None) is not None and not multimodal:
        raise ValueError(
            "gemmalens writes text checkpoints, and Gemma 3 with its vision tower (model_type "
            "'gemma3'); this model has a vision tower: save a model loaded without "
            "vision=True (or built from a config with vision=None)."
        )
    if getattr(config, "audio", None) is not None:
        raise ValueError(
            "gemmalens writes text checkpoints and this model has an audio tower; save a "
            "model loaded without audio=True (or built from a config with audio=None)."
        )
    shapes = ShapeOnly()
    config.build(shapes)
    values = stacking.parameter_values(model)
    missing = [r.label for r in shapes.requests if r.label not in values]
    if missing:
        raise ValueError(
            f"The model lacks {len(missing)} parameters its config asks for (first: "
            f"{missing[:3]}); was it built from a different config?"
        )
    tensors = {}
    for request in shapes.requests:
        array = values[request.label].unwrap(*request.axes).astype(jnp.float32)
        tensors[key_for(request.label)] = np.asarray(array).reshape(request.linear_shape)
    return to_file_layout(tensors, config)


def save_checkpoint(
    model: Any,
    directory: str | os.PathLike,
    hf_config: dict[str, Any],
    dtype: str = "bfloat16",
    tokenizer: str | os.PathLike | None = None,
) -> pathlib.Path:
    """Writes ``config.json``, ``model.safetensors`` (and ``tokenizer.model``) to ``directory``.

    Args:
      model: a `gemmalens.Model` (Gemma 3, 3n, 4 text; T5Gemma 2 text path; Gemma 3 with
        its vision tower, written as model_type ``"gemma3"``).
      directory: created if missing; existing files of the same names are replaced.
      hf_config: the transformers config dict written as ``config.json`` (its
        ``model_type`` picks the tensor names); ``model.config`` must be what it describes.
      dtype: ``"bfloat16"`` (as Gemma checkpoints ship) or ``"float32"``.
      tokenizer: a ``tokenizer.model`` file to copy beside the weights.

    Returns:
      The directory.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}.")
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = checkpoint_tensors(model.model, model.config, hf_config.get("model_type"))
    tensors = {k: np.ascontiguousarray(v.astype(_DTYPES[dtype])) for k, v in tensors.items()}
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    config = {**hf_config, "torch_dtype": dtype}
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        shutil.copyfile(tokenizer, directory / "tokenizer.model")
    return directory
