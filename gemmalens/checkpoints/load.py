"""`gemmalens.load`: a checkpoint directory (Hugging Face, KerasHub, gemma library) ->
`gemmalens.Model`."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from gemmalens import sharding
from gemmalens.checkpoints.safetensors_files import CheckpointDir, CheckpointError
from gemmalens.families import registry
from gemmalens.layers import stacking
from gemmalens.lens import Model
from gemmalens.tokenizer import Tokenizer

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# config.json model_type -> loader(ckpt, dtype, show_progress) -> (penzai model, config),
# from the family registry.
LOADERS = {
    model_type: family.load_checkpoint for model_type, family in registry.by_model_type().items()
}


def _dtype(dtype: Any) -> jnp.dtype:
    name = jnp.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}.")
    return _DTYPES[name]


@dataclasses.dataclass(frozen=True)
class CheckpointFormat:
    """A checkpoint format `load` reads.

    Attributes:
      name: what users call it, e.g. ``"KerasHub preset"``.
      needs: what a directory of this format holds, for the error on an unknown directory.
      detect: whether a directory is of this format (cheap: looks at file names and JSON).
      open: ``open(path, preset)`` -> the checkpoint under Hugging Face names
        (`CheckpointDir` or `MappedCheckpoint`).
    """

    name: str
    needs: str
    detect: Callable[[pathlib.Path], bool]
    open: Callable[[pathlib.Path, str | None], Any]


def _is_hugging_face(path: pathlib.Path) -> bool:
    """config.json that is not KerasHub's (CheckpointDir reports a broken one precisely)."""
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return "class_name" not in json.loads(config.read_text())
    except (ValueError, OSError, TypeError):
        return True


def _open_hugging_face(path: pathlib.Path, preset: str | None) -> CheckpointDir:
    if preset is not None:
        raise CheckpointError(
            f"{path} is a Hugging Face checkpoint: its config.json says what it is, so leave "
            f"preset={preset!r} out."
        )
    return CheckpointDir(path)


def _formats() -> list[CheckpointFormat]:
    from gemmalens.checkpoints import gemma_library, keras_hub

    return [
        CheckpointFormat(
            "Hugging Face checkpoint",
            "config.json with a model_type, and model.safetensors (or model-*-of-*.safetensors "
            "with model.safetensors.index.json)",
            _is_hugging_face,
            _open_hugging_face,
        ),
        keras_hub.FORMAT,
        gemma_library.FORMAT,
    ]


def detect_format(path: str | os.PathLike) -> CheckpointFormat:
    """The format of a checkpoint directory, or an error listing what each format needs."""
    path = pathlib.Path(path).expanduser()
    formats = _formats()
    if path.is_dir():
        for fmt in formats:
            if fmt.detect(path):
                return fmt
        found = sorted(p.name for p in path.iterdir())[:12]
        nested = sorted(path.glob("*/config.json")) + sorted(path.glob("snapshots/*/config.json"))
        raise CheckpointError(
            f"{path} is not a checkpoint gemmalens can read (it holds "
            f"{', '.join(found) if found else 'nothing'})."
            + (f" Did you mean {nested[0].parent}?" if nested else "")
            + " gemmalens reads:\n"
            + "\n".join(f"  - a {fmt.name}: {fmt.needs}" for fmt in formats)
        )
    # A missing directory or a file: CheckpointDir says precisely what is wrong.
    return formats[0]


def load(
    path: str | os.PathLike,
    dtype: Any = "float32",
    show_progress: bool | None = None,
    *,
    preset: str | Any = None,
    mesh: Any = None,
    rules: dict[str, Any] | None = None,
    vision: bool = False,
    audio: bool = False,
    stack_layers: bool = False,
) -> Model:
    """Loads a local Gemma checkpoint directory; nothing is ever downloaded.

    Three formats are recognised (`detect_format`; ``m.checkpoint_format`` says which):

    - a Hugging Face directory: ``config.json`` and ``model.safetensors`` (or sharded
      ``model-*.safetensors`` with ``model.safetensors.index.json``), optionally
      ``tokenizer.model``; the family is read from ``config.json``;
    - a KerasHub preset (``backbone.save_to_preset(dir)``): ``config.json``,
      ``metadata.json`` and ``model.weights.h5``, the tokenizer asset when present;
    - a gemma-library (Orbax) checkpoint, such as the Kaggle releases: parameters only, so
      the architecture is inferred from the parameter tree or named by ``preset``.

    Args:
      path: the local directory.
      dtype: ``"float32"`` or ``"bfloat16"`` for parameters and activations.
      show_progress: progress bar while reading; by default only for large checkpoints.
      preset: for a gemma-library checkpoint whose architecture the parameter tree does not
        settle (it recognises the released ones): a gemmalens preset name (``gl.presets()``)
        or config (``gl.Gemma3Config(...)``).
      mesh: a `jax.sharding.Mesh` (`gemmalens.sharding.make_mesh`) to place the parameters
        on: each device reads only its slice of each tensor.
      rules: entries over the family's sharding rule table (`gemmalens.sharding`).
      vision: also build the vision tower of a multimodal checkpoint (Gemma 3 4B, 12B,
        27B, and T5Gemma 2's encoder: SigLIP and the projector; Gemma 4: its own tower and
        ``embed_vision``; Gemma 3n: MobileNetV5 and ``embed_vision``), so that the model
        takes ``pixel_values``
        (`gemmalens.vision.merge`). Off by default: the text model alone loads faster and
        needs less memory, and runs text exactly as with the tower.
      audio: also build the audio tower of a multimodal checkpoint (Gemma 3n: the USM
        conformer, ``embed_audio`` and ``embed_vision``'s hard tokens; Gemma 4 E2B / E4B:
        its conformer and ``embed_audio``, `gemmalens.audio.gemma4`), so that the model
        takes ``input_features`` (`gemmalens.audio.merge`). Off by default, as ``vision``;
        with it, the ids of the vision and audio ranges embed as transformers'
        ``Gemma3nForConditionalGeneration`` embeds them (the text model reads them as
        ``Gemma3nForCausalLM`` does, from its own table).
      stack_layers: store each block parameter of one name and shape as one stacked array
        and run repeating blocks as one compiled loop (`gemmalens.Model.stacked`): the
        first call of a deep model compiles in a fraction of the time. Each stack replaces
        its per-layer arrays as it is made, so the model is never held twice. With
        ``mesh``, each stack is placed with its layer axis whole on every device and its
        named axes split as each layer's parameter would be, and each device reads only
        its slice of each layer's tensor (`gemmalens.sharding.Placement.put_stack`). On an
        H100: Gemma 3 4B loaded and run once in 4.7 s stacked, 6.9-7.8 s per layer
        (transformers: 7.1-7.4 s, 8.9-12.3 s on the slower host of the per-layer
        figure); the 27B's first call 1.6-3.6 s against 6-15 s, its steady forward 1-3%
        slower (docs: "Deep models: stacked layers").

    Returns:
      a `gemmalens.Model`.
    """
    dtype = _dtype(dtype)
    fmt = detect_format(path)
    ckpt = fmt.open(pathlib.Path(path).expanduser(), preset)
    model_type = ckpt.config.get("model_type")
    if model_type in LOADERS:
        options = {}
        requested = [tower for tower, wanted in (("vision", vision), ("audio", audio)) if wanted]
        for tower in requested:
            if fmt.name != "Hugging Face checkpoint":
                raise CheckpointError(
                    f"{tower}=True reads the tower of a Hugging Face checkpoint; gemmalens "
                    f"reads the text model only of a {fmt.name}. Load it without {tower}=True."
                )
            family = registry.by_model_type()[model_type]
            if tower not in family.towers:
                with_towers = [f.title for f in registry.FAMILIES.values() if tower in f.towers]
                kind = "image" if tower == "vision" else "audio"
                raise CheckpointError(
                    f"{tower}=True: gemmalens does not build the {family.title} {tower} tower "
                    f"yet ({kind} input is implemented for {', '.join(with_towers)}); load "
                    f"this checkpoint without it to run its text model."
                )
            options[tower] = True
        request = None
        if mesh is not None:
            family = registry.by_model_type()[model_type].name
            request = sharding.PlacementRequest(mesh, family, rules)
        elif rules is not None:
            raise ValueError("rules place parameters on a mesh: pass mesh= as well.")
        stacked = stacking.stacked_builds() if stack_layers else contextlib.nullcontext()
        with sharding.requesting(request), stacked:
            model, config = LOADERS[model_type](ckpt, dtype, show_progress, **options)
    else:
        raise CheckpointError(
            f"{ckpt.path}/config.json has model_type {model_type!r} "
            f"(architectures {ckpt.config.get('architectures')}); gemmalens loads "
            f"{', '.join(map(repr, sorted(LOADERS)))} checkpoints."
        )
    tokenizer = Tokenizer.from_file(ckpt.tokenizer_path) if ckpt.tokenizer_path else None
    # A config may name its own surface (encoder-decoders: EncoderDecoderModel).
    m = getattr(config, "surface_class", Model)(model, config, tokenizer)
    m.checkpoint_format = fmt.name
    m.placement = request.placement if request is not None else None
    return m.stacked(donate=True) if stack_layers else m
