"""KerasHub presets (``backbone.save_to_preset(dir)``) read as Hugging Face checkpoints."""

from __future__ import annotations

import json
import pathlib

from gemmalens.checkpoints.load import CheckpointFormat
from gemmalens.checkpoints.mapped import MappedCheckpoint


def is_preset(path: pathlib.Path) -> bool:
    """A directory with KerasHub's ``config.json`` (a ``class_name``) and ``model.weights.h5``."""
    config = path / "config.json"
    if not config.is_file() or not (path / "model.weights.h5").is_file():
        return False
    try:
        return "class_name" in json.loads(config.read_text())
    except (ValueError, OSError):
        return False


def open_preset(path: pathlib.Path, preset: str | None = None) -> MappedCheckpoint:
    raise NotImplementedError("KerasHub presets: being written")


FORMAT = CheckpointFormat(
    "KerasHub preset",
    "config.json (with class_name), metadata.json and model.weights.h5, as written by "
    "backbone.save_to_preset(dir)",
    is_preset,
    open_preset,
)
