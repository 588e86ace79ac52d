"""Gemma's SentencePiece tokenizer and chat format.

gemmalens reads the `tokenizer.model` file that ships with every Gemma checkpoint and
never fetches one from the network.
"""

from __future__ import annotations

import io
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, overload

import numpy as np
import sentencepiece as spm

START_OF_TURN_PIECE = "<start_of_turn>"
END_OF_TURN_PIECE = "<end_of_turn>"

# Gemma's chat format knows only two speakers; "assistant" is accepted as the
# name most chat APIs use for the model's side.
_MODEL_ROLES = ("model", "assistant")


class Tokenizer:
    """A Gemma SentencePiece tokenizer.

    Wraps a `sentencepiece.SentencePieceProcessor` with Gemma conventions: BOS is added
    by default, padding uses `pad_id`, and Gemma's chat format is available via
    `apply_chat_template` / `encode_chat`.

    Turn markers such as `<start_of_turn>` are user-defined symbols in Gemma's model
    file, so writing them literally in text yields their single id. `<bos>`, `<eos>` and
    `<pad>` are control symbols and are *not* recognised in text; use the `add_bos` /
    `add_eos` flags instead.
    """

    def __init__(self, processor: spm.SentencePieceProcessor, path: pathlib.Path | None = None):
        """Wraps an already loaded processor; most callers want `Tokenizer.from_file`.

        Args:
          processor: A loaded SentencePiece processor.
          path: Where the model was read from, only used in `repr` and error messages.
        """
        self._sp = processor
        self.path = path
        self._start_of_turn_id = self._optional_piece_id(START_OF_TURN_PIECE)
        self._end_of_turn_id = self._optional_piece_id(END_OF_TURN_PIECE)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Loads a SentencePiece model file (Gemma's `tokenizer.model`).

        Args:
          path: The `tokenizer.model` file, or a checkpoint directory containing it.

        Returns:
          The loaded tokenizer.

        Raises:
          FileNotFoundError: If the file does not exist.
          ValueError: If the file is not a valid SentencePiece model.
        """
        path = pathlib.Path(path)
        if path.is_dir():
            path = path / "tokenizer.model"
        if not path.is_file():
            raise FileNotFoundError(
                f"Tokenizer file not found: {str(path)!r}. gemmalens never downloads "
                "tokenizers; copy the checkpoint's SentencePiece `tokenizer.model` next to "
                "config.json in the checkpoint directory and load it from there."
            )
        processor = spm.SentencePieceProcessor()
        try:
            # Loading from bytes sidesteps sentencepiece's own path handling, whose
            # errors do not always say which file was at fault.
            processor.LoadFromSerializedProto(path.read_bytes())
        except (RuntimeError, OSError) as e:
            raise ValueError(
                f"{str(path)!r} is not a valid SentencePiece model file ({e}). Expected "
                "the `tokenizer.model` shipped with a Gemma checkpoint."
            ) from e
        return cls(processor, path)

    def __repr__(self) -> str:
        where = f", path={str(self.path)!r}" if self.path is not None else ""
        return f"Tokenizer(vocab_size={self.vocab_size}{where})"

    # -- Vocabulary ------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of pieces in the SentencePiece model (ids are `0..vocab_size-1`)."""
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        """Id of `<bos>` (2 in Gemma); -1 if the model defines none."""
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        """Id of `<eos>` (1 in Gemma); -1 if the model defines none."""
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        """Id of `<pad>` (0 in Gemma); -1 if the model defines none."""
        return self._sp.pad_id()

    @property
    def unk_id(self) -> int:
        """Id of `<unk>` (3 in Gemma)."""
        return self._sp.unk_id()

    @property
    def start_of_turn_id(self) -> int | None:
        """Id of `<start_of_turn>` (105 in Gemma 3), or None if the vocabulary lacks it."""
        return self._start_of_turn_id

    @property
    def end_of_turn_id(self) -> int | None:
        """Id of `<end_of_turn>` (106 in Gemma 3), or None if the vocabulary lacks it."""
        return self._end_of_turn_id

    def id_to_piece(self, token_id: int) -> str:
        """Returns the piece string of `token_id`; raises IndexError if out of range."""
        token_id = int(token_id)
        if not 0 <= token_id < self.vocab_size:
            raise IndexError(
                f"Token id {token_id} is outside the vocabulary [0, {self.vocab_size})."
            )
        return self._sp.id_to_piece(token_id)

    def piece_text(self, token_id: int) -> str:
        """The piece of `token_id` with SentencePiece's word marker ``▁`` shown as the space
        it stands for (``' Paris'``); control pieces stay as they are (``'<bos>'``)."""
        return self.id_to_piece(token_id).replace("\u2581", " ")

    def piece_to_id(self, piece: str) -> int:
        """Returns the id of `piece`.

        Raises:
          KeyError: If `piece` is not in the vocabulary. SentencePiece itself would
            silently return `unk_id`, which hides typos in special-token names.
        """
        token_id = self._sp.piece_to_id(piece)
        if token_id == self.unk_id and piece != self._sp.id_to_piece(token_id):
            raise KeyError(f"Piece {piece!r} is not in the vocabulary.")
        return token_id

    def _optional_piece_id(self, piece: str) -> int | None:
        try:
            return self.piece_to_id(piece)
        except KeyError:
            return None

    # -- Encoding and decoding ---------------------------------------------------------

    @overload
    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]: ...

    @overload
    def encode(
        self, text: list[str], add_bos: bool = True, add_eos: bool = False
    ) -> list[list[int]]: ...

    def encode(
        self, text: str | list[str], add_bos: bool = True, add_eos: bool = False
    ) -> list[int] | list[list[int]]:
        """Encodes text into token ids.

        Args:
          text: A string, or a list of `batch` strings.
          add_bos: Prepend `bos_id`, as Gemma expects at the start of every sequence.
          add_eos: Append `eos_id`.

        Returns:
          A list of `seq` ids for a string, or `batch` such lists (ragged; see
          `pad_batch`) for a list of strings.
        """
        if isinstance(text, str):
            return self._encode_one(text, add_bos, add_eos)
        if isinstance(text, Sequence) and all(isinstance(t, str) for t in text):
            return [self._encode_one(t, add_bos, add_eos) for t in text]
        raise TypeError(f"encode() expects a str or a list of str, got {type(text).__name__}.")

    def _encode_one(self, text: str, add_bos: bool, add_eos: bool) -> list[int]:
        ids = self._sp.encode(text, out_type=int)
        if add_bos:
            ids.insert(0, self._required_id(self.bos_id, "bos"))
        if add_eos:
            ids.append(self._required_id(self.eos_id, "eos"))
        return ids

    def _required_id(self, token_id: int, name: str) -> int:
        if token_id < 0:
            raise ValueError(f"This tokenizer ({self.path}) defines no <{name}> token.")
        return token_id

    def decode(self, ids: Any) -> str | list[str]:
        """Decodes token ids back into text, dropping `pad_id` tokens.

        BOS/EOS are control pieces and decode to nothing; literal pieces such as
        `<start_of_turn>` are kept.

        Args:
          ids: `[seq]` ids (a list, NumPy or JAX integer array, or a scalar), or
            `[batch, seq]` ids (a 2-D array, or a possibly ragged list of lists).

        Returns:
          A string for `[seq]` input, a list of `batch` strings for `[batch, seq]` input.
        """
        if isinstance(ids, (list, tuple)) and ids and np.ndim(ids[0]) > 0:
            # Rows of a list may differ in length, so they cannot go through one array.
            return [self._decode_row(np.asarray(row)) for row in ids]
        arr = np.asarray(ids)
        if arr.ndim == 2:
            return [self._decode_row(row) for row in arr]
        if arr.ndim > 2:
            raise ValueError(f"decode() expects 1-D or 2-D ids, got shape {arr.shape}.")
        return self._decode_row(arr.reshape(-1))

    def _decode_row(self, row: np.ndarray) -> str:
        if row.size == 0:
            return ""
        if row.ndim != 1 or not np.issubdtype(row.dtype, np.integer):
            raise ValueError(
                f"decode() expects integer token ids, got dtype {row.dtype} and shape {row.shape}."
            )
        row = row[row != self.pad_id]
        bad = row[(row < 0) | (row >= self.vocab_size)]
        if bad.size:
            raise ValueError(
                f"Token ids {bad[:8].tolist()} are outside the vocabulary [0, {self.vocab_size})."
            )
        return self._sp.decode(row.tolist())

    def pad_batch(
        self,
        seqs: Sequence[Sequence[int]],
        side: Literal["left", "right"] = "left",
        length: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Pads ragged token sequences into a rectangular batch with `pad_id`.

        Left padding (the default) keeps the last real token of every row at the same
        position, which is what batched generation needs.

        Args:
          seqs: `batch` sequences of token ids, of any lengths.
          side: Where the padding goes: "left" or "right".
          length: Pad to this many positions instead of the longest sequence (useful to
            keep jitted shapes fixed).

        Returns:
          `(tokens, attention_mask)`, both int32 `[batch, seq]`; the mask is 1 on real
          tokens and 0 on padding.
        """
        if side not in ("left", "right"):
            raise ValueError(f"side must be 'left' or 'right', got {side!r}.")
        pad_id = self._required_id(self.pad_id, "pad")
        longest = max((len(s) for s in seqs), default=0)
        seq_len = longest if length is None else length
        if longest > seq_len:
            raise ValueError(f"A sequence of length {longest} does not fit in length={seq_len}.")
        tokens = np.full((len(seqs), seq_len), pad_id, dtype=np.int32)
        mask = np.zeros((len(seqs), seq_len), dtype=np.int32)
        for i, seq in enumerate(seqs):
            n = len(seq)
            if n == 0:
                continue
            cols = slice(seq_len - n, seq_len) if side == "left" else slice(0, n)
            tokens[i, cols] = np.asarray(seq, dtype=np.int32)
            mask[i, cols] = 1
        return tokens, mask

    # -- Chat format -------------------------------------------------------------------

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """Renders a conversation in Gemma's chat format (as Gemma 3's template does).

        Each turn becomes `<start_of_turn>{role}\\n{content}<end_of_turn>\\n`, with
        "assistant" written as "model" and the content stripped of surrounding
        whitespace. Gemma has no system role: a leading system message is prepended
        (unstripped) to the first user turn, followed by a blank line. `<bos>` is not part
        of the string; `encode(..., add_bos=True)` adds it.

        Args:
          messages: Dicts with "role" ("system", "user", "assistant" or "model") and
            "content" (a string, or a list of `{"type": "text", "text": ...}` parts).
            After an optional leading system message, roles must alternate
            user, model, user, ...
          add_generation_prompt: End with `<start_of_turn>model\\n` so that the model
            writes the next turn.

        Returns:
          The rendered prompt.
        """
        if not messages:
            raise ValueError("apply_chat_template() needs at least one message.")
        first_user_prefix = ""
        turns = list(messages)
        has_system = turns[0].get("role") == "system"
        if has_system:
            # Gemma 3's template keeps the system text verbatim (unstripped) and, for a
            # list of parts, uses only the first part.
            system_parts = _text_parts(turns[0])
            first_user_prefix = (system_parts[0] if system_parts else "") + "\n\n"
            turns = turns[1:]
            if not turns:
                # Gemma's template would silently drop a system prompt with no user turn.
                raise ValueError("A system message must be followed by a user message.")
        parts = []
        for i, message in enumerate(turns):
            role = message.get("role")
            is_user_turn = i % 2 == 0
            if not (role == "user" if is_user_turn else role in _MODEL_ROLES):
                expected = "user" if is_user_turn else "model"
                got = [m.get("role") for m in messages]
                raise ValueError(
                    "Conversation roles must alternate user/model/user/model/... (optionally "
                    f"after one leading system message); message {i + int(has_system)} has role "
                    f"{role!r} where "
                    f"{expected!r} was expected. Roles given: {got}."
                )
            prefix = first_user_prefix if i == 0 else ""
            text = "".join(part.strip() for part in _text_parts(message))
            gemma_role = "user" if is_user_turn else "model"
            parts.append(f"{START_OF_TURN_PIECE}{gemma_role}\n{prefix}{text}{END_OF_TURN_PIECE}\n")
        if add_generation_prompt:
            parts.append(f"{START_OF_TURN_PIECE}model\n")
        return "".join(parts)

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Renders `messages` with `apply_chat_template` and encodes it with BOS.

        Returns:
          `[seq]` token ids, starting with `bos_id`.
        """
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_bos=True)


def _text_parts(message: Mapping[str, Any]) -> list[str]:
    """Returns the text pieces of a chat message's content, rejecting non-text parts."""
    content = message.get("content")
    if isinstance(content, str):
        return [content]
    if isinstance(content, Sequence):
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text":
                raise ValueError(
                    "Only text message content is supported; got a content part "
                    f"{part!r} in a {message.get('role')!r} message."
                )
            texts.append(part["text"])
        return texts
    raise ValueError(
        f"Message content must be a string or a list of text parts, got {type(content).__name__}."
    )


# Gemma 3 layout of the first ids: pad/eos/bos/unk, then user-defined symbols, so that
# <start_of_turn> and <end_of_turn> land on 105 and 106 as in the real tokenizer.
GEMMA_USER_DEFINED_PIECES = (
    ["<mask>", "[multimodal]"]
    + [f"<unused{i}>" for i in range(99)]
    + [START_OF_TURN_PIECE, END_OF_TURN_PIECE]
)


def train_gemma_tokenizer(
    lines: Iterable[str],
    path: str | os.PathLike,
    vocab_size: int,
    exact_vocab_size: bool = True,
) -> pathlib.Path:
    """Trains a SentencePiece BPE model laid out like Gemma's and writes it to ``path``.

    The special pieces sit at Gemma 3's ids (`<pad>`=0, `<eos>`=1, `<bos>`=2, `<unk>`=3,
    `<mask>`=4, `[multimodal]`=5, `<unused0>`..`<unused98>`=6..104, `<start_of_turn>`=105,
    `<end_of_turn>`=106); ordinary pieces follow. The normalisation mirrors Gemma's (no
    dummy prefix, whitespace kept verbatim, digits split, byte fallback), so any text
    round-trips. Deterministic: the same lines give the same bytes.

    Args:
      lines: training text, one sentence or paragraph per item.
      path: the ``tokenizer.model`` file to write (its folder is created).
      vocab_size: pieces in the model, special pieces and the 256 byte pieces included.
      exact_vocab_size: if False, a corpus too small for ``vocab_size`` pieces gives fewer.

    Returns:
      ``path``.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=exact_vocab_size,
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=GEMMA_USER_DEFINED_PIECES,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        max_sentence_length=1 << 16,
        # One thread and no sampling keep the output byte-identical across runs.
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    path.write_bytes(model.getvalue())
    return path
