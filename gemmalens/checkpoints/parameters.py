"""Parameters read from a checkpoint, through the same builders that make random models."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz
from tqdm.auto import tqdm

from gemmalens import sharding
from gemmalens.checkpoints.safetensors_files import (
    CheckpointDir,
    CheckpointError,
    check_tensor_set,
)
from gemmalens.layers import stacking
from gemmalens.layers.params import ParamRequest, ShapeOnly, from_numpy

# Small checkpoints (tests, teaching models) load silently.
_PROGRESS_THRESHOLD_BYTES = 200 * 2**20


class CheckpointParams:
    """A `ParamSource` that reads each parameter from a checkpoint tensor.

    Tensors are memory-mapped and converted one at a time to ``dtype``, so host memory
    never holds a second full copy of the weights.

    Args:
      ckpt: the open checkpoint.
      key_for: maps a gemmalens parameter label to the checkpoint tensor name.
      dtype: parameter dtype (``float32`` or ``bfloat16``).
      show_progress: None shows a progress bar only for large checkpoints.
    """

    def __init__(
        self,
        ckpt: CheckpointDir,
        key_for: Callable[[str], str],
        dtype: jnp.dtype,
        show_progress: bool | None = None,
        total_bytes: int = 0,
    ):
        self.ckpt = ckpt
        self.key_for = key_for
        self.dtype = dtype
        if show_progress is None:
            show_progress = total_bytes > _PROGRESS_THRESHOLD_BYTES
        self._bar = (
            tqdm(
                total=total_bytes,
                desc="Loading weights",
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
            )
            if show_progress
            else None
        )

    def _read(self, request: ParamRequest) -> np.ndarray:
        key = self.key_for(request.label)
        array = self.ckpt.array(key)
        if tuple(array.shape) != request.linear_shape:
            raise CheckpointError(
                f"Tensor {key!r} has shape {tuple(array.shape)}, expected {request.linear_shape} "
                f"for {request.label}."
            )
        if self._bar is not None:
            self._bar.update(array.nbytes)
        return array

    def __call__(self, request: ParamRequest) -> pz.Parameter:
        return from_numpy(request, self._read(request), self.dtype)

    def stack(self, requests: list[ParamRequest]) -> jax.Array:
        """The tensors of ``requests`` (one per layer) stacked on the host and copied to the
        device once, ``[layer, ...]`` (`stacking.build_stacked`): the device never holds a
        per-layer copy, and host memory holds one stack at a time. Inside
        `sharding.placing`, each device reads and converts only its slice of each layer's
        memory-mapped tensor, straight into the stack's placed layout
        (`sharding.Placement.put_stack`)."""
        hosts = [np.asarray(self._read(r)).reshape(r.shape) for r in requests]
        placement = sharding.active()
        if placement is not None:
            return placement.put_stack(requests[0].axes, hosts, self.dtype)
        return jnp.asarray(np.stack(hosts), dtype=self.dtype)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def find_prefix(ckpt: CheckpointDir, prefixes: tuple[str, ...], probe: str, family: str) -> str:
    """The first of ``prefixes`` under which the checkpoint holds ``probe`` (a tensor every
    checkpoint of the family has), e.g. ``model.`` or ``model.language_model.``."""
    for prefix in prefixes:
        if prefix + probe in ckpt:
            return prefix
    raise CheckpointError(
        f"Checkpoint {ckpt.path} has no tensor named "
        + " or ".join(repr(p + probe) for p in prefixes)
        + f". Is this a {family} checkpoint?"
    )


def text_config(ckpt: CheckpointDir, multimodal_type: str, family: str) -> dict[str, Any]:
    """The text decoder's config: ``text_config`` of a multimodal checkpoint (model_type
    ``multimodal_type``), else config.json itself."""
    hf = ckpt.config
    if hf.get("model_type") != multimodal_type:
        return hf
    if "text_config" not in hf:
        raise CheckpointError(
            f"{ckpt.path}/config.json is a {family} multimodal config without text_config."
        )
    return hf["text_config"]


def build_from_checkpoint(
    ckpt: CheckpointDir,
    build: Callable[[object], pz.nn.Layer],
    key_for: Callable[[str], str],
    dtype: jnp.dtype,
    ignore: Callable[[str], bool] | None = None,
    show_progress: bool | None = None,
) -> pz.nn.Layer:
    """Validates the checkpoint's tensor set against the model, then builds it from the file.

    ``build(source)`` is a family builder. It runs twice: first with `ShapeOnly` to learn
    every tensor name and shape it needs (so every missing, extra or mis-shaped tensor is
    reported at once, before anything is read), then with the checkpoint as source.
    """
    shapes = ShapeOnly(dtype=dtype)
    build(shapes)
    expected = {key_for(r.label): r.linear_shape for r in shapes.requests}
    check_tensor_set(ckpt, expected, ignore=ignore)
    total = sum(math.prod(ckpt.shape(k)) * np.dtype(ckpt.dtype(k)).itemsize for k in expected)
    source = CheckpointParams(ckpt, key_for, dtype, show_progress, total)
    try:
        with sharding.placing_requested((r.label, r.axes) for r in shapes.requests):
            if stacking.building_stacked():
                return stacking.build_stacked(build, source)
            return build(source)
    finally:
        source.close()
