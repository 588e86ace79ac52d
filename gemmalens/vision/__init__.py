"""The image path: preprocessing and prompt building; Gemma 3's SigLIP tower and projector
in `gemmalens.vision.siglip` (not yet wired into ``gl.load``, issue 17)."""

from gemmalens.vision import preprocess
from gemmalens.vision.preprocess import *  # noqa: F403 (the public names, listed there)

__all__ = list(preprocess.__all__)
