"""Reading Hugging Face checkpoint directories (safetensors only, no torch, no downloads)."""

from gemmalens.checkpoints.safetensors_files import (
    CheckpointDir,
    CheckpointError,
    MissingTensorError,
    check_tensor_set,
)

__all__ = [
    "CheckpointDir",
    "CheckpointError",
    "MissingTensorError",
    "check_tensor_set",
]
