"""The audio path: Gemma 3n and Gemma 4 log-mel front ends, in numpy."""

from gemmalens.audio import features
from gemmalens.audio.features import *  # noqa: F403 (the public names, listed there)

__all__ = list(features.__all__)
