"""The teaching models' training text: Python's own documentation plus synthetic tasks.

Everything here is available offline on any machine that runs gemmalens:

* **Documentation prose**: the docstrings of the Python standard library and of NumPy
  (a gemmalens dependency), read from their source files with `ast` (nothing is
  imported). Python is under the PSF License Agreement and NumPy under the BSD 3-clause
  licence; both allow derivative works such as models trained on them, and their notices
  ship beside the models (``assets/teaching/NOTICE``).
* **Synthetic text** with facts and grammar that make circuits easy to find: capital
  cities (for the logit lens), "indirect object" sentences (for activation patching),
  small additions (digits for the MoE router to tell apart) and chat turns in Gemma's
  format.
* **Synthetic token sequences**: a random span of tokens repeated, which is what grows
  induction heads.

All generators take a `numpy.random.Generator`, so a seed fixes the corpus.
"""

from __future__ import annotations

import ast
import pathlib
import sysconfig
from collections.abc import Iterator

import numpy as np

# Standard-library folders whose docstrings are tests, demos or platform shims rather
# than documentation prose.
_SKIPPED_PARTS = {
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "pydoc_data",
    "encodings",
}

COUNTRIES_AND_CAPITALS = (
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"),
    ("China", "Beijing"),
    ("India", "Delhi"),
    ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"),
    ("Peru", "Lima"),
    ("Chile", "Santiago"),
    ("Canada", "Ottawa"),
    ("Mexico", "Mexico City"),
    ("Brazil", "Brasilia"),
    ("Russia", "Moscow"),
    ("Greece", "Athens"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"),
    ("Poland", "Warsaw"),
    ("Austria", "Vienna"),
    ("Ireland", "Dublin"),
    ("England", "London"),
    ("Scotland", "Edinburgh"),
    ("Australia", "Canberra"),
    ("Turkey", "Ankara"),
    ("Iran", "Tehran"),
    ("Cuba", "Havana"),
    ("Argentina", "Buenos Aires"),
)
NAMES = (
    "Mary",
    "John",
    "Alice",
    "Bob",
    "Anna",
    "Tom",
    "Sarah",
    "James",
    "Emma",
    "David",
    "Lucy",
    "Peter",
    "Kate",
    "Paul",
    "Julia",
    "Mark",
)
PLACES = ("store", "park", "school", "market", "beach", "office", "garden", "library")
OBJECTS = ("drink", "book", "ball", "letter", "key", "flower", "ring", "gift", "map", "cake")
# ``{a}`` is the recipient, ``{b}`` the giver; ``{first} and {second}`` names both, in an
# order drawn per sentence, so that the answer is "the name that is not repeated" and not
# "the first name" (with the recipient always first, the models had learned the latter).
IOI_TEMPLATES = (
    "When {first} and {second} went to the {place}, {b} gave a {obj} to {a}.",
    "After {first} and {second} arrived at the {place}, {b} handed the {obj} to {a}.",
    "{first} and {second} were at the {place}. {b} passed the {obj} to {a}.",
    "Then {first} and {second} walked to the {place}, and {b} gave the {obj} to {a}.",
)
FACT_TEMPLATES = (
    "The capital of {country} is {capital}.",
    "{capital} is the capital of {country}.",
    "The capital city of {country} is {capital}.",
)


def documentation_roots() -> dict[str, pathlib.Path]:
    """Where the documentation prose comes from: source name -> folder of ``.py`` files."""
    return {
        "python-stdlib": pathlib.Path(sysconfig.get_paths()["stdlib"]),
        "numpy": pathlib.Path(np.__file__).parent,
    }


def source_files(root: str | pathlib.Path) -> list[pathlib.Path]:
    """The ``.py`` files under ``root``, sorted, without tests and demos."""
    root = pathlib.Path(root)
    files = [
        path
        for path in root.rglob("*.py")
        if not _SKIPPED_PARTS.intersection(path.relative_to(root).parts)
    ]
    return sorted(files, key=lambda path: path.relative_to(root).as_posix())


def docstrings(path: pathlib.Path) -> Iterator[str]:
    """The module, class and function docstrings of one source file, in source order."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            text = ast.get_docstring(node, clean=True)
            if text and len(text) >= 40:
                yield text


def documentation(
    max_chars: int | None = None, roots: dict[str, pathlib.Path] | None = None
) -> list[str]:
    """Docstrings under ``roots`` (default `documentation_roots`), deduplicated, in a fixed
    order, at most about ``max_chars`` characters in all."""
    seen: set[str] = set()
    out: list[str] = []
    total = 0
    paths = [p for root in (roots or documentation_roots()).values() for p in source_files(root)]
    for path in paths:
        for text in docstrings(path):
            if text in seen:
                continue
            seen.add(text)
            out.append(text)
            total += len(text)
            if max_chars is not None and total >= max_chars:
                return out
    return out


def ioi_sentence(rng: np.random.Generator) -> str:
    """``When Mary and John went to the store, John gave a drink to Mary.`` and kin."""
    a, b = rng.choice(len(NAMES), size=2, replace=False)
    template = IOI_TEMPLATES[rng.integers(len(IOI_TEMPLATES))]
    first, second = (a, b) if rng.random() < 0.5 else (b, a)
    return template.format(
        a=NAMES[a],
        b=NAMES[b],
        first=NAMES[first],
        second=NAMES[second],
        place=PLACES[rng.integers(len(PLACES))],
        obj=OBJECTS[rng.integers(len(OBJECTS))],
    )


def fact_sentence(rng: np.random.Generator) -> str:
    """``The capital of France is Paris.`` and kin."""
    country, capital = COUNTRIES_AND_CAPITALS[rng.integers(len(COUNTRIES_AND_CAPITALS))]
    template = FACT_TEMPLATES[rng.integers(len(FACT_TEMPLATES))]
    return template.format(country=country, capital=capital)


def addition_sentence(rng: np.random.Generator) -> str:
    """``17 + 25 = 42.``"""
    a, b = rng.integers(0, 50, size=2)
    return f"{a} + {b} = {a + b}."


def chat_exchange(rng: np.random.Generator) -> str:
    """One question and answer in Gemma's chat format."""
    country, capital = COUNTRIES_AND_CAPITALS[rng.integers(len(COUNTRIES_AND_CAPITALS))]
    return (
        f"<start_of_turn>user\nWhat is the capital of {country}?<end_of_turn>\n"
        f"<start_of_turn>model\nThe capital of {country} is {capital}.<end_of_turn>\n"
    )


SYNTHETIC_TEXT = {
    "ioi": ioi_sentence,
    "facts": fact_sentence,
    "additions": addition_sentence,
    "chat": chat_exchange,
}


def synthetic_paragraph(kind: str, rng: np.random.Generator, sentences: int = 8) -> str:
    """``sentences`` sentences of one synthetic kind, joined into a paragraph."""
    make = SYNTHETIC_TEXT[kind]
    separator = "" if kind == "chat" else " "
    return separator.join(make(rng) for _ in range(sentences))


def repeated_random_tokens(
    rng: np.random.Generator,
    length: int,
    low: int,
    high: int,
    span: tuple[int, int] = (8, 48),
) -> np.ndarray:
    """``length`` tokens made of one random span (ids in [low, high)) repeated.

    The span length is drawn from ``span``; the first copy is new to the model, every
    later copy can be predicted by looking back one span: the induction task.
    """
    span_length = int(rng.integers(span[0], span[1] + 1))
    pattern = rng.integers(low, high, size=span_length)
    return np.resize(pattern, length)


# ------------------------------------------------------------------- encoder-decoder tasks

# Words that are single pieces of the teaching tokenizer (with their leading space).
SEQ2SEQ_WORDS = NAMES + PLACES + OBJECTS
SEQ2SEQ_TASKS = ("copy", "reverse", "capital", "indirect_object")


def seq2seq_example(task: str, rng: np.random.Generator) -> tuple[str, str]:
    """One (encoder text, decoder target) pair. The tasks make cross-attention easy to read:
    copying aligns the decoder with the encoder token by token, reversing aligns it
    backwards, and the two questions make it find one word (the country, the other name)."""
    if task in ("copy", "reverse"):
        count = int(rng.integers(4, 11))
        words = [SEQ2SEQ_WORDS[i] for i in rng.integers(len(SEQ2SEQ_WORDS), size=count)]
        target = words[::-1] if task == "reverse" else words
        return f"{task}: " + " ".join(words), " " + " ".join(target)
    if task == "capital":
        country, capital = COUNTRIES_AND_CAPITALS[rng.integers(len(COUNTRIES_AND_CAPITALS))]
        return f"What is the capital of {country}?", f" {capital}"
    if task == "indirect_object":
        a, b = rng.choice(len(NAMES), size=2, replace=False)
        place, obj = PLACES[rng.integers(len(PLACES))], OBJECTS[rng.integers(len(OBJECTS))]
        first, second = (a, b) if rng.random() < 0.5 else (b, a)
        question = (
            f"When {NAMES[first]} and {NAMES[second]} went to the {place}, "
            f"{NAMES[b]} gave a {obj} to whom?"
        )
        return question, f" {NAMES[a]}"
    raise KeyError(f"Unknown task {task!r}; choose one of {SEQ2SEQ_TASKS}.")
