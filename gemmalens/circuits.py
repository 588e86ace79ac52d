"""Finding well-known circuits: induction heads.

An induction head completes a pattern it has seen earlier in the context: on ``A B ... A``
it attends from the second ``A`` to the ``B`` that followed the first, and predicts ``B``.
Repeated random tokens isolate it: nothing but the earlier copy predicts the second.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from gemmalens import residual

# Gemma's first ordinary piece: 107 special pieces and 256 byte pieces come first.
FIRST_ORDINARY_ID = 107 + 256
# Random tokens come from the commonest pieces of a large vocabulary (BPE ids grow with rarity).
_MAX_RANDOM_ID = 32_000


def _encoder_decoder(m: Any) -> bool:
    return "decoder_tokens" in getattr(m, "input_streams", ())


def _decoder_config(m: Any) -> Any:
    """The config of the stack that reads the repeated tokens (an encoder-decoder's
    decoder)."""
    return m.config.decoder if _encoder_decoder(m) else m.config


def repeated_random_tokens(m: Any, span: int = 40, batch: int = 16, seed: int = 0) -> np.ndarray:
    """``[batch, 1 + 2 * span]``: ``<bos>``, ``span`` random ordinary tokens, the same again."""
    if span < 1 or batch < 1:
        raise ValueError(f"span and batch must be at least 1; got span={span}, batch={batch}.")
    config = _decoder_config(m)
    vocab = config.vocab_size
    high = min(vocab, _MAX_RANDOM_ID)
    if high - FIRST_ORDINARY_ID < span:
        raise ValueError(f"The vocabulary ({vocab}) is too small for {span} random tokens.")
    rng = np.random.default_rng(seed)
    pattern = rng.integers(FIRST_ORDINARY_ID, high, (batch, span))
    bos = np.full((batch, 1), config.bos_token_id)
    return np.concatenate([bos, pattern, pattern], axis=1)


@dataclasses.dataclass(frozen=True)
class InductionScores:
    """What `induction_scores` measured.

    Attributes:
      scores: ``[layer, head]`` mean attention from each token of the second copy to the
        token after its first occurrence.
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


def induction_scores(
    m: Any, tokens: np.ndarray | None = None, encoder_tokens: np.ndarray | None = None
) -> InductionScores:
    """Induction score of every head of ``m`` on repeated random tokens (``tokens`` as made
    by `repeated_random_tokens`; made with the defaults when None).

    For an encoder-decoder (T5Gemma 2) the repeated tokens are the decoder's input and the
    heads are the decoder's: its attention is one softmax over its own earlier tokens and
    the encoder's outputs, so a score is the share of a query's whole attention that goes
    to the target, and ``chance`` counts the encoder's positions among the keys. The
    encoder reads ``encoder_tokens`` (``[batch, any length]``; default: ``<bos>`` alone,
    so that nearly all attention stays in the decoder). Decoders take no
    ``encoder_tokens``."""
    if tokens is None:
        tokens = repeated_random_tokens(m)
    tokens = np.asarray(tokens)
    span = (tokens.shape[-1] - 1) // 2
    # The score reads fixed positions: on any other layout it would measure something else.
    shaped = tokens.ndim == 2 and span >= 1 and tokens.shape[1] == 1 + 2 * span
    if not shaped or not np.array_equal(tokens[:, 1 : 1 + span], tokens[:, 1 + span :]):
        raise ValueError(
            "induction_scores reads tokens laid out as [batch, 1 + 2 * span]: a first token, "
            f"a span of tokens, then the same span again; got shape {tokens.shape}"
            f"{' whose halves differ' if shaped else ''}. Make them with "
            "gl.circuits.repeated_random_tokens(m, span=...)."
        )
    stack = residual.find_stack(m.config, None)  # the stack that reads the repeated tokens
    names = f"{stack.prefix}blocks.*.attn.hook_pattern"
    if _encoder_decoder(m):
        if encoder_tokens is None:
            encoder_tokens = np.full((tokens.shape[0], 1), _decoder_config(m).bos_token_id)
        _, cache = m.run_with_cache(encoder_tokens, decoder_tokens=tokens, names=names)
    elif encoder_tokens is not None:
        raise ValueError(
            "encoder_tokens is for encoder-decoder models (T5Gemma 2); this model is a "
            "decoder: pass the repeated tokens alone."
        )
    else:
        _, cache = m.run_with_cache(tokens, names=names)
    queries = np.arange(span + 1, 2 * span + 1)
    targets = queries - span + 1
    scores, chance = [], []
    for layer in range(stack.num_layers):
        # An encoder-decoder's merged pattern lists the decoder's own keys first.
        name = f"{stack.prefix}blocks.{layer}.attn.hook_pattern"
        pattern = np.asarray(cache[name], np.float32)
        scores.append(pattern[:, :, queries, targets].mean(axis=(0, 2)))
        allowed = pattern[0, 0, queries] > 0  # [query, key]: keys the mask lets through
        reach = allowed[np.arange(len(queries)), targets]
        chance.append(float(np.mean(reach / allowed.sum(axis=1))))
    return InductionScores(np.stack(scores), np.asarray(chance))
