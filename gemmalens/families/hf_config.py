"""What every family reads from a transformers config dict the same way."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gemmalens.layers.builders import FULL, SLIDING

_MODEL_TYPES = {"gemma3": "gemma3_text", "gemma3n": "gemma3n_text", "gemma4": "gemma4_text"}


def expect_model_type(hf: Mapping[str, Any], expected: str, what: str) -> None:
    """A config dict of another kind (``model_type`` not ``expected``) is an error naming
    both; a dict without ``model_type`` is taken as ``expected``. ``what`` names the kind
    for the message (``"a SigLIP vision config"``)."""
    model_type = hf.get("model_type", expected)
    if model_type != expected:
        raise ValueError(f"Expected {what} (model_type {expected!r}), got {model_type!r}.")


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


def _rope(rope) -> dict[str, Any]:
    entry = {"rope_type": rope.rope_type, "rope_theta": float(rope.theta)}
    if rope.rope_type == "linear":
        entry["factor"] = float(rope.factor)
    if getattr(rope, "partial_rotary_factor", 1.0) != 1.0:
        entry["partial_rotary_factor"] = float(rope.partial_rotary_factor)
    return entry


def _common(config) -> dict[str, Any]:
    """The keys every Gemma text config spells the same way in transformers."""
    eos = config.eos_token_id
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        sliding_window=config.sliding_window,
        layer_types=list(config.layer_types),
        rope_parameters={SLIDING: _rope(config.rope_local), FULL: _rope(config.rope_global)},
        rms_norm_eps=config.rms_norm_eps,
        final_logit_softcapping=config.final_logit_softcapping,
        max_position_embeddings=config.max_position_embeddings,
        hidden_activation="gelu_pytorch_tanh",
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=list(eos) if isinstance(eos, tuple) else eos,
        tie_word_embeddings=True,
    )


def to_hf(config: Any) -> dict[str, Any]:
    """The Hugging Face ``config.json`` contents of a gemmalens text config (Gemma 3, 3n, 4),
    in the spelling of the released files: the inverse of each family's ``from_hf``.

    Other checkpoint formats (KerasHub, the gemma library) are read through it, and
    transformers' config classes take it as keyword arguments (less ``model_type``)."""
    family = config.family
    if family == "gemma3":
        return dict(
            model_type=_MODEL_TYPES[family],
            **_common(config),
            intermediate_size=config.intermediate_size,
            query_pre_attn_scalar=config.query_pre_attn_scalar,
            attn_logit_softcapping=config.attn_logit_softcapping,
            use_bidirectional_attention=config.use_bidirectional_attention,
        )
    if family == "gemma3n":
        return dict(
            model_type=_MODEL_TYPES[family],
            **_common(config),
            intermediate_size=list(config.intermediate_size),
            activation_sparsity_pattern=list(config.activation_sparsity_pattern),
            num_kv_shared_layers=config.num_kv_shared_layers,
            vocab_size_per_layer_input=config.vocab_size_per_layer_input,
            hidden_size_per_layer_input=config.hidden_size_per_layer_input,
            altup_num_inputs=config.altup_num_inputs,
            altup_active_idx=config.altup_active_idx,
            altup_correct_scale=config.altup_correct_scale,
            altup_coef_clip=config.altup_coef_clip,
            laurel_rank=config.laurel_rank,
        )
    if family == "gemma4":
        return dict(
            model_type=_MODEL_TYPES[family],
            **_common(config),
            intermediate_size=config.intermediate_size,
            global_head_dim=config.global_head_dim,
            num_global_key_value_heads=config.num_global_key_value_heads,
            attention_k_eq_v=config.attention_k_eq_v,
            num_kv_shared_layers=config.num_kv_shared_layers,
            use_double_wide_mlp=config.use_double_wide_mlp,
            hidden_size_per_layer_input=config.hidden_size_per_layer_input,
            vocab_size_per_layer_input=config.vocab_size_per_layer_input,
            enable_moe_block=config.enable_moe_block,
            num_experts=config.num_experts,
            top_k_experts=config.top_k_experts,
            moe_intermediate_size=config.moe_intermediate_size,
            use_bidirectional_attention=config.use_bidirectional_attention,
        )
    raise ValueError(f"to_hf writes Gemma 3, 3n and 4 text configs; {family!r} is not one of them.")
