"""The audio path: Gemma 3n and Gemma 4 log-mel front ends, in numpy (`gemmalens.audio.features`,
its names re-exported here); Gemma 3n's USM conformer encoder and soft-token embedder as
Penzai layers (`gemmalens.audio.gemma3n`), and Gemma 4's conformer, reusing them
(`gemmalens.audio.gemma4`)."""

from gemmalens.audio import features
from gemmalens.audio.features import *  # noqa: F403 (the public names, listed there)

__all__ = list(features.__all__)
