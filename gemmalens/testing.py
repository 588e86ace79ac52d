"""Helpers that build tiny artefacts (tokenizers, checkpoints) for tests and examples."""

from __future__ import annotations

import os
import pathlib

from gemmalens.tokenizer import train_gemma_tokenizer

# A few paragraphs of plain English (plus digits and punctuation) are enough for a
# few hundred BPE merges; anything outside this text still encodes via byte fallback.
_TINY_CORPUS = """\
The small tokenizer in this module is trained on a handful of paragraphs about nothing
in particular.
It exists so that tests can run quickly without downloading anything from the internet.
Every model needs a way to turn text into numbers, and this one is no exception.

A quiet river runs past the old mill at the edge of the village.
In the morning the water is cold and clear, and the children walk along the bank to school.
They count the boats, the ducks and the stones, and they argue about which one is the largest.
By the afternoon the sun is warm, the wind has dropped, and the river looks like glass.

Language models read a sequence of tokens and predict the next token, one step at a time.
Each token is an integer between zero and the size of the vocabulary.
Attention lets every position look back at the positions before it, and the model learns which
of them matter for the prediction.
When the model is asked a question, the user writes a turn, and then the model writes its answer.

Numbers appear everywhere: 0 1 2 3 4 5 6 7 8 9, 10, 42, 100, 256, 1024, 2048 and 3.14159.
The meeting starts at 9:30 on 2024-05-17 and ends at 11:45, after 3 short talks.
There were 12 apples, 7 pears and 25 plums in the basket, which makes 44 pieces of fruit.

Hello world! How are you today? I am fine, thank you, and how is your work going?
Please write a short poem about the sea. The sea is wide, the sea is deep, the sea is blue.
What is the capital of France? The capital of France is Paris, a city on the river Seine.
Can you explain why the sky is blue? Sunlight is scattered by the air, and blue light is
scattered more than red light, so the sky looks blue from the ground.
"""


def make_tiny_sentencepiece(directory: str | os.PathLike) -> pathlib.Path:
    """Trains a tiny Gemma-style SentencePiece BPE model and writes it to disk.

    The special pieces sit at Gemma's ids (see `gemmalens.tokenizer.train_gemma_tokenizer`).
    Training takes well under a second and is deterministic: the same bytes are written on
    every call.

    Args:
      directory: Folder to write into; created if missing.

    Returns:
      Path of the written `directory/tokenizer.model`.
    """
    lines = [line for line in _TINY_CORPUS.splitlines() if line.strip()]
    path = pathlib.Path(directory) / "tokenizer.model"
    # The corpus may not support exactly 640 merges; a smaller vocab is fine here.
    return train_gemma_tokenizer(lines, path, vocab_size=640, exact_vocab_size=False)
