"""Checkpoints in other formats seen as Hugging Face checkpoints.

A KerasHub preset or a gemma-library checkpoint holds the same numbers as a Hugging Face
checkpoint under other names and layouts. A `MappedCheckpoint` presents such a file under
the Hugging Face tensor names and layouts (and a Hugging Face ``config.json`` dict), each
tensor read and rearranged only when the builder asks for it, so every family's loader, its
tensor-set check and its error messages serve every format, and host memory never holds a
second copy of the weights.
"""

from __future__ import annotations

import difflib
import math
import pathlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from gemmalens.checkpoints.safetensors_files import (
    CheckpointError,
    MissingTensorError,
    TensorIndex,
)


@dataclass(frozen=True)
class MappedTensor:
    """One Hugging Face tensor made from a tensor of another format.

    Attributes:
      shape: the Hugging Face shape.
      dtype: the stored dtype.
      read: reads the source tensor and returns it in the Hugging Face layout.
      source: the tensor's name in its own format, for error messages.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    read: Callable[[], np.ndarray]
    source: str = ""


class MappedCheckpoint(TensorIndex):
    """A checkpoint of another format under Hugging Face names: what every family loader reads.

    Args:
      path: the directory it was read from.
      config: the equivalent Hugging Face ``config.json`` contents (with ``model_type``).
      tensors: Hugging Face tensor name -> `MappedTensor`.
      format_name: e.g. ``"KerasHub preset"``, for messages.
      tokenizer_path: a SentencePiece model that came with it, if any.
    """

    def __init__(
        self,
        path: str | pathlib.Path,
        config: dict[str, Any],
        tensors: dict[str, MappedTensor],
        format_name: str,
        tokenizer_path: pathlib.Path | None = None,
    ):
        self.path = pathlib.Path(path)
        self.config = config
        self.format_name = format_name
        self.tokenizer_path = tokenizer_path
        self._tensors = dict(sorted(tensors.items()))

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]) -> MappedCheckpoint:
        """Tensors held in memory (e.g. ``{k: v.float().numpy() for k, v in
        model.state_dict().items()}``) seen as a checkpoint, for the loaders that read one."""
        tensors = {
            name: MappedTensor(tuple(np.shape(a)), np.asarray(a).dtype, lambda a=a: np.asarray(a))
            for name, a in arrays.items()
        }
        return cls("<state dict>", {}, tensors, "state dict")

    def _info(self, key: str) -> MappedTensor:
        if key in self._tensors:
            return self._tensors[key]
        close = difflib.get_close_matches(str(key), list(self._tensors), n=5, cutoff=0.6)
        raise MissingTensorError(
            f"The {self.format_name} at {self.path} has nothing that maps to {key!r}"
            + (f"; closest: {', '.join(map(repr, close))}." if close else "."),
            key=str(key),
            suggestions=close,
        )

    def nbytes(self) -> int:
        return sum(math.prod(t.shape) * np.dtype(t.dtype).itemsize for t in self._tensors.values())

    def array(self, key: str) -> np.ndarray:
        info = self._info(key)
        array = np.asarray(info.read())
        if tuple(array.shape) != info.shape:
            raise CheckpointError(
                f"{info.source or key} in the {self.format_name} at {self.path} has shape "
                f"{tuple(array.shape)} where {info.shape} was expected: the file is truncated "
                "or its config does not belong to these weights."
            )
        return array

    def close(self) -> None:
        """Nothing to release here; format readers close their own files."""

    def __repr__(self) -> str:
        return f"MappedCheckpoint({self.format_name}, {str(self.path)!r}, {len(self)} tensors)"
