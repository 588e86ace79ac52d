"""The image path: preprocessing and prompt building (towers to come, issue 17)."""

from gemmalens.vision import preprocess
from gemmalens.vision.preprocess import *  # noqa: F403 (the public names, listed there)

__all__ = list(preprocess.__all__)
