"""The image path: preprocessing and prompt building (`gemmalens.vision.preprocess`, its
names re-exported here); Gemma 3's SigLIP tower and projector (`gemmalens.vision.siglip`);
Gemma 4's tower and ``embed_vision`` (`gemmalens.vision.gemma4`); how the soft tokens
enter the text stream and which image tokens attend to each other
(`gemmalens.vision.merge`). ``gl.load(path, vision=True)`` builds a Gemma 3 model with
its tower, called as ``m(tokens, pixel_values=...)``, a Gemma 4 model with its tower,
called as ``m(tokens, pixel_values=preprocess_gemma4(images))`` (the patches and their
``image_position_ids``), or a T5Gemma 2 model with the tower in its encoder, called as
``m(tokens, decoder_tokens, pixel_values=...)``."""

from gemmalens.vision import preprocess
from gemmalens.vision.preprocess import *  # noqa: F403 (the public names, listed there)

__all__ = list(preprocess.__all__)
