"""Helpers that build tiny artefacts (tokenizers, checkpoints) for tests and examples."""

from __future__ import annotations

import io
import os
import pathlib

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

# Gemma 3 layout of the first ids: pad/eos/bos/unk, then user-defined symbols, so that
# <start_of_turn> and <end_of_turn> land on 105 and 106 as in the real tokenizer.
_GEMMA_USER_DEFINED = (
    ["<mask>", "[multimodal]"]
    + [f"<unused{i}>" for i in range(99)]
    + ["<start_of_turn>", "<end_of_turn>"]
)


def make_tiny_sentencepiece(directory: str | os.PathLike) -> pathlib.Path:
    """Trains a tiny Gemma-style SentencePiece BPE model and writes it to disk.

    The special pieces sit at the same ids as in Gemma 3's tokenizer (`<pad>`=0,
    `<eos>`=1, `<bos>`=2, `<unk>`=3, `<mask>`=4, `[multimodal]`=5, `<unused0>`..`<unused98>`
    =6..104, `<start_of_turn>`=105, `<end_of_turn>`=106); ordinary pieces follow. The
    normalisation settings mirror Gemma's (no dummy prefix, whitespace kept verbatim,
    digits split, byte fallback) so that any text round-trips. Training takes well under
    a second and is deterministic: the same bytes are written on every call.

    Args:
      directory: Folder to write into; created if missing.

    Returns:
      Path of the written `directory/tokenizer.model`.
    """
    import sentencepiece as spm

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lines = [line for line in _TINY_CORPUS.splitlines() if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=640,
        # The corpus may not support exactly `vocab_size` merges; a smaller vocab is fine.
        hard_vocab_limit=False,
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=_GEMMA_USER_DEFINED,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        # One thread and no sampling keep the output byte-identical across runs.
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    path = directory / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path
