"""The Gemma 3 vision teaching model: it loads in gemmalens and transformers with the same
logits, the picture questions it learned are what `gemmalens.teaching.images` says, the
figures in report.json (quoted in the docs) are what the shipped model gives, and the
training script that made it runs and learns."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

import gemmalens as gl
from gemmalens.teaching import configs, images, train

NAME = "gemma3_vision"
TOLERANCE = 1e-4
ROOT = gl.teaching_model_path("gemma3").parents[3]


@pytest.fixture(scope="module")
def model():
    return gl.teaching_model(NAME)


@pytest.fixture(scope="module")
def report():
    return json.loads((ROOT / "docs" / "teaching" / "report.json").read_text())["models"][NAME]


def test_it_ships_small_with_the_documented_config(model):
    assert NAME in gl.teaching_models()
    folder = gl.teaching_model_path(NAME)
    assert sum(f.stat().st_size for f in folder.iterdir()) < 4 * 2**20
    shipped = json.loads((folder / "config.json").read_text())
    assert json.loads(json.dumps({**configs.hf_config(NAME), "torch_dtype": "bfloat16"})) == shipped
    # The text models' tokenizer: the vision model spells its questions in their words.
    text_tokenizer = gl.teaching_model_path("gemma3") / "tokenizer.model"
    assert (folder / "tokenizer.model").read_bytes() == text_tokenizer.read_bytes()
    assert model.config.vision.projector.mm_tokens_per_image == images.SOFT_TOKENS


def test_gemmalens_and_transformers_give_the_same_logits(model):
    examples = [e for group in images.held_out(2).values() for e in group]
    arrays = images.ImageQuestions(model.tokenizer).encode(examples)
    tokens, pixels = arrays["tokens"], arrays["pixel_values"]
    ours = np.asarray(model(tokens, pixel_values=pixels))
    reference = transformers.Gemma3ForConditionalGeneration.from_pretrained(
        gl.teaching_model_path(NAME), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        theirs = reference(
            input_ids=torch.as_tensor(tokens, dtype=torch.long),
            attention_mask=torch.as_tensor(tokens != 0, dtype=torch.long),
            token_type_ids=torch.as_tensor(tokens == images.IMAGE_ID, dtype=torch.long),
            pixel_values=torch.as_tensor(pixels),
        ).logits.numpy()
    real = tokens != 0
    assert np.abs(ours[real] - theirs[real]).max() < TOLERANCE
    # Trained, not random: logits spread over units, unlike a fresh init.
    assert ours[real].std() > 1.0
    # And the pixels matter: another picture changes the answer logits.
    other = np.asarray(model(tokens, pixel_values=pixels[::-1].copy()))
    rows = np.arange(len(examples))
    at = arrays["answer_start"] - 1
    assert np.abs(other[rows, at] - ours[rows, at]).max() > 1.0


def test_prompts_follow_gemma3_image_layout(model):
    data = images.ImageQuestions(model.tokenizer)
    example = images.held_out(1, kinds=("color",))["color"][0]
    ids = data.prompt_ids(example)
    newlines = model.tokenizer.encode("\n\n", add_bos=False)
    image_run = [images.BOI_ID, *[images.IMAGE_ID] * images.SOFT_TOKENS, images.EOI_ID]
    assert ids[: 3 + len(image_run)] == [2, *newlines, *image_run, *newlines]
    assert model.tokenizer.decode(ids[3 + len(image_run) :]) == example.question
    assert example.question.startswith("What color is the ") and example.answer.strip() in (
        images.COLORS
    )


def test_each_shape_stays_inside_its_cell():
    rng = np.random.default_rng(0)
    y, x = np.mgrid[: images.IMAGE_SIZE, : images.IMAGE_SIZE] + 0.5
    for _ in range(50):
        scene = images.random_scene(rng)
        for shape in scene.shapes:
            mask = images.shape_mask(shape, y, x)
            row, col = divmod(shape.cell, 2)
            cell = np.zeros_like(mask)
            half = images.CELL_PIXELS
            cell[row * half : (row + 1) * half, col * half : (col + 1) * half] = True
            assert mask.sum() > 20 and not (mask & ~cell).any()
            # The cell's soft tokens are the patches it covers (one 16 x 16 patch each).
            side = images.TOKENS_PER_SIDE
            patch = images.IMAGE_SIZE // side
            covered = {
                (int(py) // patch) * side + int(px) // patch for py, px in zip(*np.nonzero(mask))
            }
            assert covered == set(images.region_tokens(shape.cell))


@pytest.fixture(scope="module")
def measured(model):
    return images.measure(NAME, model)


def test_report_figures_are_what_the_shipped_model_gives(measured, report):
    """report.json's evidence (quoted in docs/teaching-models.md) recomputed."""
    shipped = report["evidence"]
    assert measured["accuracy"] == shipped["accuracy"]
    for kind in ("color", "where"):
        for layer, found in measured["attention"][kind]["layers"].items():
            expected = shipped["attention"][kind]["layers"][layer]
            for key in ("target", "other_shape", "empty"):
                np.testing.assert_allclose(found[key], expected[key], atol=2e-4)
    for where in ("target_cell", "control_cell"):
        for layer, found in measured["patching"][where].items():
            expected = shipped["patching"][where][layer]
            assert found["swap_fraction"] == expected["swap_fraction"]
            np.testing.assert_allclose(
                found["recovered_logit_difference"],
                expected["recovered_logit_difference"],
                atol=2e-3,
            )


def test_the_model_answers_and_looks_at_the_shape_asked_about(measured):
    accuracy = measured["accuracy"]
    assert accuracy["where"]["exact"] > 0.95 and accuracy["count"]["exact"] > 0.95
    # The colour question is half learned (docs/teaching-models.md): the colour of some
    # shape in the picture, well above the 25 % of guessing a colour.
    assert accuracy["color"]["exact"] > 0.5
    # "Where is the red shape?": some layer looks at that shape's cell far more than at
    # the other shapes'.
    attention = measured["attention"]["where"]["layers"].values()
    assert max(layer["target_mean"] / layer["other_shape_mean"] for layer in attention) > 2
    # Patching the asked-about shape's soft token at the first layer swaps the answers;
    # patching another cell's swaps almost none.
    patching = measured["patching"]
    assert patching["pairs"] > 50
    assert patching["target_cell"]["0"]["swap_fraction"] > 0.9
    assert patching["control_cell"]["0"]["swap_fraction"] < 0.05


def test_the_docs_page_quotes_the_measured_figures(report):
    page = (ROOT / "docs" / "teaching-models.md").read_text()
    assert f"{report['parameters']:,}" in page
    accuracy = report["evidence"]["accuracy"]
    row = " | ".join(f"{100 * accuracy[k]['exact']:.1f} %" for k in images.QUESTION_KINDS)
    assert f"| exact answer | {row} |" in page
    swaps = report["evidence"]["patching"]
    assert f"{100 * swaps['target_cell']['0']['swap_fraction']:.1f} %" in page
    assert f"{100 * swaps['control_cell']['0']['swap_fraction']:.1f} %" in page


def test_training_script_runs_on_a_tiny_setting_and_keeps_the_other_entries(tmp_path):
    report_dir = tmp_path / "report"
    report_dir.mkdir()
    earlier = {"settings": {"steps": 4000}, "models": {"gemma3": {"parameters": 1}}}
    (report_dir / "report.json").write_text(json.dumps(earlier))
    settings = train.Settings(
        tiny=True, image_steps=30, image_batch_size=8, warmup_steps=3, image_learning_rate=3e-3
    )
    train.run([NAME], tmp_path / "out", report_dir, settings, progress=False)
    losses = json.loads((report_dir / f"loss_{NAME}.json").read_text())
    assert len(losses) == 30 and np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0
    written = json.loads((report_dir / "report.json").read_text())
    assert written["models"]["gemma3"] == earlier["models"]["gemma3"]
    assert written["settings"] == earlier["settings"] and "total_seconds" not in written
    entry = written["models"][NAME]
    assert (
        entry["settings"]["steps"] == 30
        and entry["task"]["soft_tokens_per_image"] == images.SOFT_TOKENS
    )
    m = gl.load(tmp_path / "out" / NAME, vision=True)
    assert entry["parameters"] == m.config.num_params() and m.config.vision is not None
    example = images.held_out(1, kinds=("count",))["count"][0]
    arrays = images.ImageQuestions(m.tokenizer).encode([example])
    logits = m(arrays["tokens"], pixel_values=arrays["pixel_values"])
    assert logits.shape == (1, images.SEQ_LEN, configs.VOCAB_SIZE)
