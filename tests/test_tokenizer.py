"""Tests for gemmalens.tokenizer, using the tiny Gemma-layout model from gemmalens.testing."""

import re

import jax.numpy as jnp
import numpy as np
import pytest

from gemmalens.testing import make_tiny_sentencepiece
from gemmalens.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_tiny_sentencepiece(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def tok(model_path):
    return Tokenizer.from_file(model_path)


# -- Tiny model and loading -------------------------------------------------------------


def test_special_ids_follow_gemma3_layout(tok):
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.piece_to_id("<mask>") == 4
    assert tok.piece_to_id("[multimodal]") == 5
    assert tok.piece_to_id("<unused0>") == 6
    assert tok.piece_to_id("<unused98>") == 104
    assert tok.start_of_turn_id == 105
    assert tok.end_of_turn_id == 106
    assert tok.id_to_piece(105) == "<start_of_turn>"
    assert tok.id_to_piece(106) == "<end_of_turn>"
    # Ordinary pieces come after the specials.
    assert 400 <= tok.vocab_size <= 1000


def test_make_tiny_sentencepiece_is_deterministic(tmp_path, model_path):
    again = make_tiny_sentencepiece(tmp_path / "new" / "dir")
    assert again == tmp_path / "new" / "dir" / "tokenizer.model"
    assert again.read_bytes() == model_path.read_bytes()


def test_from_file_accepts_checkpoint_directory(model_path, tok):
    from_dir = Tokenizer.from_file(model_path.parent)
    assert from_dir.vocab_size == tok.vocab_size
    assert from_dir.path == model_path


def test_repr_shows_vocab_size_and_path(tok, model_path):
    assert repr(tok) == f"Tokenizer(vocab_size={tok.vocab_size}, path={str(model_path)!r})"


def test_missing_file_error_explains_no_download(tmp_path):
    missing = tmp_path / "nowhere" / "tokenizer.model"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))) as info:
        Tokenizer.from_file(missing)
    message = str(info.value)
    assert "never downloads" in message
    assert "config.json" in message


def test_corrupt_file_raises_value_error_with_path(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"this is not a sentencepiece model\x00\xff")
    with pytest.raises(ValueError, match=r"not a valid SentencePiece model") as info:
        Tokenizer.from_file(bad)
    assert str(bad) in str(info.value)


# -- Vocabulary lookups -------------------------------------------------------------------


def test_piece_to_id_raises_for_unknown_piece(tok):
    with pytest.raises(KeyError, match="<start_of_tern>"):
        tok.piece_to_id("<start_of_tern>")
    # The unk piece itself is a real entry, not an unknown one.
    assert tok.piece_to_id("<unk>") == tok.unk_id


def test_id_to_piece_out_of_range(tok):
    with pytest.raises(IndexError, match="outside the vocabulary"):
        tok.id_to_piece(tok.vocab_size)
    with pytest.raises(IndexError):
        tok.id_to_piece(-1)


# -- Encoding and decoding ----------------------------------------------------------------

ROUND_TRIP_TEXTS = [
    "Hello world!",
    "The river is cold and clear.",
    "  leading spaces,  double  spaces\n\nand newlines\tand a tab ",
    "Digits: 3.14159, 2024-05-17, 1024.",
    "Ünïcödé — naïve café, 日本語のテキスト, emoji 😀🚀",
    "",
]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_unknown_characters_use_byte_fallback(tok):
    ids = tok.encode("😀", add_bos=False)
    assert tok.unk_id not in ids
    assert [tok.id_to_piece(i) for i in ids] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]


def test_bos_eos_flags(tok):
    plain = tok.encode("Hello world!", add_bos=False)
    assert tok.bos_id not in plain and tok.eos_id not in plain
    assert tok.encode("Hello world!") == [tok.bos_id, *plain]
    assert tok.encode("Hello world!", add_bos=False, add_eos=True) == [*plain, tok.eos_id]
    both = tok.encode("Hello world!", add_eos=True)
    assert both == [tok.bos_id, *plain, tok.eos_id]
    # BOS and EOS are control pieces and vanish on decode.
    assert tok.decode(both) == "Hello world!"


def test_batch_encode(tok):
    texts = ["Hello world!", "", "The sea is blue."]
    batch = tok.encode(texts, add_eos=True)
    assert batch == [tok.encode(t, add_eos=True) for t in texts]
    assert tok.encode([]) == []


def test_encode_rejects_non_text(tok):
    with pytest.raises(TypeError, match="str or a list of str"):
        tok.encode(123)
    with pytest.raises(TypeError):
        tok.encode(["ok", 5])


def test_literal_special_tokens_encode_to_single_ids(tok):
    ids = tok.encode("<start_of_turn>user\nHi<end_of_turn>\n", add_bos=False)
    assert ids[0] == 105
    assert ids.count(105) == 1 and ids.count(106) == 1
    assert tok.id_to_piece(ids[ids.index(106) + 1]) == "<0x0A>"
    assert tok.encode("<mask>[multimodal]<unused7>", add_bos=False) == [4, 5, 13]
    # <bos> is a control piece: written in text it is just characters.
    assert tok.bos_id not in tok.encode("<bos>", add_bos=False)


def test_decode_2d_arrays_skip_pads(tok):
    texts = ["Hello world!", "Hi", "The sea is wide, the sea is deep."]
    tokens, _ = tok.pad_batch(tok.encode(texts), side="left")
    assert (tokens == tok.pad_id).any()
    assert tok.decode(tokens) == texts
    assert tok.decode(jnp.asarray(tokens)) == texts
    right, _ = tok.pad_batch(tok.encode(texts), side="right")
    assert tok.decode(right) == texts


def test_decode_accepts_lists_arrays_and_scalars(tok):
    ids = tok.encode("Hello world!")
    assert tok.decode(ids) == "Hello world!"
    assert tok.decode(np.asarray(ids, dtype=np.int64)) == "Hello world!"
    assert tok.decode(jnp.asarray(ids, dtype=jnp.int32)) == "Hello world!"
    assert tok.decode([ids, ids[:3]]) == ["Hello world!", tok.decode(ids[:3])]
    assert tok.decode([tok.pad_id, *ids, tok.pad_id]) == "Hello world!"
    assert tok.decode(np.int32(105)) == "<start_of_turn>"
    assert tok.decode([]) == ""


def test_decode_rejects_bad_ids(tok):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([2, tok.vocab_size])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([-1])
    with pytest.raises(ValueError, match="1-D or 2-D"):
        tok.decode(np.zeros((1, 2, 3), dtype=np.int32))
    with pytest.raises(ValueError, match="integer"):
        tok.decode(np.array([1.0, 2.0]))


# -- Padding ------------------------------------------------------------------------------


def test_pad_batch_left(tok):
    tokens, mask = tok.pad_batch([[2, 10, 11], [2], []], side="left")
    assert tokens.dtype == np.int32 and mask.dtype == np.int32
    np.testing.assert_array_equal(tokens, [[2, 10, 11], [0, 0, 2], [0, 0, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 1], [0, 0, 0]])


def test_pad_batch_right(tok):
    tokens, mask = tok.pad_batch([[2, 10, 11], [2]], side="right")
    np.testing.assert_array_equal(tokens, [[2, 10, 11], [2, 0, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [1, 0, 0]])


def test_pad_batch_fixed_length_and_errors(tok):
    tokens, mask = tok.pad_batch([[2, 7]], length=4)
    np.testing.assert_array_equal(tokens, [[0, 0, 2, 7]])
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1]])
    with pytest.raises(ValueError, match="does not fit"):
        tok.pad_batch([[2, 7, 8]], length=2)
    with pytest.raises(ValueError, match="side must be"):
        tok.pad_batch([[2]], side="middle")
    tokens, mask = tok.pad_batch([])
    assert tokens.shape == mask.shape == (0, 0)


# -- Chat format --------------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
]


def test_chat_template_multi_turn_with_system(tok):
    expected = (
        "<start_of_turn>user\n"
        "You are a terse assistant.\n\n"
        "What is 2+2?<end_of_turn>\n"
        "<start_of_turn>model\n"
        "4<end_of_turn>\n"
        "<start_of_turn>user\n"
        "And 3+3?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert tok.apply_chat_template(CONVERSATION) == expected
    without_prompt = tok.apply_chat_template(CONVERSATION, add_generation_prompt=False)
    assert without_prompt == expected.removesuffix("<start_of_turn>model\n")


def test_chat_template_without_system_and_whitespace_rules(tok):
    messages = [
        {"role": "user", "content": "  Hi there \n"},
        {"role": "model", "content": [{"type": "text", "text": " Hello! "}]},
    ]
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == (
        "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
    )
    # The system text is kept verbatim; only turn contents are stripped.
    with_system = [{"role": "system", "content": " Be kind. "}, {"role": "user", "content": "Hi "}]
    assert tok.apply_chat_template(with_system) == (
        "<start_of_turn>user\n Be kind. \n\nHi<end_of_turn>\n<start_of_turn>model\n"
    )


@pytest.mark.parametrize(
    "roles",
    [
        ["user", "user"],
        ["assistant", "user"],
        ["user", "assistant", "assistant"],
        ["system", "user", "system"],
        ["user", "tool"],
    ],
)
def test_chat_template_requires_alternating_roles(tok, roles):
    messages = [{"role": role, "content": "x"} for role in roles]
    with pytest.raises(ValueError, match=r"roles must alternate user/model/user/model"):
        tok.apply_chat_template(messages)


def test_chat_template_rejects_degenerate_input(tok):
    with pytest.raises(ValueError, match="at least one message"):
        tok.apply_chat_template([])
    with pytest.raises(ValueError, match="followed by a user message"):
        tok.apply_chat_template([{"role": "system", "content": "x"}])
    image = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    with pytest.raises(ValueError, match="Only text"):
        tok.apply_chat_template(image)


def test_encode_chat(tok):
    ids = tok.encode_chat(CONVERSATION)
    assert ids[0] == tok.bos_id
    assert ids == [tok.bos_id, *tok.encode(tok.apply_chat_template(CONVERSATION), add_bos=False)]
    assert ids.count(tok.start_of_turn_id) == 4
    assert ids.count(tok.end_of_turn_id) == 3
    assert tok.decode(ids) == tok.apply_chat_template(CONVERSATION)


def test_piece_text_shows_the_word_marker_as_a_space(tok):
    word = tok.encode(" river", add_bos=False)[0]
    assert tok.id_to_piece(word).startswith("\u2581")
    assert tok.piece_text(word) == tok.id_to_piece(word).replace("\u2581", " ")
    assert tok.piece_text(word).startswith(" ")
    assert tok.piece_text(tok.bos_id) == "<bos>"
