"""What every family reads from a transformers config dict the same way."""

from __future__ import annotations

from typing import Any


def reject_unimplemented(hf: dict[str, Any], family: str) -> None:
    """Raises for config switches that no released checkpoint of the family turns on and
    gemmalens does not implement (attention biases, an activation other than GELU-tanh),
    so such a config fails loudly instead of loading into a silently different model."""
    if hf.get("attention_bias"):
        raise ValueError(
            f"This {family} config sets attention_bias={hf['attention_bias']!r}, which no "
            f"released {family} uses and gemmalens does not implement."
        )
    activation = hf.get("hidden_activation", "gelu_pytorch_tanh")
    if activation not in ("gelu_pytorch_tanh", None):
        raise ValueError(
            f"This {family} config uses hidden_activation={activation!r}; gemmalens "
            "implements 'gelu_pytorch_tanh' (GELU, tanh approximation) only."
        )


def special_token_ids(hf: dict[str, Any]) -> dict[str, Any]:
    """``pad_token_id``, ``bos_token_id`` and ``eos_token_id`` as the configs take them: a
    missing or null pad id is 0 (Gemma's pad), a list of end ids becomes a tuple."""
    pad = hf.get("pad_token_id")
    eos = hf.get("eos_token_id", 1)
    return {
        "pad_token_id": 0 if pad is None else pad,
        "bos_token_id": hf.get("bos_token_id", 2),
        "eos_token_id": tuple(eos) if isinstance(eos, list) else eos,
    }
