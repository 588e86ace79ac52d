"""Picture questions for the Gemma 3 vision teaching model, and what it learned from them.

Each picture is 32 x 32 pixels: a light background cut into a 2 x 2 grid of cells, with
one to three coloured shapes (circle, square, triangle; red, green, blue, yellow), at
most one of each kind and colour, each inside its own cell. Three questions follow the
image, in Gemma 3's prompt layout::

    <bos> \\n\\n <start_of_image> <image>*4 <end_of_image> \\n\\n What color is the circle?  red <eos>
                                                             Where is the red shape?  top left <eos>
                                                             How many shapes are there?  two <eos>

The SigLIP tower cuts the picture into 16 x 16 patches, a 2 x 2 grid; each patch becomes
one soft token (no pooling), so each cell of the picture is one soft token
(`region_tokens`) and each shape lies inside one patch. Every word is already in the teaching tokenizer; the image markers are
unused pieces (`gemmalens.teaching.configs`).

The second half measures the trained model (`measure`, written to
``docs/teaching/report.json``): accuracy per question, where the answer position's
attention goes among the image's soft tokens, and whether patching the asked-about
shape's soft tokens from a picture where that shape has another colour swaps the answer.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from gemmalens.vision.merge import block_ids
from gemmalens.vision.preprocess import expand_gemma3_image_ids

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (225, 190, 20),
}
SHAPES = ("circle", "square", "triangle")
# Row-major over the 2 x 2 grid: cell index = 2 * row + column.
CELLS = ("top left", "top right", "bottom left", "bottom right")
COUNTS = ("zero", "one", "two", "three")
QUESTION_KINDS = ("color", "where", "count")

IMAGE_SIZE = 32
CELL_PIXELS = IMAGE_SIZE // 2
TOKENS_PER_SIDE = 2  # the soft-token grid (one token per 16 x 16 patch)
SOFT_TOKENS = TOKENS_PER_SIDE**2
# <unused96..98>: pieces no text produces (as for T5Gemma 2's teaching model).
BOI_ID, EOI_ID, IMAGE_ID = 102, 103, 104
# Prompt, answer and <eos> of every question fit (the longest is 21 tokens).
SEQ_LEN = 24
# The longest answer (" bottom right": ▁b ot t om ▁right) is 5 tokens; with <eos>, at most
# this many tokens are learned per row.
ANSWER_SLOTS = 6
# Held-out pictures come from this seed; training draws from ``Settings.seed + 2``.
EVAL_SEED = 20_261_205


# ---------------------------------------------------------------------------- pictures


@dataclasses.dataclass(frozen=True)
class Shape:
    """One shape: its kind, colour name, cell (index into `CELLS`), centre (y, x) in
    pixels and half-size in pixels."""

    kind: str
    color: str
    cell: int
    center: tuple[float, float]
    half_size: float


@dataclasses.dataclass(frozen=True)
class Scene:
    """A picture's contents: its shapes and the background's grey level and noise seed."""

    shapes: tuple[Shape, ...]
    background: int
    noise_seed: int

    def render(self) -> np.ndarray:
        """``[IMAGE_SIZE, IMAGE_SIZE, 3]`` uint8 RGB."""
        noise = np.random.default_rng(self.noise_seed).normal(0, 4, (IMAGE_SIZE, IMAGE_SIZE, 1))
        image = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), float(self.background)) + noise
        y, x = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE] + 0.5  # pixel centres
        for shape in self.shapes:
            image[shape_mask(shape, y, x)] = COLORS[shape.color]
        return np.clip(image, 0, 255).round().astype(np.uint8)

    def recolored(self, index: int, color: str) -> Scene:
        """The same picture with shape ``index`` painted ``color``."""
        shapes = list(self.shapes)
        shapes[index] = dataclasses.replace(shapes[index], color=color)
        return dataclasses.replace(self, shapes=tuple(shapes))


def shape_mask(shape: Shape, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Boolean mask of the pixels (centres ``y``, ``x``) that ``shape`` covers."""
    cy, cx = shape.center
    r = shape.half_size
    if shape.kind == "circle":
        return (y - cy) ** 2 + (x - cx) ** 2 <= r**2
    if shape.kind == "square":
        return (np.abs(y - cy) <= 0.85 * r) & (np.abs(x - cx) <= 0.85 * r)
    # An upright triangle: apex at the top, base at the bottom, as wide as it is tall.
    top = cy - r
    return (y >= top) & (y <= cy + r) & (np.abs(x - cx) <= (y - top) / 2)


def random_scene(rng: np.random.Generator, num_shapes: int | None = None) -> Scene:
    """One to three shapes (``num_shapes``), distinct kinds, colours and cells, each with a
    random size (half-size 5 to 6.5 pixels) and place (within a pixel of its cell's
    middle)."""
    count = int(rng.integers(1, 4)) if num_shapes is None else num_shapes
    kinds = rng.permutation(SHAPES)[:count]
    colors = rng.permutation(list(COLORS))[:count]
    cells = rng.permutation(len(CELLS))[:count]
    shapes = []
    for kind, color, cell in zip(kinds, colors, cells):
        # Near the middle of the cell and of about one size, to make the kinds easy to tell
        # apart. (It was not enough: after 2,000 steps the model names the colour of a
        # random shape of the picture, 60 %, as with sizes from 4 to 6.5 pixels anywhere in
        # the cell after 1,500 steps, 56 %. Where and how many it learns either way.)
        half = float(rng.uniform(5.0, 6.5))
        middle = CELL_PIXELS / 2
        row, col = divmod(int(cell), 2)
        center = (
            row * CELL_PIXELS + middle + float(rng.uniform(-1.0, 1.0)),
            col * CELL_PIXELS + middle + float(rng.uniform(-1.0, 1.0)),
        )
        shapes.append(Shape(str(kind), str(color), int(cell), center, half))
    return Scene(tuple(shapes), int(rng.integers(200, 250)), int(rng.integers(2**31)))


def pixel_values(images: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """``[N, H, W, 3]`` uint8 -> ``[N, 3, H, W]`` float32 in [-1, 1], as Gemma 3's image
    processor scales and normalises them (mean = std = 0.5)."""
    array = np.asarray(images, np.float32) / 255.0
    return ((array - 0.5) / 0.5).transpose(0, 3, 1, 2).copy()


def region_tokens(cell: int) -> list[int]:
    """The soft tokens (indices among an image's `SOFT_TOKENS`, row-major) that cover
    ``cell``: one per cell here."""
    per_cell = TOKENS_PER_SIDE // 2  # soft tokens along a cell's side
    row, col = divmod(cell, 2)
    return [
        (per_cell * row + dy) * TOKENS_PER_SIDE + per_cell * col + dx
        for dy in range(per_cell)
        for dx in range(per_cell)
    ]


# ---------------------------------------------------------------------------- questions


@dataclasses.dataclass(frozen=True)
class Example:
    """One picture question: ``answer`` is the text after the prompt (with its leading
    space); ``target`` the index of the shape asked about (None for counting)."""

    scene: Scene
    kind: str
    question: str
    answer: str
    target: int | None


def ask(scene: Scene, kind: str, rng: np.random.Generator) -> Example:
    """A question of ``kind`` (one of `QUESTION_KINDS`) about ``scene``."""
    if kind == "count":
        return Example(
            scene, kind, "How many shapes are there?", " " + COUNTS[len(scene.shapes)], None
        )
    target = int(rng.integers(len(scene.shapes)))
    shape = scene.shapes[target]
    if kind == "color":
        return Example(scene, kind, f"What color is the {shape.kind}?", " " + shape.color, target)
    if kind == "where":
        return Example(
            scene, kind, f"Where is the {shape.color} shape?", " " + CELLS[shape.cell], target
        )
    raise ValueError(f"No question kind {kind!r}; choose one of {QUESTION_KINDS}.")


def random_examples(
    rng: np.random.Generator, count: int, kinds: Sequence[str] = QUESTION_KINDS
) -> list[Example]:
    """``count`` examples, question kinds drawn evenly from ``kinds``."""
    return [ask(random_scene(rng), str(kind), rng) for kind in rng.choice(kinds, size=count)]


class ImageQuestions:
    """Turns examples into token and pixel arrays, and draws training batches.

    Rows are ``prompt + answer + <eos>``, padded on the right to ``seq_len``; the loss
    mask marks the answer tokens and ``<eos>`` (what the model learns to say).
    """

    def __init__(self, tokenizer: Any, batch_size: int = 64, seq_len: int = SEQ_LEN):
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.newlines = tokenizer.encode("\n\n", add_bos=False)
        for word in [*COLORS, *SHAPES, *CELLS, *COUNTS]:
            if tokenizer.unk_id in tokenizer.encode(" " + word, add_bos=False):
                raise ValueError(f"The tokenizer cannot spell {word!r}.")

    def prompt_ids(self, example: Example) -> list[int]:
        """``<bos>``, the image block (Gemma 3's layout) and the question."""
        ids = [self.tokenizer.bos_id, BOI_ID, *self.tokenizer.encode(example.question, False)]
        return expand_gemma3_image_ids(ids, 1, BOI_ID, EOI_ID, IMAGE_ID, SOFT_TOKENS, self.newlines)

    def answer_ids(self, example: Example) -> list[int]:
        return self.tokenizer.encode(example.answer, add_bos=False)

    def encode(self, examples: Sequence[Example]) -> dict[str, np.ndarray]:
        """Arrays for ``examples`` (``B`` of them)::

        tokens        [B, seq_len] int32: prompt, answer, <eos>, padding
        loss_mask     [B, seq_len] int32: 1 at the answer tokens and <eos>
        image_blocks  [B, seq_len] int32: 0 on the image tokens, -1 elsewhere
        pixel_values  [B, 3, 32, 32] float32
        answer_start  [B] int32: position of the first answer token
        answer_length [B] int32: answer tokens (without <eos>)
        image_start   [B] int32: position of the first image token
        """
        count = len(examples)
        tokens = np.zeros((count, self.seq_len), np.int32)
        loss_mask = np.zeros_like(tokens)
        starts, lengths = np.zeros(count, np.int32), np.zeros(count, np.int32)
        for row, example in enumerate(examples):
            prompt, answer = self.prompt_ids(example), self.answer_ids(example)
            ids = [*prompt, *answer, self.tokenizer.eos_id]
            if len(ids) > self.seq_len:
                raise ValueError(f"{example.question!r} takes {len(ids)} > {self.seq_len} tokens.")
            tokens[row, : len(ids)] = ids
            loss_mask[row, len(prompt) : len(ids)] = 1
            starts[row], lengths[row] = len(prompt), len(answer)
        return {
            "tokens": tokens,
            "loss_mask": loss_mask,
            "image_blocks": block_ids(tokens == IMAGE_ID),
            "pixel_values": pixel_values([e.scene.render() for e in examples]),
            "answer_start": starts,
            "answer_length": lengths,
            "image_start": np.argmax(tokens == IMAGE_ID, axis=1).astype(np.int32),
        }

    def batch(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """A training batch: what `gemmalens.teaching.train.Trainer.step` reads.

        Besides ``tokens``, ``image_blocks`` and ``pixel_values`` (`encode`), the loss's
        ``[batch, ANSWER_SLOTS]`` arrays: ``loss_positions`` (the positions whose next
        token is an answer token or ``<eos>``), ``loss_targets`` (those tokens) and
        ``loss_weights`` (1 where a slot holds one, 0 past the ``<eos>``).
        """
        arrays = self.encode(random_examples(rng, self.batch_size))
        slots = np.arange(ANSWER_SLOTS)
        positions = np.minimum(arrays["answer_start"][:, None] - 1 + slots, self.seq_len - 2)
        targets = np.take_along_axis(arrays["tokens"], positions + 1, axis=1)
        weights = np.take_along_axis(arrays["loss_mask"], positions + 1, axis=1)
        weights = weights * (slots <= arrays["answer_length"][:, None])  # no slot counted twice
        return {
            **{k: arrays[k] for k in ("tokens", "image_blocks", "pixel_values")},
            "loss_positions": positions.astype(np.int32),
            "loss_targets": targets.astype(np.int32),
            "loss_weights": weights.astype(np.int32),
        }

    def describe(self) -> dict[str, Any]:
        return {
            "image_size": IMAGE_SIZE,
            "soft_tokens_per_image": SOFT_TOKENS,
            "colors": list(COLORS),
            "shapes": list(SHAPES),
            "cells": list(CELLS),
            "shapes_per_image": [1, 3],
            "question_kinds": {kind: 1 / len(QUESTION_KINDS) for kind in QUESTION_KINDS},
            "seq_len": self.seq_len,
        }


def model_config(hf_config: dict[str, Any]) -> Any:
    """The `gemmalens.Gemma3Config` (with its vision tower) that a ``gemma3``
    (Gemma3ForConditionalGeneration) config dict describes, as ``gl.load(path,
    vision=True)`` builds it."""
    from gemmalens.families.gemma3 import Gemma3Config
    from gemmalens.vision.siglip import Gemma3VisionConfig

    config = Gemma3Config.from_hf(hf_config["text_config"])
    return dataclasses.replace(
        config,
        # Gemma3ForConditionalGeneration never applies the final logit soft-cap.
        final_logit_softcapping=None,
        vision=Gemma3VisionConfig.from_hf(hf_config),
        image_token_id=int(hf_config["image_token_index"]),
    )


# ----------------------------------------------------------------------------- evidence


def held_out(
    count: int, kinds: Sequence[str] = QUESTION_KINDS, seed: int = EVAL_SEED
) -> dict[str, list]:
    """``count`` examples of each kind in ``kinds``, from the held-out seed."""
    rng = np.random.default_rng(seed)
    return {kind: [ask(random_scene(rng), kind, rng) for _ in range(count)] for kind in kinds}


def _answer_logits(m: Any, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """``[B, seq, vocab]`` logits of the model on ``arrays`` (teacher-forced answers)."""
    return np.asarray(m(arrays["tokens"], pixel_values=arrays["pixel_values"]))


def accuracy(m: Any, examples: dict[str, list[Example]]) -> dict[str, dict[str, float]]:
    """Per question kind: ``first_token`` (the top token after the prompt is the answer's
    first) and ``exact`` (every answer token is the top one, fed the ones before: what
    greedy decoding says), over ``examples[kind]``."""
    data = ImageQuestions(m.tokenizer)
    found = {}
    for kind, group in examples.items():
        arrays = data.encode(group)
        predicted = _answer_logits(m, arrays).argmax(-1)
        first, exact = [], []
        for row, (start, length) in enumerate(zip(arrays["answer_start"], arrays["answer_length"])):
            right = (
                predicted[row, start - 1 : start - 1 + length]
                == (arrays["tokens"][row, start : start + length])
            )
            first.append(bool(right[0]))
            exact.append(bool(right.all()))
        found[kind] = {
            "first_token": float(np.mean(first)),
            "exact": float(np.mean(exact)),
            "examples": len(group),
        }
    return found


def greedy_answers(
    m: Any, examples: Sequence[Example], max_tokens: int = ANSWER_SLOTS
) -> list[str]:
    """What the model says after each prompt, greedily, up to ``<eos>`` (at most
    ``max_tokens`` tokens). Every step runs the same ``[B, SEQ_LEN]`` shape (the rest of
    each row is padding), so the model compiles once."""
    arrays = ImageQuestions(m.tokenizer).encode(examples)
    lengths = arrays["answer_start"].copy()
    tokens = np.where(np.arange(arrays["tokens"].shape[1]) < lengths[:, None], arrays["tokens"], 0)
    said: list[list[int]] = [[] for _ in examples]
    done = np.zeros(len(examples), bool)
    rows = np.arange(len(examples))
    for _ in range(max_tokens):
        logits = np.asarray(m(tokens, pixel_values=arrays["pixel_values"]))
        chosen = logits[rows, lengths - 1].argmax(-1)
        done |= chosen == m.tokenizer.eos_id
        for row in rows[~done]:
            said[row].append(int(chosen[row]))
            tokens[row, lengths[row]] = chosen[row]
        lengths = np.where(done, lengths, lengths + 1)
        if done.all():
            break
    return [m.tokenizer.decode(ids) for ids in said]


def _region_positions(arrays: dict[str, np.ndarray], row: int, cell: int) -> np.ndarray:
    return arrays["image_start"][row] + np.asarray(region_tokens(cell))


def attention_to_shapes(m: Any, examples: list[Example]) -> dict[str, Any]:
    """Where the last prompt token (the position that says the answer's first token)
    attends among the image's soft tokens, per layer and head, averaged over
    ``examples`` (each asks about one shape, and holds at least one other).

    Returns, per layer ``"0"``.., the attention mass (summed over a cell's soft
    tokens, so 0..1) on the asked-about shape's cell (``target``), on another shape's
    cell (``other_shape``, mean over the other shapes) and on an empty cell
    (``empty``), as ``[head]`` lists and their head mean (``*_mean``); with ``ratio``
    = target / other_shape per head.
    """
    examples = [e for e in examples if e.target is not None and len(e.scene.shapes) > 1]
    arrays = ImageQuestions(m.tokenizer).encode(examples)
    _, cache = m.run_with_cache(
        arrays["tokens"],
        names=lambda n: n.endswith("attn.hook_pattern") and "vision" not in n,
        pixel_values=arrays["pixel_values"],
    )
    layers = m.config.num_hidden_layers
    found = {}
    for layer in range(layers):
        pattern = np.asarray(cache[f"blocks.{layer}.attn.hook_pattern"])  # [B, head, q, k]
        target, other, empty = [], [], []
        for row, example in enumerate(examples):
            query = arrays["answer_start"][row] - 1
            weights = pattern[row, :, query]  # [head, k]

            def mass(cell: int, row: int = row, weights: np.ndarray = weights) -> np.ndarray:
                return weights[:, _region_positions(arrays, row, cell)].sum(axis=-1)

            cells = [shape.cell for shape in example.scene.shapes]
            asked = example.scene.shapes[example.target].cell
            target.append(mass(asked))
            other.append(np.mean([mass(c) for c in cells if c != asked], axis=0))
            free = [c for c in range(len(CELLS)) if c not in cells]
            if free:
                empty.append(np.mean([mass(c) for c in free], axis=0))
        target_mean, other_mean = np.mean(target, axis=0), np.mean(other, axis=0)
        found[str(layer)] = {
            "target": target_mean.tolist(),
            "other_shape": other_mean.tolist(),
            "empty": np.mean(empty, axis=0).tolist(),
            "ratio": (target_mean / np.maximum(other_mean, 1e-9)).tolist(),
            "target_mean": float(target_mean.mean()),
            "other_shape_mean": float(other_mean.mean()),
            "empty_mean": float(np.mean(empty)),
            "layer_type": m.config.layer_types[layer],
        }
    return {"examples": len(examples), "layers": found}


def recolored_pairs(
    examples: list[Example], seed: int = EVAL_SEED
) -> list[tuple[Example, Example]]:
    """For each colour question, the same picture with the asked-about shape painted a
    colour no shape in it has: (clean, corrupted) example pairs."""
    rng = np.random.default_rng(seed + 1)
    pairs = []
    for example in examples:
        used = {shape.color for shape in example.scene.shapes}
        color = str(rng.choice([c for c in COLORS if c not in used]))
        scene = example.scene.recolored(example.target, color)
        pairs.append((example, dataclasses.replace(example, scene=scene, answer=" " + color)))
    return pairs


def recolor_patching(m: Any, examples: list[Example]) -> dict[str, Any]:
    """Activation patching between a picture and its recoloured twin (`recolored_pairs`).

    The corrupted run (asked-about shape in another colour) has the clean run's residual
    stream patched in at the soft tokens of one cell, at the input of each layer in turn
    (``blocks.{L}.hook_resid_pre``); the answer "swaps" when the top token at the answer
    position becomes the clean answer's first token. Only pairs whose clean and
    corrupted answers the model both gets right are patched (``pairs``).

    Returns the swap fraction and the mean recovered logit difference
    ``(patched - corrupted) / (clean - corrupted)`` of ``logit[clean] - logit[corrupted]``,
    per layer, for the asked-about shape's cell (``target_cell``) and, as a control, for
    another shape's cell or an empty one (``control_cell``).
    """
    data = ImageQuestions(m.tokenizer)
    pairs = recolored_pairs(examples)
    clean = data.encode([c for c, _ in pairs])
    corrupted = data.encode([c for _, c in pairs])
    rows = np.arange(len(pairs))
    query = clean["answer_start"] - 1
    clean_id = clean["tokens"][rows, clean["answer_start"]]
    corrupted_id = corrupted["tokens"][rows, corrupted["answer_start"]]
    names = [f"blocks.{i}.hook_resid_pre" for i in range(m.config.num_hidden_layers)]
    clean_logits, clean_cache = m.run_with_cache(
        clean["tokens"], names=names, pixel_values=clean["pixel_values"]
    )
    corrupted_logits = np.asarray(m(corrupted["tokens"], pixel_values=corrupted["pixel_values"]))
    clean_logits = np.asarray(clean_logits)

    def difference(logits: np.ndarray) -> np.ndarray:
        at = logits[rows, query]
        return at[rows, clean_id] - at[rows, corrupted_id]

    keep = (clean_logits[rows, query].argmax(-1) == clean_id) & (
        corrupted_logits[rows, query].argmax(-1) == corrupted_id
    )
    base_clean, base_corrupted = difference(clean_logits), difference(corrupted_logits)
    found: dict[str, Any] = {"pairs": int(keep.sum()), "of": len(pairs)}
    for where in ("target_cell", "control_cell"):
        patch_mask = np.zeros(clean["tokens"].shape, bool)
        for row, (example, _) in enumerate(pairs):
            asked = example.scene.shapes[example.target].cell
            if where == "target_cell":
                cell = asked
            else:  # another shape's cell when there is one, else the next cell round
                others = [s.cell for s in example.scene.shapes if s.cell != asked]
                cell = others[0] if others else (asked + 1) % len(CELLS)
            patch_mask[row, _region_positions(clean, row, cell)] = True
        per_layer = {}
        for layer, name in enumerate(names):
            source = jnp.asarray(clean_cache[name])
            mask = jnp.asarray(patch_mask)[..., None]

            def patch(value, hook_name, source=source, mask=mask):
                return jnp.where(mask, source, value)

            patched = np.asarray(
                m.run_with_hooks(
                    corrupted["tokens"], {name: patch}, pixel_values=corrupted["pixel_values"]
                )
            )
            swapped = patched[rows, query].argmax(-1) == clean_id
            recovered = (difference(patched) - base_corrupted) / (base_clean - base_corrupted)
            # None when no pair qualifies (an untrained model).
            per_layer[str(layer)] = {
                "swap_fraction": float(swapped[keep].mean()) if keep.any() else None,
                "recovered_logit_difference": float(recovered[keep].mean()) if keep.any() else None,
            }
        found[where] = per_layer
    return found


def measure(
    name: str, m: Any, data: Any = None, report_dir: pathlib.Path | None = None
) -> dict[str, Any]:
    """Every figure report.json records for the vision teaching model (same signature as
    `gemmalens.teaching.evidence.measure`); with ``report_dir``, also its figure."""
    examples = held_out(200)
    found = {
        "held_out_seed": EVAL_SEED,
        "accuracy": accuracy(m, examples),
        "attention": {kind: attention_to_shapes(m, examples[kind]) for kind in ("color", "where")},
        "patching": recolor_patching(m, examples["color"]),
    }
    if report_dir is not None:
        plot_attention(m, examples["where"][:6], pathlib.Path(report_dir) / f"attention_{name}.png")
    return found


def plot_attention(m: Any, examples: list[Example], path: pathlib.Path) -> None:
    """Each picture above the answer position's attention over its soft tokens, on each
    layer (mean over heads), on one colour scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arrays = ImageQuestions(m.tokenizer).encode(examples)
    _, cache = m.run_with_cache(
        arrays["tokens"], names=["blocks.*.attn.hook_pattern"], pixel_values=arrays["pixel_values"]
    )
    layers = list(range(m.config.num_hidden_layers))
    fig, axes = plt.subplots(
        1 + len(layers), len(examples), figsize=(1.9 * len(examples), 9.5), dpi=120
    )
    for col, example in enumerate(examples):
        axes[0, col].imshow(example.scene.render())
        axes[0, col].set_title(f"{example.question}\n→{example.answer}", fontsize=7)
        query = arrays["answer_start"][col] - 1
        start = arrays["image_start"][col]
        for row, layer in enumerate(layers, start=1):
            pattern = np.asarray(cache[f"blocks.{layer}.attn.hook_pattern"])[col, :, query]
            grid = pattern.mean(0)[start : start + SOFT_TOKENS].reshape(TOKENS_PER_SIDE, -1)
            # One scale for every panel: attention mass on a cell, 0 to 0.5.
            shown = axes[row, col].imshow(grid, cmap="magma", vmin=0, vmax=0.5)
            if col == 0:
                kind = m.config.layer_types[layer].split("_")[0]
                axes[row, col].set_ylabel(f"layer {layer}\n({kind})")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        "Where the answer position attends among the image's soft tokens (mean over heads)"
    )
    fig.tight_layout()
    fig.colorbar(shown, ax=axes[1:].ravel().tolist(), shrink=0.6, label="attention on the cell")
    fig.savefig(path)
    plt.close(fig)
