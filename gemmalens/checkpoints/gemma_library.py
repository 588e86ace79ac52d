"""The gemma library's Orbax checkpoints (``from gemma import gm``) read as Hugging Face
checkpoints."""

from __future__ import annotations

import pathlib

from gemmalens.checkpoints.load import CheckpointFormat
from gemmalens.checkpoints.mapped import MappedCheckpoint


def is_checkpoint(path: pathlib.Path) -> bool:
    """An Orbax checkpoint directory (its ``_METADATA`` or ``_CHECKPOINT_METADATA`` file)."""
    return (path / "_METADATA").is_file() or (path / "_CHECKPOINT_METADATA").is_file()


def open_checkpoint(path: pathlib.Path, preset: str | None = None) -> MappedCheckpoint:
    raise NotImplementedError("gemma-library checkpoints: being written")


FORMAT = CheckpointFormat(
    "gemma-library checkpoint",
    "an Orbax checkpoint directory (_METADATA, manifest.ocdbt, d/...) as on Kaggle or as "
    "written by gm.ckpts.save_params; pass preset= when the tree does not settle the model",
    is_checkpoint,
    open_checkpoint,
)
