"""The small trained models that ship with gemmalens, and how they were made.

    import gemmalens as gl
    m = gl.teaching_model("gemma3")        # or "gemma3n", "gemma4_moe", "t5gemma2"
    m("The capital of France is")
    m = gl.teaching_model("gemma3_vision") # Gemma 3 with its SigLIP tower: picture questions

Each is a Hugging Face checkpoint folder inside the package (``config.json``,
``model.safetensors``, ``tokenizer.model``), so `gemmalens.load` and transformers read it
like any real Gemma checkpoint. ``corpus``, ``configs``, ``train`` and ``evidence`` hold
the training text, the architectures, the training script and the measurements;
``images`` the pictures and questions of the vision model, and its measurements.
"""

from __future__ import annotations

import pathlib
from typing import Any

ASSETS = pathlib.Path(__file__).resolve().parent.parent / "assets" / "teaching"
DESCRIPTIONS = {
    "gemma3": "Gemma 3 style: 6 layers (local and global), 4 heads, d_model 256",
    "gemma3n": "Gemma 3n style: AltUp (4 streams), LAuReL, per-layer embeddings, "
    "activation sparsity, KV sharing; 6 layers, d_model 256",
    "gemma4_moe": "Gemma 4 mixture of experts: 8 experts (top 2) beside a dense MLP; "
    "4 layers, d_model 256",
    "t5gemma2": "T5Gemma 2 encoder-decoder (text path): 2 + 2 layers, d_model 128, trained "
    "to copy, reverse and answer questions",
    "gemma3_vision": "Gemma 3 with images: a 2-layer SigLIP tower (32 x 32 pixels, 16 soft "
    "tokens) and a 4-layer text decoder, d_model 128, trained to answer questions about "
    "coloured shapes",
}
# Loaded with their image tower (``gl.load(path, vision=True)``).
VISION_MODELS = ("gemma3_vision",)


def teaching_models() -> list[str]:
    """Names of the teaching models shipped in this installation."""
    return [name for name in DESCRIPTIONS if (ASSETS / name / "config.json").is_file()]


def teaching_model_path(name: str = "gemma3") -> pathlib.Path:
    """The checkpoint folder of teaching model ``name`` (for `gemmalens.load` or
    transformers' ``from_pretrained``)."""
    if name not in DESCRIPTIONS:
        raise KeyError(f"No teaching model named {name!r}; gemmalens ships {sorted(DESCRIPTIONS)}.")
    path = ASSETS / name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"The teaching model {name!r} is missing from {path}. It ships inside the "
            "package; reinstall gemmalens (`pip install -e .` from a clone), or rebuild it "
            "with `python -m gemmalens.teaching.train --models " + name + "`."
        )
    return path


def teaching_model(name: str = "gemma3", dtype: Any = "float32") -> Any:
    """Loads teaching model ``name`` (``"gemma3"``, ``"gemma3n"``, ``"gemma4_moe"``,
    ``"t5gemma2"``, ``"gemma3_vision"``) as a `gemmalens.Model`
    (`gemmalens.EncoderDecoderModel` for T5Gemma 2; ``gemma3_vision`` with its vision tower,
    so that it takes ``pixel_values``)."""
    from gemmalens.checkpoints.load import load

    return load(teaching_model_path(name), dtype=dtype, vision=name in VISION_MODELS)


def teaching_saes(model: Any = None) -> dict[str, Any]:
    """The sparse dictionaries trained on the Gemma 3 teaching model, by kind:
    ``"resid_post"`` (a JumpReLU SAE on ``blocks.3.hook_resid_post``) and ``"transcoder"``
    (an affine-skip JumpReLU transcoder over block 3's MLP), as `gemmalens.sae.SAE`s,
    checked against ``model`` when given. How they were made and how good they are:
    `gemmalens.teaching.saes` and each folder's ``evidence.json``."""
    from gemmalens.teaching.saes import teaching_saes as load

    return load(model)
