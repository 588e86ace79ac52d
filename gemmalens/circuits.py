"""Finding well-known circuits: induction heads.

An induction head completes a pattern it has seen earlier in the context: on ``A B ... A``
it attends from the second ``A`` to the ``B`` that followed the first, and predicts ``B``.
Repeated random tokens isolate it: nothing but the earlier copy predicts the second.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

# Gemma's first ordinary piece: 107 special pieces and 256 byte pieces come first.
FIRST_ORDINARY_ID = 107 + 256
# Random tokens come from the commonest pieces of a large vocabulary (BPE ids grow with rarity).
_MAX_RANDOM_ID = 32_000


def repeated_random_tokens(m: Any, span: int = 40, batch: int = 16, seed: int = 0) -> np.ndarray:
    """``[batch, 1 + 2 * span]``: ``<bos>``, ``span`` random ordinary tokens, the same again."""
    vocab = m.config.vocab_size
    high = min(vocab, _MAX_RANDOM_ID)
    if high - FIRST_ORDINARY_ID < span:
        raise ValueError(f"The vocabulary ({vocab}) is too small for {span} random tokens.")
    rng = np.random.default_rng(seed)
    pattern = rng.integers(FIRST_ORDINARY_ID, high, (batch, span))
    bos = np.full((batch, 1), m.config.bos_token_id)
    return np.concatenate([bos, pattern, pattern], axis=1)


@dataclasses.dataclass(frozen=True)
class InductionScores:
    """Attributes:
    scores: ``[layer, head]`` mean attention from each token of the second copy to the token
      after its first occurrence.
    chance: ``[layer]`` the same score for uniform attention over the keys each layer's
      mask allows; zero where a sliding window cannot reach back one span.
    """

    scores: np.ndarray
    chance: np.ndarray

    def top(self, k: int = 3) -> list[tuple[int, int, float]]:
        """The ``k`` highest-scoring heads as ``(layer, head, score)``."""
        order = np.argsort(-self.scores, axis=None, kind="stable")[:k]
        layers, heads = np.unravel_index(order, self.scores.shape)
        return [(int(i), int(h), float(self.scores[i, h])) for i, h in zip(layers, heads)]


def induction_scores(m: Any, tokens: np.ndarray | None = None) -> InductionScores:
    """Induction score of every head of ``m`` on repeated random tokens (``tokens`` as made
    by `repeated_random_tokens`; made with the defaults when None)."""
    if tokens is None:
        tokens = repeated_random_tokens(m)
    span = (tokens.shape[1] - 1) // 2
    _, cache = m.run_with_cache(tokens, names="blocks.*.attn.hook_pattern")
    queries = np.arange(span + 1, 2 * span + 1)
    targets = queries - span + 1
    scores, chance = [], []
    for layer in range(m.config.num_hidden_layers):
        pattern = np.asarray(cache[f"blocks.{layer}.attn.hook_pattern"], np.float32)
        scores.append(pattern[:, :, queries, targets].mean(axis=(0, 2)))
        allowed = pattern[0, 0, queries] > 0  # [query, key]: keys the mask lets through
        reach = allowed[np.arange(len(queries)), targets]
        chance.append(float(np.mean(reach / allowed.sum(axis=1))))
    return InductionScores(np.stack(scores), np.asarray(chance))
