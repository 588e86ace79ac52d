"""The teaching models that ship with gemmalens: they load in gemmalens and transformers
with the same logits, their tokenizer is laid out like Gemma's, and the training script
that made them runs and learns."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

import gemmalens as gl
from gemmalens.teaching import configs, corpus, train

DECODERS = ["gemma3", "gemma3n", "gemma4_moe"]
SHIPPED = [*DECODERS, "t5gemma2"]
TOLERANCE = 1e-4


def _folder_bytes(name: str) -> int:
    return sum(f.stat().st_size for f in gl.teaching_model_path(name).iterdir())


def test_the_models_ship_within_the_size_budget():
    # gemma3_vision (the picture model) has its own tests: tests/test_teaching_vision.py.
    assert gl.teaching_models() == [*SHIPPED, "gemma3_vision"]
    # The three decoder-only models the issue asks for fit "about 30 MB"; T5Gemma 2 adds 3 MB.
    assert sum(map(_folder_bytes, DECODERS)) < 28 * 2**20
    assert _folder_bytes("t5gemma2") < 3 * 2**20


@pytest.fixture(scope="module")
def prompt_tokens():
    m = gl.teaching_model("gemma3")
    texts = [
        "The capital of France is Paris, and the capital of Japan is",
        "When Mary and John went to the store, John gave a drink to",
    ]
    tokens, mask = m.to_tokens(texts)
    return np.asarray(tokens), np.asarray(mask)


@pytest.mark.parametrize("name", DECODERS)
def test_gemmalens_and_transformers_give_the_same_logits(name, prompt_tokens):
    tokens, mask = prompt_tokens
    ours = np.asarray(gl.teaching_model(name)(tokens, attention_mask=mask))
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        gl.teaching_model_path(name), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        theirs = reference(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
        ).logits.numpy()
    real = mask.astype(bool)
    assert np.abs(ours[real] - theirs[real]).max() < TOLERANCE
    # Trained, not random: logits spread over tens of units, unlike a fresh init.
    assert ours[real].std() > 1.0


def test_t5gemma2_gives_the_same_logits_in_transformers():
    m = gl.teaching_model("t5gemma2")
    tok = m.tokenizer
    sources = ["reverse: Mary park ring Tom", "What is the capital of Peru?"]
    tokens, mask = m.to_tokens(sources)
    # <bos> and the first two answer tokens; <bos> " Lima" <eos> for the question.
    decoder_tokens = np.array([tok.encode(" Tom ring")[:3], tok.encode(" Lima", add_eos=True)])
    ours = np.asarray(m(tokens, decoder_tokens=decoder_tokens, attention_mask=mask))
    # The teaching checkpoint is text only: transformers initialises the (unused) vision
    # tower it always builds, and says so.
    reference = transformers.T5Gemma2ForConditionalGeneration.from_pretrained(
        gl.teaching_model_path("t5gemma2"), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        theirs = reference(
            input_ids=torch.tensor(np.asarray(tokens), dtype=torch.long),
            attention_mask=torch.tensor(np.asarray(mask), dtype=torch.long),
            decoder_input_ids=torch.tensor(decoder_tokens, dtype=torch.long),
        ).logits.numpy()
    assert np.abs(ours - theirs).max() < TOLERANCE
    assert ours.std() > 1.0


def test_t5gemma2_learned_its_tasks():
    m = gl.teaching_model("t5gemma2")
    out = m.generate(
        ["reverse: Mary park ring Tom", "What is the capital of Peru?"], max_new_tokens=8
    )
    assert [text.strip() for text in out.text] == ["Tom ring park Mary", "Lima"]


def test_config_json_is_the_documented_architecture():
    """The shipped config.json files are exactly what gemmalens.teaching.configs describes."""
    for name in SHIPPED:
        shipped = json.loads((gl.teaching_model_path(name) / "config.json").read_text())
        expected = {**configs.hf_config(name), "torch_dtype": "bfloat16"}
        assert json.loads(json.dumps(expected)) == shipped, name


def test_tokenizer_has_gemma_special_ids_and_round_trips():
    tok = gl.teaching_model("gemma3").tokenizer
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.piece_to_id("<mask>") == 4
    assert tok.start_of_turn_id == 105 and tok.end_of_turn_id == 106
    assert tok.vocab_size == configs.VOCAB_SIZE
    text = "def f(x):\n    return x ** 2  # naïve café, 12 + 7 = 19 \t ✓"
    assert tok.decode(tok.encode(text, add_bos=False)) == text
    ids = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    assert ids[:2] == [2, 105] and ids.count(106) == 1
    # Names from the synthetic text are single pieces, so patching positions line up.
    for name in corpus.NAMES:
        assert len(tok.encode(" " + name, add_bos=False)) == 1, name


def test_shipped_gemma3_learned_the_synthetic_facts():
    m = gl.teaching_model("gemma3")
    logits = np.asarray(m("The capital of France is"))[0, -1]
    assert m.tokenizer.id_to_piece(int(logits.argmax())) == "\u2581Paris"


def test_indirect_object_sentences_name_the_recipient_first_or_second():
    """The corpus fix: the recipient (the name not repeated) comes first in about half of
    the sentences, so "answer the first name" is no longer a shortcut."""
    rng = np.random.default_rng(0)
    recipient_first = 0
    for _ in range(400):
        sentence = corpus.ioi_sentence(rng)
        names = [word.strip(",.") for word in sentence.split() if word.strip(",.") in corpus.NAMES]
        first, second, giver, recipient = names
        assert {first, second} == {giver, recipient} and giver != recipient
        recipient_first += first == recipient
    assert 160 <= recipient_first <= 240
    from gemmalens.teaching.evidence import indirect_object_prompts

    for order in (True, False):
        for prompt, recipient, giver in indirect_object_prompts(rng, 20, order):
            recipient, giver = recipient.strip(), giver.strip()
            opening = prompt.split(",")[0].split(".")[0]
            named = [w for w in opening.split() if w in corpus.NAMES]
            assert named == ([recipient, giver] if order else [giver, recipient]), prompt
            assert prompt.endswith(" to") and giver in prompt.split(",")[-1]


def test_indirect_object_evidence_is_what_the_shipped_models_give():
    """report.json's indirect_object figures (quoted in the docs) recomputed."""
    from gemmalens.teaching.evidence import indirect_object

    root = gl.teaching_model_path("gemma3").parents[3]
    report = json.loads((root / "docs" / "teaching" / "report.json").read_text())
    for name in ("gemma3", "gemma3n", "gemma4_moe"):
        found = indirect_object(gl.teaching_model(name))
        shipped = report["models"][name]["evidence"]["indirect_object"]
        for kind in ("recipient_first", "recipient_second"):
            assert found[kind]["top1_accuracy"] == shipped[kind]["top1_accuracy"], name
            np.testing.assert_allclose(
                found[kind]["mean_logit_difference"],
                shipped[kind]["mean_logit_difference"],
                atol=2e-3,
            )


def test_training_script_runs_on_a_tiny_setting_and_the_loss_falls(tmp_path):
    settings = train.Settings(
        steps=40, batch_size=8, seq_len=48, tiny=True, warmup_steps=4, learning_rate=3e-3
    )
    report = train.run(
        ["gemma4_moe"], tmp_path / "out", tmp_path / "report", settings, progress=False
    )
    entry = report["models"]["gemma4_moe"]
    losses = json.loads((tmp_path / "report" / "loss_gemma4_moe.json").read_text())
    assert len(losses) == 40
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    assert (tmp_path / "report" / "loss_gemma4_moe.png").stat().st_size > 10_000
    # What it wrote is a checkpoint that loads, with the loss the script reported.
    m = gl.load(tmp_path / "out" / "gemma4_moe")
    assert m.config.num_experts == 8 and entry["parameters"] == m.config.num_params()
    assert (tmp_path / "out" / "NOTICE").read_text().startswith("The teaching models")


def test_training_data_mixes_the_sources_it_names():
    tok = gl.teaching_model("gemma3").tokenizer
    settings = train.Settings(batch_size=64, seq_len=32, tiny=True)
    data = train.TrainingData(tok, corpus.documentation(max_chars=5000), settings)
    batch = data.batch(np.random.default_rng(0))
    assert batch.shape == (64, 32) and (batch[:, 0] == tok.bos_id).all()
    repeated = [row for row in batch if len(set(row[1:].tolist())) < 25]
    assert repeated, "no induction rows in a batch of 64 (15% expected)"
    again = data.batch(np.random.default_rng(0))
    np.testing.assert_array_equal(batch, again)


def test_the_docs_page_quotes_the_measured_figures():
    """docs/teaching-models.md is written from docs/teaching/report.json: keep them in step."""
    root = gl.teaching_model_path("gemma3").parents[3]
    page = (root / "docs" / "teaching-models.md").read_text()
    report = json.loads((root / "docs" / "teaching" / "report.json").read_text())
    models = report["models"]
    for name in SHIPPED:
        assert f"{models[name]['parameters']:,}" in page
    heads = models["gemma3"]["evidence"]["induction"]["top_heads"]
    for head in heads:
        assert f"{head['score']:.2f} (head {head['head']})" in page
    routing = models["gemma4_moe"]["evidence"]["routing"]
    bits = ", ".join(f"{routing[str(i)]['mutual_information_bits']:.2f}" for i in range(3))
    assert bits in page
    altup = models["gemma3n"]["evidence"]["altup"]
    assert f"from {altup['loss']:.2f} to {altup['loss_without_predictions']:.2f}" in page
    predicted = " | ".join(
        f"{altup['layers'][str(i)]['active_prediction_error']:.2f}" for i in range(6)
    )
    assert f"| prediction | {predicted} |" in page
    for name in ("gemma3", "gemma3n", "gemma4_moe"):
        found = models[name]["evidence"]["indirect_object"]
        first, second = found["recipient_first"], found["recipient_second"]
        row = (
            f"| `{name}` | {100 * first['top1_accuracy']:.1f} % | "
            f"{first['mean_logit_difference']:.2f} | {100 * second['top1_accuracy']:.1f} % | "
            f"{second['mean_logit_difference']:.2f} |"
        )
        assert row in page, row
    accuracy = models["t5gemma2"]["evidence"]["accuracy"]
    assert f"{100 * accuracy['copy']:g} % of the copies" in page
