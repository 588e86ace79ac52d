"""gemmalens: the Gemma family as named, inspectable Penzai models.

import gemmalens as gl
m = gl.load("path/to/gemma-3-1b")            # a local Hugging Face checkpoint directory
m = gl.build(gl.preset("gemma3_1b"), seed=0) # or a random model of a preset architecture
m = gl.teaching_model("gemma3")              # or a small trained model that ships inside
logits, cache = m.run_with_cache(tokens)
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from gemmalens import (
    cache,
    circuits,
    compilation_cache,
    compiling,
    interventions,
    lora,
    patching,
    sae,
    sharding,
)
from gemmalens.checkpoints.load import load
from gemmalens.checkpoints.safetensors_files import CheckpointError
from gemmalens.encdec import EncoderDecoderModel
from gemmalens.families import registry
from gemmalens.families.gemma3 import Gemma3Config
from gemmalens.families.gemma3n import Gemma3nConfig
from gemmalens.families.gemma4 import Gemma4Config
from gemmalens.families.t5gemma2 import T5Gemma2Config
from gemmalens.layers import stacking
from gemmalens.layers.params import RandomInit
from gemmalens.lens import ActivationCache, Model
from gemmalens.presets import preset, presets
from gemmalens.teaching import (
    teaching_model,
    teaching_model_path,
    teaching_models,
    teaching_saes,
)
from gemmalens.tokenizer import Tokenizer

# A restarted kernel loads compiled programs from disk (docs/compilation-cache.md).
compilation_cache.setup_from_environment()

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # The widgets pull in the Jupyter stack; they load on first use of `gl.widgets`.
    if name == "widgets":
        import importlib

        return importlib.import_module("gemmalens.widgets")
    raise AttributeError(f"module 'gemmalens' has no attribute {name!r}")


def build(
    config: Gemma3Config | str,
    seed: int = 0,
    dtype: Any = jnp.float32,
    tokenizer: Tokenizer | None = None,
    *,
    mesh: Any = None,
    rules: dict[str, Any] | None = None,
    stack_layers: bool = False,
) -> Model:
    """A randomly initialised model of ``config`` (a config or a preset name).

    Matrices are normal(0, 0.02), norm weights at their identity value. With ``mesh``
    (and ``rules``), each parameter is made directly in its sharding (`gemmalens.sharding`).
    ``stack_layers``: as in `gemmalens.load` (`Model.stacked`); with ``mesh`` too, each
    stack is made once, directly in its sharding (the layer axis whole on every device).
    """
    if isinstance(config, str):
        config = preset(config)
    surface = getattr(config, "surface_class", Model)  # e.g. EncoderDecoderModel
    source = RandomInit(seed=seed, dtype=jnp.dtype(dtype))
    if mesh is None:
        if rules is not None:
            raise ValueError("rules place parameters on a mesh: pass mesh= as well.")
        if stack_layers:  # each stack made in one piece, never layer by layer
            return surface(stacking.build_stacked(config.build, source), config, tokenizer)
        return surface(config.build(source), config, tokenizer)
    placement = sharding.fit_for_build(config.build, config.family, mesh, rules)
    with sharding.placing(placement):  # each stack made once, in its placed layout
        if stack_layers:
            tree = stacking.build_stacked(config.build, source)
        else:
            tree = config.build(source)
        m = surface(tree, config, tokenizer)
    m.placement = placement
    return m


def model_families() -> dict[str, registry.Family]:
    """The families gemmalens implements, by name (``"gemma3"``, ``"gemma3n"``, ``"gemma4"``,
    ``"t5gemma2"``): each `gemmalens.families.registry.Family` says its config class, the
    checkpoint ``model_type`` values it loads and how its residual stream is written."""
    return dict(registry.FAMILIES)


__all__ = [
    "model_families",
    "ActivationCache",
    "CheckpointError",
    "Gemma3Config",
    "Gemma3nConfig",
    "EncoderDecoderModel",
    "Gemma4Config",
    "Model",
    "T5Gemma2Config",
    "Tokenizer",
    "build",
    "cache",
    "circuits",
    "compilation_cache",
    "compiling",
    "widgets",
    "interventions",
    "load",
    "lora",
    "sae",
    "sharding",
    "teaching_model",
    "teaching_model_path",
    "teaching_models",
    "teaching_saes",
    "patching",
    "preset",
    "presets",
]
